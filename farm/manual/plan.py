"""Pure planning: what the user asked for and what runs → the ordered steps of an action.

No I/O: the CLI resolves the command line into `Request`s, observes the backend, calls
`plan()`, then carries the steps out and renders them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from farm.core.backend import RunningServer
from farm.core.errors import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK
from farm.core.spec import ServerConfig
from farm.manual.server_config import BadServerFile

# What `start` starts when no server is named: a configuration per good server file, a
# BadServerFile per file that describes none (reported FAILED in its place).
Default = ServerConfig | BadServerFile


class Action(str, enum.Enum):
    """stap-server(8)'s actions."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    CONDRESTART = "condrestart"
    TRY_RESTART = "try-restart"
    FORCE_RELOAD = "force-reload"
    STATUS = "status"

    @property
    def start_like(self) -> bool:
        """Actions for which `-n UNKNOWN` names a new server (the manual's "behaving like start")."""
        return self in (Action.START, Action.RESTART, Action.FORCE_RELOAD)

    @property
    def mutating(self) -> bool:
        return self is not Action.STATUS


@dataclass(frozen=True)
class Request:
    """One server named on the command line: a configuration, optionally an exact server.

    `config` is None for `-n NICK` that matched nothing (an error for non-start actions).
    `server` is set when `-p PID` or `-n NICK` selected a server the backend reports.
    """

    config: ServerConfig | None
    server: RunningServer | None = None
    nickname: str = ""


class Step(enum.Enum):
    START = "start"  # start `config`
    INVALID = "invalid"  # a configured server whose file is bad (`invalid`): failure
    ALREADY_RUNNING = "already-running"  # `config` matches `server` (or one planned earlier)
    REMOVE_STALE = "remove-stale"  # silently remove a dead `server` before starting again
    STOP = "stop"  # stop `server`
    STOP_NOT_RUNNING = "stop-not-running"  # nothing runs `config`: success
    NOTHING_TO_STOP = "nothing-to-stop"  # `Stopping stap-server: OK`
    UNKNOWN_NICKNAME = "unknown-nickname"  # stop/condrestart of an unknown `nickname`: failure
    SKIP_NOT_RUNNING = "skip-not-running"  # condrestart of a stopped `config`
    NONE_RUNNING = "none-running"  # condrestart with nothing running
    STATUS_RUNNING = "status-running"
    STATUS_STALE = "status-stale"  # `server` exists but its daemon is gone
    STATUS_NOT_RUNNING = "status-not-running"  # a listed `config` nothing runs
    STATUS_UNKNOWN = "status-unknown"  # `nickname` is neither running nor configured
    STATUS_NONE = "status-none"  # `No managed stap-server is running`


@dataclass(frozen=True)
class PlannedStep:
    kind: Step
    config: ServerConfig | None = None
    server: RunningServer | None = None
    nickname: str = ""
    invalid: BadServerFile | None = None


def matches(config: ServerConfig, server: RunningServer) -> bool:
    """SERVER runs CONFIG: same identity, and the same nickname when CONFIG names one."""
    return (server.config.identity() == config.identity()
            and (not config.nickname or config.nickname == server.config.nickname))


def needs_defaults(action: Action, requests: Sequence[Request] | None,
                   observed: Sequence[RunningServer]) -> bool:
    """Whether `plan` will use the configured/default servers (so they must be loaded)."""
    if requests is not None:
        return False
    return (action in (Action.START, Action.FORCE_RELOAD)
            or (action is Action.RESTART and not observed))


def plan(action: Action, requests: Sequence[Request] | None,
         observed: Sequence[RunningServer],
         defaults: Sequence[Default] = ()) -> list[PlannedStep]:
    """The steps of ACTION for REQUESTS (None: nothing listed) given the OBSERVED servers.

    DEFAULTS are the configured servers, else the default server: what `start` starts when
    nothing is listed. A bad server file among them is an INVALID step in its place; the
    others are started all the same.
    """
    if action is Action.START:
        configs: list[Default] = (list(_configs(requests)) if requests is not None
                                  else list(defaults))
        return _plan_start(configs, requests, observed)
    if action is Action.STOP:
        return _plan_stop(requests, observed)
    if action is Action.STATUS:
        return _plan_status(requests, observed)
    if action is Action.FORCE_RELOAD:
        reload: list[Default] = (list(_configs(requests)) if requests is not None
                                 else list(defaults))
        return _plan_stop(None, observed) + _plan_start(reload, None, [])
    if action is Action.RESTART:
        if requests is None:
            if not observed:
                return [PlannedStep(Step.NOTHING_TO_STOP)] + _plan_start(list(defaults), None, [])
            stops = _plan_stop(None, observed)
            return stops + _plan_start([s.config for s in observed], None, [])
        stops = _plan_stop(requests, observed)
        return stops + _plan_start(_configs(requests), None, _remaining(observed, stops))
    # condrestart / try-restart: never start what is not running
    steps: list[PlannedStep] = []
    restart: list[ServerConfig] = []
    if requests is None:
        running = [s for s in observed if s.running]
        if not running:
            return [PlannedStep(Step.NONE_RUNNING)]
        for s in running:
            steps.append(PlannedStep(Step.STOP, s.config, s))
            restart.append(s.config)
    else:
        stopped: set[str] = set()
        for r in requests:
            if r.config is None:
                steps.append(PlannedStep(Step.UNKNOWN_NICKNAME, nickname=r.nickname))
                continue
            running = [s for s in _selected(r, observed) if s.running]
            fresh = [s for s in running if s.container not in stopped]
            if not running:
                steps.append(PlannedStep(Step.SKIP_NOT_RUNNING, r.config))
                continue
            for s in fresh:
                stopped.add(s.container)
                steps.append(PlannedStep(Step.STOP, s.config, s))
            if fresh:
                restart.append(r.config)
    return steps + _plan_start(restart, None, _remaining(observed, steps))


