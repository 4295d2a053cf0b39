"""The pure planner: requests + observed servers → ordered steps."""

from __future__ import annotations

from farm.core.backend import RunningServer
from farm.core.spec import ServerConfig
from farm.manual.plan import (
    Action,
    PlannedStep,
    Request,
    Step,
    matches,
    needs_defaults,
    plan,
    status_exit_code,
)
from farm.manual.server_config import BadServerFile

X86 = ServerConfig(arch="x86_64", releases=("6.1.0-test",), user="u", log="/l")
ARM = ServerConfig(arch="arm64", releases=("6.1.0-test",), user="u", log="/l")
NAMED = ServerConfig(arch="x86_64", releases=("6.1.0-test",), user="u", log="/l", nickname="n")


def srv(config: ServerConfig, pid: int, running: bool = True) -> RunningServer:
    return RunningServer(config=config, pid=pid, port=40000 + pid, container=f"c{pid}",
                         running=running)


def kinds(steps: list[PlannedStep]) -> list[Step]:
    return [s.kind for s in steps]


def test_matches_ignores_nickname_only_when_request_has_none() -> None:
    assert matches(X86, srv(NAMED, 1))
    assert matches(NAMED, srv(NAMED, 1))
    assert not matches(NAMED, srv(X86, 1))
    assert not matches(ARM, srv(X86, 1))


def test_start_defaults_when_nothing_listed() -> None:
    steps = plan(Action.START, None, [], [X86, ARM])
    assert kinds(steps) == [Step.START, Step.START]
    assert [s.config for s in steps] == [X86, ARM]


def test_start_already_running_is_noop() -> None:
    running = srv(X86, 5)
    steps = plan(Action.START, [Request(X86)], [running])
    assert steps == [PlannedStep(Step.ALREADY_RUNNING, X86, running)]


def test_start_same_config_twice_in_one_command_starts_once() -> None:
    assert kinds(plan(Action.START, [Request(X86), Request(X86)], [])) == [
        Step.START, Step.ALREADY_RUNNING]


def test_start_replaces_a_stale_server() -> None:
    stale = srv(X86, 5, running=False)
    assert plan(Action.START, [Request(X86)], [stale]) == [
        PlannedStep(Step.REMOVE_STALE, X86, stale), PlannedStep(Step.START, X86)]


def test_start_new_nickname_is_another_server() -> None:
    assert kinds(plan(Action.START, [Request(NAMED)], [srv(X86, 5)])) == [Step.START]


def test_stop_all_and_nothing() -> None:
    a, b = srv(X86, 1), srv(ARM, 2, running=False)
    assert kinds(plan(Action.STOP, None, [a, b])) == [Step.STOP, Step.STOP]
    assert kinds(plan(Action.STOP, None, [])) == [Step.NOTHING_TO_STOP]


def test_stop_listed() -> None:
    a = srv(X86, 1)
    assert plan(Action.STOP, [Request(a.config, a)], [a]) == [PlannedStep(Step.STOP, X86, a)]
    assert kinds(plan(Action.STOP, [Request(ARM)], [a])) == [Step.STOP_NOT_RUNNING]
    assert kinds(plan(Action.STOP, [Request(None, nickname="q")], [a])) == [
        Step.UNKNOWN_NICKNAME]
    # the same server named twice is stopped once
    assert kinds(plan(Action.STOP, [Request(X86), Request(a.config, a)], [a])) == [Step.STOP]


def test_restart_nothing_running_behaves_like_start() -> None:
    assert kinds(plan(Action.RESTART, None, [], [X86])) == [Step.NOTHING_TO_STOP, Step.START]


def test_restart_all_running_keeps_their_configs() -> None:
    a, b = srv(NAMED, 1), srv(ARM, 2)
    steps = plan(Action.RESTART, None, [a, b])
    assert kinds(steps) == [Step.STOP, Step.STOP, Step.START, Step.START]
    assert [s.config for s in steps[2:]] == [NAMED, ARM]


def test_restart_listed_not_running_starts_it() -> None:
    assert kinds(plan(Action.RESTART, [Request(ARM)], [srv(X86, 1)])) == [
        Step.STOP_NOT_RUNNING, Step.START]


def test_condrestart_never_starts_stopped() -> None:
    a = srv(X86, 1)
    assert kinds(plan(Action.CONDRESTART, None, [])) == [Step.NONE_RUNNING]
    assert kinds(plan(Action.CONDRESTART, None, [srv(X86, 1, running=False)])) == [
        Step.NONE_RUNNING]
    assert kinds(plan(Action.CONDRESTART, [Request(ARM)], [a])) == [Step.SKIP_NOT_RUNNING]
    assert kinds(plan(Action.TRY_RESTART, [Request(X86), Request(ARM)], [a])) == [
        Step.STOP, Step.SKIP_NOT_RUNNING, Step.START]
    assert kinds(plan(Action.CONDRESTART, [Request(None, nickname="q")], [a])) == [
        Step.UNKNOWN_NICKNAME]


def test_force_reload_stops_all_then_starts_configured() -> None:
    steps = plan(Action.FORCE_RELOAD, None, [srv(X86, 1), srv(ARM, 2)], [X86])
    assert kinds(steps) == [Step.STOP, Step.STOP, Step.START]
    assert steps[-1].config == X86


def test_status_kinds_and_exit_codes() -> None:
    a, stale = srv(X86, 1), srv(ARM, 2, running=False)
    none = plan(Action.STATUS, None, [])
    assert kinds(none) == [Step.STATUS_NONE] and status_exit_code(none) == 3
    all_ = plan(Action.STATUS, None, [a])
    assert kinds(all_) == [Step.STATUS_RUNNING] and status_exit_code(all_) == 0
    mixed = plan(Action.STATUS, None, [a, stale])
    assert kinds(mixed) == [Step.STATUS_RUNNING, Step.STATUS_STALE]
    assert status_exit_code(mixed) == 1
    listed = plan(Action.STATUS, [Request(ARM), Request(None, nickname="q")], [a])
    assert kinds(listed) == [Step.STATUS_NOT_RUNNING, Step.STATUS_UNKNOWN]
    assert status_exit_code(listed) == 3


def test_needs_defaults() -> None:
    assert needs_defaults(Action.START, None, [])
    assert not needs_defaults(Action.START, [Request(X86)], [])
    assert needs_defaults(Action.RESTART, None, [])
    assert not needs_defaults(Action.RESTART, None, [srv(X86, 1)])
    assert needs_defaults(Action.FORCE_RELOAD, None, [srv(X86, 1)])
    assert not needs_defaults(Action.STOP, None, [])
    assert Action.RESTART.start_like and not Action.CONDRESTART.start_like


BAD = BadServerFile("/c/bad.conf", ("/c/bad.conf:1: ARCH: unknown architecture 'i386'",),
                    written=(("ARCH", ("i386",)),))


def test_start_reports_a_bad_file_in_its_place_and_starts_the_others() -> None:
    steps = plan(Action.START, None, [], [X86, BAD, ARM])
    assert kinds(steps) == [Step.START, Step.INVALID, Step.START]
    assert steps[1] == PlannedStep(Step.INVALID, invalid=BAD)
    assert kinds(plan(Action.FORCE_RELOAD, None, [srv(X86, 1)], [BAD, X86])) == [
        Step.STOP, Step.INVALID, Step.START]
    assert kinds(plan(Action.RESTART, None, [], [BAD])) == [Step.NOTHING_TO_STOP, Step.INVALID]
