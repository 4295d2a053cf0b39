"""stapfarm: stap-server(8) for a fleet of containerized SystemTap compile servers."""

__version__ = "0.1.0"