def _configs(requests: Sequence[Request]) -> list[ServerConfig]:
    return [r.config for r in requests if r.config is not None]


def _selected(r: Request, observed: Sequence[RunningServer]) -> list[RunningServer]:
    """The observed servers request R designates."""
    if r.server is not None:
        return [r.server]
    assert r.config is not None
    config = r.config
    return [s for s in observed if matches(config, s)]


def _remaining(observed: Sequence[RunningServer],
               steps: Sequence[PlannedStep]) -> list[RunningServer]:
    gone = {st.server.container for st in steps if st.kind is Step.STOP and st.server}
    return [s for s in observed if s.container not in gone]


def _plan_start(configs: Sequence[Default], requests: Sequence[Request] | None,
                observed: Sequence[RunningServer]) -> list[PlannedStep]:
    steps: list[PlannedStep] = []
    planned: list[ServerConfig] = []
    exact = {id(r.config): r.server for r in requests or () if r.server is not None}
    for config in configs:
        if isinstance(config, BadServerFile):
            steps.append(PlannedStep(Step.INVALID, invalid=config))
            continue
        chosen = exact.get(id(config))
        if chosen is not None and chosen.running and chosen.config.identity() == config.identity():
            steps.append(PlannedStep(Step.ALREADY_RUNNING, config, chosen))
            continue
        found = [s for s in observed if matches(config, s)]
        running = [s for s in found if s.running]
        if running:
            steps.append(PlannedStep(Step.ALREADY_RUNNING, config, running[0]))
        elif any(p.identity() == config.identity() and p.nickname == config.nickname
                 for p in planned):
            steps.append(PlannedStep(Step.ALREADY_RUNNING, config))
        else:
            steps += [PlannedStep(Step.REMOVE_STALE, s.config, s) for s in found]
            steps.append(PlannedStep(Step.START, config))
            planned.append(config)
    return steps


def _plan_stop(requests: Sequence[Request] | None,
               observed: Sequence[RunningServer]) -> list[PlannedStep]:
    if requests is None:
        if not observed:
            return [PlannedStep(Step.NOTHING_TO_STOP)]
        return [PlannedStep(Step.STOP, s.config, s) for s in observed]
    steps: list[PlannedStep] = []
    stopped: set[str] = set()
    for r in requests:
        if r.config is None:
            steps.append(PlannedStep(Step.UNKNOWN_NICKNAME, nickname=r.nickname))
            continue
        found = _selected(r, observed)
        if not found:
            steps.append(PlannedStep(Step.STOP_NOT_RUNNING, r.config))
        for s in found:
            if s.container not in stopped:
                stopped.add(s.container)
                steps.append(PlannedStep(Step.STOP, s.config, s))
    return steps


def _plan_status(requests: Sequence[Request] | None,
                 observed: Sequence[RunningServer]) -> list[PlannedStep]:
    def one(s: RunningServer) -> PlannedStep:
        return PlannedStep(Step.STATUS_RUNNING if s.running else Step.STATUS_STALE, s.config, s)

    if requests is None:
        if not observed:
            return [PlannedStep(Step.STATUS_NONE)]
        return [one(s) for s in observed]
    steps: list[PlannedStep] = []
    for r in requests:
        if r.config is None:
            steps.append(PlannedStep(Step.STATUS_UNKNOWN, nickname=r.nickname))
            continue
        found = _selected(r, observed)
        steps += [one(s) for s in found] or [PlannedStep(Step.STATUS_NOT_RUNNING, r.config)]
    return steps


def status_exit_code(steps: Sequence[PlannedStep]) -> int:
    """0 when every listed server runs, 1 for a stale one or a running one that cannot serve
    (RunningServer.problems: a kernel tree removed under it), 3 for none / not running /
    unknown."""
    kinds = {st.kind for st in steps}
    if Step.STATUS_STALE in kinds or any(
            st.kind is Step.STATUS_RUNNING and st.server is not None and st.server.problems
            for st in steps):
        return EXIT_FAILED
    if kinds & {Step.STATUS_NONE, Step.STATUS_NOT_RUNNING, Step.STATUS_UNKNOWN}:
        return EXIT_NOT_RUNNING
    return EXIT_OK
