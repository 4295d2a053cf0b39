"""The Docker engine adapter: every Docker call, container and service specs, images."""
