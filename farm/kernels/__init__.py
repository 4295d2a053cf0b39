"""Kernel trees: the Debian mirror, the host's apt sources, the tree store."""
