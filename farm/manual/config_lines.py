"""The line syntax both kinds of configuration file share: `VARIABLE=VALUE`, not shell.

The value is everything after the `=`, taken literally (quotes are kept). `#` lines and blank
lines are ignored. Each problem is one `FILE:LINE: ...` string; callers collect them and
raise one `ConfigError`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from farm.core.errors import ConfigError
from farm.core.spec import Strategy

MAX_CONFIG_BYTES = 1 << 20  # no configuration file is this large

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Bounds of numeric values, named in every message that refuses one (docs/cli.md).
MAX_PORT = 65535
MAX_THREADS = 1024  # stap-serverd starts one thread per worker; more only exhausts PIDS_LIMIT
MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: --max-request-size, --max-compressed-request
MAX_PID = 4194304  # PID_MAX_LIMIT, the largest pid_max a 64-bit Linux kernel accepts
MAX_CPUS = 1024.0  # CPUS: a sane cap (Docker itself refuses more CPUs than the host has)
MIN_CPUS = 0.01  # Docker's smallest CPU limit (0 still means "no limit")


@dataclass(frozen=True)
class Assignment:
    """One `NAME=VALUE` or `NAME+=VALUE` line of a configuration file."""

    name: str
    append: bool
    value: str
    where: str  # "FILE:LINE"


def read_config_text(path: str) -> str:
    """Return the text of configuration file PATH.

    Raises:
        ConfigError: the file is missing, unreadable, a directory, larger than 1 MiB
            (`-c /dev/zero`) or not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such configuration file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except ValueError as e:  # a NUL in the name: no such file can exist
        raise ConfigError(f"{shown(path)}: no such configuration file") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a configuration "
                          "file")
    return decode_config_bytes(data, path)


def decode_config_bytes(data: bytes, path: str) -> str:
    """Decode DATA as UTF-8, naming the first bad line.

    Raises:
        ConfigError: DATA is not UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 text") from e


def split_lines(text: str, path: str) -> list[Assignment | str]:
    """Parse TEXT into assignments, in order, and a `FILE:LINE: ...` problem per invalid line."""
    out: list[Assignment | str] = []
    # Split on "\n" only, as bash `read -r` does (str.splitlines also splits on \x0b, \x1c...).
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        where = f"{path}:{number}"
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\0" in line:
            out.append(f"{where}: invalid line (contains a NUL byte)")
            continue
        eq = line.find("=")
        name = line[:eq] if eq > 0 else ""
        append = name.endswith("+")
        if append:
            name = name[:-1]
        if not _NAME.fullmatch(name):
            hint = " (no spaces around the name; this is not a shell script)" if (
                line[:1].isspace() or (eq > 0 and line[:eq].strip() != line[:eq])) else ""
            out.append(f"{where}: invalid input \"{line}\": expected VARIABLE=VALUE{hint}")
            continue
        out.append(Assignment(name, append, line[eq + 1:], where))
    return out


def unknown_variable(a: Assignment, known: Iterable[str]) -> str:
    """The problem of A's unknown variable, with the closest of KNOWN as a suggestion."""
    close = difflib.get_close_matches(a.name.upper(), sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{a.where}: unknown variable '{a.name}'{hint}"


def bounded_int(text: str, lo: int, hi: int) -> int | None:
    """TEXT as a decimal integer in LO..HI, else None.

    Never calls int() on more digits than HI has: Python refuses to convert strings of more
    than 4,300 digits (ValueError), and a value that long is out of range anyway.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(hi)):
        return None
    n = int(digits)
    return n if lo <= n <= hi else None


def shown(value: str, limit: int = 40) -> str:
    """VALUE for an error message: very long values are cut, with their length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit // 2]}...{value[-8:]} ({len(value)} characters)"


def parse_int(a: Assignment, lo: int, hi: int | None, what: str, problems: list[str]
              ) -> int | None:
    """A's value as an integer in LO..HI (None: unbounded), else None and a problem naming
    WHAT it should be."""
    value = a.value.strip()
    top = hi if hi is not None else 10 ** 18  # no traceback for an unbounded variable either
    n = bounded_int(value, lo, top)
    if n is None:
        upper = f"-{hi}" if hi is not None else " or more"
        problems.append(f"{a.where}: {a.name}: '{shown(a.value)}' is not {what} ({lo}{upper})")
    return n


def parse_strategy(a: Assignment, problems: list[str]) -> Strategy | None:
    """A's value as a build strategy (any case), else None and a problem."""
    try:
        return Strategy(a.value.strip().lower())
    except ValueError:
        names = "|".join(s.value for s in Strategy)
        problems.append(f"{a.where}: {a.name}: '{shown(a.value)}' is not one of {names}")
        return None
