"""The `stap-server` command line's syntax: options in order, checked, nothing resolved.

Every value is checked here, before anything is started or even looked at (docs/cli.md);
what the options mean against the running and configured servers is farm/manual/resolver.py.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from farm.core.arch import Arch
from farm.core.errors import ArchError, FarmError, UsageError
from farm.core.spec import Strategy
from farm.manual.config_lines import (
    MAX_PID,
    MAX_PORT,
    MAX_REQUEST_BYTES,
    MAX_THREADS,
    bounded_int,
    shown,
)
from farm.manual.host import Host, server_user_problem
from farm.manual.plan import Action

_VALUE_SHORT = set("acBDInprRu")
_UNSUPPORTED_SHORT = {
    "P": "-P is not supported: stap-serverd cannot prompt for a certificate database password "
         "without a terminal, and the farm's certificate databases have no password",
    "k": "-k (keep the server's temporary files) is not supported by the farm",
}
# What an empty value would silently mean instead of an error: an unnamed server, the
# current directory, an empty `make` option...
_NON_EMPTY = {"n": "a nickname", "r": "a kernel release or build tree", "I": "a directory",
              "R": "a directory", "B": "a 'make' option", "u": "a user name",
              "c": "a file name"}
# Options applied in turn to successive servers (the manual's lists), by ServerDraft field.
DISTRIBUTED = {"log": "log", "port": "port", "ssl": "ssl", "max-threads": "max_threads",
               "max-request-size": "max_request_size",
               "max-compressed-request": "max_compressed_request"}
_VALUE_LONG = set(DISTRIBUTED) | {"strategy"}
_FLAG_LONG = {"json", "help"}
_NUMERIC_LONG = {
    "port": (0, MAX_PORT, f"a port number (0-{MAX_PORT})"),
    "max-threads": (0, MAX_THREADS, f"a thread count (0-{MAX_THREADS})"),
    "max-request-size": (1, MAX_REQUEST_BYTES,
                         f"a size in bytes (1-{MAX_REQUEST_BYTES}, i.e. at most 1 GiB)"),
    "max-compressed-request": (1, MAX_REQUEST_BYTES,
                               f"a size in bytes (1-{MAX_REQUEST_BYTES}, i.e. at most 1 GiB)"),
}


@dataclass
class Options:
    """The command line after syntax checks, in order; nothing resolved yet."""

    events: list[tuple[str, str]] = field(default_factory=list)  # per-server options, in order
    lists: dict[str, list[str]] = field(default_factory=dict)  # distributed options
    config_file: str = ""  # the last -c (stap-server(8): the last one wins), absolute
    json: bool = False
    help: bool = False

    @property
    def names_servers(self) -> bool:
        return bool(self.events) or any(self.lists.values())


def absolute(flag: str, value: str, cwd: str) -> str:
    """VALUE of option FLAG as an absolute path: relative paths are from CWD (not from /, as
    upstream's stap-start-server would have it).

    Raises:
        FarmError: VALUE is relative and the working directory no longer exists (CWD "").
    """
    if value.startswith("/"):
        return value
    if not cwd:
        raise FarmError(f"{flag} {shown(value)}: a relative path, and the working directory "
                        "no longer exists", hint="give an absolute path")
    return os.path.join(cwd, value)


def _check_text(flag: str, value: str) -> None:
    """Refuse what cannot be recorded: values go into Docker labels (UTF-8 JSON) and into
    line-oriented stat files, one `VARIABLE=VALUE` per line."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{flag}: the value contains a line break or a NUL character "
                         "(values are recorded one per line in the stat files)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes decoded with surrogateescape
        raise UsageError(f"{flag}: '{shown(value)}' is not valid UTF-8 text (values are "
                         "recorded in Docker labels and stat files)") from None


def parse_options(args: list[str], cwd: str) -> Options:
    """Check the syntax of ARGS (everything after the action).

    Raises:
        UsageError: an unknown option, a missing, empty or malformed value.
        FarmError: a relative `-c`, `--log` or `--ssl` path while the working directory is gone.
    """
    o = Options(lists={k: [] for k in DISTRIBUTED})
    config_file: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name in _FLAG_LONG:
                if eq:
                    raise UsageError(f"option --{name} takes no value")
                o.json |= name == "json"
                o.help |= name == "help"
                continue
            if name not in _VALUE_LONG:
                close = difflib.get_close_matches(name, sorted(_VALUE_LONG | _FLAG_LONG), n=1)
                hint = f"did you mean --{close[0]}?" if close else None
                raise UsageError(f"unknown option --{shown(name)}", hint=hint)
            if not eq:
                if i >= len(args):
                    raise UsageError(f"option --{name} needs a value")
                value = args[i]
                i += 1
            _check_long(name, value)
            if name in ("log", "ssl"):
                o.lists[name].append(os.path.normpath(absolute(f"--{name}", value, cwd)))
            elif name in DISTRIBUTED:
                o.lists[name].append(value)
            else:
                o.events.append((name, value))
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            letter, value = arg[1], arg[2:]
            if letter in ("h", "?") and not value:
                o.help = True
            elif letter in _UNSUPPORTED_SHORT and not value:
                raise UsageError(_UNSUPPORTED_SHORT[letter])
            elif letter == "i":
                if value:
                    raise UsageError(f"option -i takes no value (got '{shown(arg)}')")
                o.events.append(("i", ""))
            elif letter in _VALUE_SHORT:
                if not value:
                    if i >= len(args):
                        raise UsageError(f"option -{letter} needs a value")
                    value = args[i]
                    i += 1
                if not value and letter in _NON_EMPTY:
                    raise UsageError(f"option -{letter} needs {_NON_EMPTY[letter]}, not an "
                                     "empty value")
                if letter == "c":
                    config_file = value
                elif letter == "p":
                    if bounded_int(value, 1, MAX_PID) is None:
                        raise UsageError(f"-p: '{shown(value)}' is not a process id "
                                         f"(1-{MAX_PID})")
                    o.events.append((letter, value))
                elif letter == "u" and value == "root":
                    raise UsageError("-u root: a compile server never runs as root "
                                     "(stap-serverd refuses it); name an unprivileged user")
                else:
                    _check_text(f"-{letter}", value)
                    if letter == "a":
                        try:
                            value = Arch.parse(value).stap
                        except ArchError as e:
                            raise UsageError(f"-a: {e.message}", hint=e.hint) from e
                    o.events.append((letter, value))
            else:
                raise UsageError(f"unknown option {shown(arg)}")
        else:
            raise UsageError(f"unexpected argument '{shown(arg)}'")
    if config_file is not None:
        o.config_file = absolute("-c", config_file, cwd)
    return o


def _check_long(name: str, value: str) -> None:
    if name == "strategy":
        if value.lower() not in {s.value for s in Strategy}:
            raise UsageError(f"--strategy: '{shown(value)}' is not one of "
                             + "|".join(s.value for s in Strategy))
        return
    if name in ("log", "ssl"):
        if not value:
            raise UsageError(f"--{name} needs a non-empty path")
        _check_text(f"--{name}", value)
        return
    lo, hi, what = _NUMERIC_LONG[name]
    if bounded_int(value, lo, hi) is None:
        raise UsageError(f"--{name}: '{shown(value)}' is not {what}")


def check_users(action: Action, o: Options, host: Host) -> None:
    """The `-u USER` of a command that may start servers names an existing user of the
    `stap-server` group (stap-server(8)), checked before anything is started.

    Raises:
        FarmError: the user does not exist or is not in the group (exit 1: what is wrong is
            the host's user database, not the command line's syntax).
    """
    if action in (Action.STOP, Action.STATUS):
        return  # stopping a server whose user was removed since must still work
    for opt, value in o.events:
        if opt == "u":
            problem = server_user_problem(value, host.accounts)
            if problem:
                raise FarmError(problem)
