"""`python -m farm` is the `stap-server` command."""

from farm.cli import entry_point

entry_point()
