"""What every farm action's command line shares: an argparse parser that raises instead of
exiting (the caller prints one line and returns the manual's exit code)."""

from __future__ import annotations

import argparse
from typing import Any

from farm.core.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error raised as `UsageError` (argparse would sys.exit(2))."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")
