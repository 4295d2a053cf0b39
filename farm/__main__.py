"""`python -m farm` is the `stap-server` command."""

from farm.manual.cli import entry_point

entry_point()
