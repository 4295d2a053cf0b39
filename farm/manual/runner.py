"""Carrying out an action: plan it against what runs, then do each step under the farm's
lock, printing upstream's `Starting`/`Stopping` ... `OK`/`FAILED` lines as each completes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import TextIO

from farm.core.backend import Backend, RunningServer
from farm.core.errors import (
    EXIT_OK,
    ConfigError,
    FarmError,
    ImageError,
    KernelTreeError,
    ServerError,
)
from farm.core.spec import GlobalConfig, ServerConfig
from farm.manual import statfile
from farm.manual.host import Host
from farm.manual.options import Options
from farm.manual.plan import Action, PlannedStep, Step, needs_defaults, plan, status_exit_code
from farm.manual.render import PROG, status_json, status_line, step_header
from farm.manual.resolver import Resolver
from farm.manual.terminal import report


def run_action(action: Action, o: Options, g: GlobalConfig, host: Host, backend: Backend,
               out: TextIO, err: TextIO) -> int:
    """Carry out ACTION as the options O ask, on BACKEND, and return its exit code; an
    action that changes what runs holds `STATE_DIR/lock` throughout.

    Raises:
        FarmError: what stops the whole action (a selection that matches nothing, a bad
            server file the command names, the backend unreachable, the lock).
    """
    if not action.mutating:
        return _run(action, o, g, host, backend, out, err)
    with _locked(g.state_dir):
        return _run(action, o, g, host, backend, out, err)


@contextlib.contextmanager
def _locked(state_dir: str) -> Iterator[None]:
    """Hold `<state_dir>/lock` so that two invocations never start duplicates."""
    path = os.path.join(state_dir, "lock")
    try:
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FarmError(f"cannot create the lock file {path}: {e.strerror or e}",
                        hint="set STATE_DIR in the global configuration to a writable "
                             "directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Runner:
    """Carries out planned steps, printing upstream's lines as each completes."""

    def __init__(self, backend: Backend, out: TextIO, err: TextIO,
                 servers: list[RunningServer]) -> None:
        self.backend, self.out, self.err = backend, out, err
        self.servers = list(servers)  # what runs after the steps done so far
        self.first = True
        self.rc = EXIT_OK

    def _begin(self, text: str, newline: bool = True) -> None:
        if not self.first:
            self.out.write("\n")  # upstream ends each OK/FAILED with the next `echo`
        self.first = False
        self.out.write(text + ("\n" if newline else ""))
        self.out.flush()

    def _end(self, ok: bool) -> None:
        self.out.write("OK" if ok else "FAILED")
        self.out.flush()
        if not ok:
            self.rc = 1

    def _error(self, e: FarmError) -> None:
        self.out.flush()
        report(self.err, str(e))
        self.err.flush()

    def run(self, steps: list[PlannedStep]) -> int:
        for st in steps:
            self.step(st)
        if not self.first:
            self.out.write("\n")
        return self.rc

    def step(self, st: PlannedStep) -> None:
        k = st.kind
        if k is Step.REMOVE_STALE:
            assert st.server is not None
            self._call_stop(st.server, quiet=True)
        elif k is Step.NOTHING_TO_STOP:
            self._begin(f"Stopping {PROG}: ", newline=False)
            self._end(True)
        elif k in (Step.ALREADY_RUNNING, Step.STOP_NOT_RUNNING, Step.SKIP_NOT_RUNNING,
                   Step.NONE_RUNNING):
            self._begin(step_header(st))
            self._end(True)
        elif k is Step.UNKNOWN_NICKNAME:
            self._begin(step_header(st))
            self._end(False)
        elif k is Step.STOP:
            assert st.server is not None
            self._begin(step_header(st))
            self._end(self._call_stop(st.server))
        elif k is Step.START:
            assert st.config is not None
            self._begin(step_header(st))
            self._end(self._call_start(st.config))
        elif k is Step.INVALID:
            assert st.invalid is not None
            self._begin(step_header(st))
            self._error(ConfigError(list(st.invalid.problems)))
            self._end(False)

    def _call_stop(self, server: RunningServer, quiet: bool = False) -> bool:
        try:
            self.backend.stop(server)
        except ServerError as e:
            if not quiet:
                self._error(e)
            return False
        except FarmError:
            if not quiet:
                self._end(False)
                self.out.write("\n")
            raise
        self.servers = [s for s in self.servers if s.container != server.container]
        return True

    def _call_start(self, config: ServerConfig) -> bool:
        try:
            started = self.backend.start(config)
        except (ServerError, KernelTreeError, ImageError) as e:
            # this server cannot start (its tree, image or daemon): the others still may
            self._error(e)
            return False
        except FarmError:
            self._end(False)
            self.out.write("\n")
            raise
        self.servers.append(started)
        return True


def _sync_stat(stat_path: str, servers: list[RunningServer], err: TextIO, quiet: bool) -> None:
    try:
        statfile.sync(stat_path, servers)
    except OSError as e:
        if not quiet:
            report(err, f"warning: cannot update the status files in {stat_path}: "
                        f"{e.strerror or e}")


def _run(action: Action, o: Options, g: GlobalConfig, host: Host, backend: Backend,
         out: TextIO, err: TextIO) -> int:
    observed = backend.list_servers()
    resolver = Resolver(action, g, host, observed)
    requests = resolver.requests(o)
    defaults = resolver.defaults() if needs_defaults(action, requests, observed) else []
    if action is Action.STATUS and requests is None:
        resolver.warn_bad_files()
    steps = plan(action, requests, observed, defaults)
    for warning in resolver.warnings:
        report(err, warning)
    if action is Action.STATUS:
        code = status_exit_code(steps)
        notices = backend.notices()
        if o.json:
            out.write(status_json(steps, code, notices))
        else:
            out.write("".join(status_line(st) + "\n" for st in steps))
            out.write("".join(f"{n}\n" for n in notices))
        # As upstream deletes the stat file of a dead server once status has reported it,
        # the farm removes the dead server's container.
        # A container still on its way up (settling) is not dead: it is kept.
        for stale in [s for s in observed if not s.running and not s.settling]:
            with contextlib.suppress(FarmError):
                backend.stop(stale)
        _sync_stat(g.stat_path, [s for s in observed if s.running], err, quiet=True)
        return code
    statfile.ensure_dir(g.stat_path)
    runner = Runner(backend, out, err, observed)
    try:
        return runner.run(steps)
    finally:
        _sync_stat(g.stat_path, runner.servers, err, quiet=False)
