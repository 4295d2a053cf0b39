"""The farm's exceptions: one root, subclasses carrying what the user needs to fix it."""

from __future__ import annotations

# Exit codes as stap-server(8) and the LSB init conventions use them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


class FarmError(Exception):
    """Root of every error the farm reports as one line instead of a traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(FarmError):
    """Bad command line."""

    exit_code = EXIT_USAGE


class ConfigError(FarmError):
    """One or more problems in configuration files (all reported in one pass)."""

    def __init__(self, problems: list[str] | str, *, hint: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems), hint=hint)


class ArchError(FarmError):
    """An architecture name the farm does not know."""


class KernelTreeError(FarmError):
    """A kernel devel tree that is missing, unobtainable or unusable."""


class MirrorError(FarmError):
    """The Debian mirror could not be read or verified."""


class ImageError(FarmError):
    """A server image that is missing or failed to build."""


class DockerUnavailable(FarmError):
    """The Docker engine cannot be reached."""


class ServerError(FarmError):
    """A server that failed to start, stop or answer."""
