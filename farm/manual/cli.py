"""The `stap-server` command: dispatch an action, `main(argv) -> int`, the console script.

`main` turns every `FarmError` into `stap-server: ...` lines and its exit code: options
(farm/manual/options.py), settings (farm/manual/config.py), resolving (resolver.py) and
carrying out (runner.py) raise, and never print an error themselves.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from farm.core.backend import Backend
from farm.core.errors import EXIT_NOT_RUNNING, EXIT_OK, FarmError, UsageError
from farm.core.spec import GlobalConfig
from farm.manual import actions
from farm.manual.config import load_global
from farm.manual.config_lines import shown
from farm.manual.host import Host
from farm.manual.options import check_users, parse_options
from farm.manual.plan import Action
from farm.manual.render import PROG, USAGE
from farm.manual.runner import run_action
from farm.manual.terminal import printable, report


def _make_backend(g: GlobalConfig, environ: Mapping[str, str]) -> Backend:
    """The farm's servers on the Docker engine (built only when an action needs them)."""
    return actions.farm_backend(g, environ)


def _dispatch(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO,
              backend: Backend | None, host: Host | None) -> int:
    if not argv:
        err.write(USAGE)
        return 2
    name = argv[0]
    if name in ("-h", "--help", "help"):
        out.write(USAGE)
        return EXIT_OK
    if name in actions.ACTIONS:
        return actions.ACTIONS[name](argv[1:], environ, out, err)
    if name == "reload":
        err.write(f"{PROG}: reload is not supported; use force-reload\n")
        return EXIT_NOT_RUNNING
    try:
        action = Action(name)
    except ValueError:
        names = [a.value for a in Action] + sorted(actions.ACTIONS)
        close = difflib.get_close_matches(name, names, n=1)
        raise UsageError(f"unknown action '{shown(name)}'",
                         hint=f"did you mean '{close[0]}'?" if close else None) from None
    host = host or Host.current()
    o = parse_options(argv[1:], host.cwd)
    if o.help:
        out.write(USAGE)
        return EXIT_OK
    if o.json and action is not Action.STATUS:
        raise UsageError("--json is only for status")
    check_users(action, o, host)
    g = load_global([o.config_file] if o.config_file else [], environ, euid=host.euid)
    be = backend if backend is not None else _make_backend(g, environ)
    return run_action(action, o, g, host, be, out, err)


def main(argv: list[str], *, environ: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         backend: Backend | None = None, host: Host | None = None) -> int:
    """Run `stap-server ARGV...` and return its exit code (never raises for user errors)."""
    env = os.environ if environ is None else environ
    out = printable(sys.stdout if stdout is None else stdout)
    err = printable(sys.stderr if stderr is None else stderr)
    try:
        return _dispatch(argv, env, out, err, backend, host)
    except FarmError as e:
        out.flush()
        report(err, str(e))
        if isinstance(e, UsageError):
            err.write(f"Try '{PROG} --help' for more information.\n")
        return e.exit_code


def entry_point() -> None:
    """The `stap-server` console script."""
    try:
        code = main(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:  # `stap-server kernels available | head -n 1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        code = 141
    sys.exit(code)
