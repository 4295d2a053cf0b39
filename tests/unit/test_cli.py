"""`stap-server` in-process through main(argv): actions, options, output, errors, upstream bugs."""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path

import pytest
from clifakes import Farm, Result

from farm.core.errors import DockerUnavailable
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST as MCR,
)
from farm.core.spec import (
    DEFAULT_MAX_REQUEST_SIZE as MRS,
)
from farm.core.spec import (
    GlobalConfig,
    ServerConfig,
    Strategy,
)
from farm.manual import actions as tools
from farm.manual import cli
from farm.manual.host import Host

SIZES = f'--max-request-size "{MRS}" --max-compressed-request "{MCR}"'


def opts(farm: Farm, *, arch: str = "x86_64", user: str = "alice", nick: str = "",
         extra: str = "", release: str = "6.1.0-test") -> str:
    n = f' -n "{nick}"' if nick else ""
    return (f'-a "{arch}" -r "{release}" -u "{user}"{n} --log "{farm.log_file}"'
            f'{extra} {SIZES}')


def config(farm: Farm, **kw: object) -> ServerConfig:
    base: dict[str, object] = {'arch': "x86_64", 'releases': ("6.1.0-test",), 'user': "alice",
                                   'log': farm.log_file, 'max_request_size': MRS,
                                   'max_compressed_request': MCR}
    base.update(kw)
    return ServerConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- start


def test_start_default_server_output_stat_file_and_backend(farm: Farm) -> None:
    r = farm.run("start")
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"Starting stap-server {opts(farm)}\nOK\n"
    assert farm.backend.started == [config(farm)]
    assert farm.stat_files() == {"1000.stat": (
        f"ARCH=x86_64\nUSER=alice\nNICKNAME=1000\nRUNTIME=\nRELEASE+=6.1.0-test\n"
        f"LOG={farm.log_file}\nPORT=\nSSL=\nMAXTHREADS=\nMAXREQSIZE={MRS}\n"
        f"MAXCOMPRESSEDREQ={MCR}\n")}
    assert [c[0] for c in farm.backend.calls] == ["list", "start"]


def test_start_of_a_running_identical_server_is_a_noop_success(farm: Farm) -> None:
    farm.run("start")
    r = farm.run("start")
    assert (r.rc, r.out) == (0, f"Starting stap-server {opts(farm)}\nOK\n")
    assert len(farm.backend.started) == 1


def test_start_configured_servers_in_file_order_with_their_nicknames(farm: Farm) -> None:
    farm.conf("b.conf", "ARCH=arm64\nNICKNAME=beta\n")
    farm.conf("a.conf", "NICKNAME=alpha\nPORT=5001\n")
    r = farm.run("start")
    assert r.rc == 0
    alpha = opts(farm, nick="alpha", extra=' --port "5001"')
    beta = opts(farm, arch="arm64", nick="beta")
    assert r.out == f"Starting stap-server {alpha}\nOK\nStarting stap-server {beta}\nOK\n"
    assert [c.nickname for c in farm.backend.started] == ["alpha", "beta"]
    assert farm.backend.started[0].source == str(farm.config_path / "a.conf")


def test_start_every_option(farm: Farm) -> None:
    tree = farm.root / "kb"
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text("5.10.0-test\n")
    r = farm.run("start", "-a", "aarch64", "-r", str(tree), "-r", "5.10.0-test",
                 "-I", "tapsets", "-I", "/abs/tap", "-D", "STP_MAXMEMORY=1024", "-D", "X",
                 "-B", "V=1", "-R", "/rt", "-u", "bob", "--log", "logs/s.log",
                 "--port", "5001", "--ssl=/db", "--max-threads", "4",
                 "--max-request-size=1000", "--max-compressed-request", "500",
                 "--strategy", "cross")
    assert (r.rc, r.err) == (0, "")
    work = farm.host.cwd
    assert farm.backend.started == [ServerConfig(
        arch="arm64", releases=(str(tree), "5.10.0-test"), build=("V=1",),
        include=(f"{work}/tapsets", "/abs/tap"), define=("STP_MAXMEMORY=1024", "X"),
        runtime="/rt", user="bob", log=f"{work}/logs/s.log", port=5001, ssl="/db",
        max_threads=4, max_request_size=1000, max_compressed_request=500,
        strategy=Strategy.CROSS)]
    assert r.out == (
        f'Starting stap-server -a "arm64" -r "{tree}" -r "5.10.0-test" -R "/rt" '
        f'-D "STP_MAXMEMORY=1024" -D "X" -I "{work}/tapsets" -I "/abs/tap" -B "V=1" '
        f'-u "bob" --log "{work}/logs/s.log" --port "5001" --ssl "/db" --max-threads "4" '
        f'--max-request-size "1000" --max-compressed-request "500" --strategy "cross"\nOK\n')


def test_attached_short_values_and_quotes_escaped(farm: Farm) -> None:
    r = farm.run("start", "-aarm64", '-DMSG="a\\b"')
    assert r.rc == 0
    assert '-D "MSG=\\"a\\\\b\\""' in r.out
    assert farm.backend.started[0].define == ('MSG="a\\b"',)


def test_i_serves_every_release_with_a_build_tree(farm: Farm) -> None:
    for rel, build in (("5.10.0-test", True), ("6.1.0-test", True), ("4.0-nobuild", False)):
        (farm.modules_dir / rel).mkdir(parents=True)
        if build:
            (farm.modules_dir / rel / "build").mkdir()
    r = farm.run("start", "-i")
    assert r.rc == 0
    assert farm.backend.started[0].releases == ("5.10.0-test", "6.1.0-test")


def test_i_without_build_trees(farm: Farm) -> None:
    farm.modules_dir.mkdir(parents=True)
    r = farm.run("start", "-i")
    assert r.rc == 1
    assert r.err.startswith(f"stap-server: -i: no kernel release with a build tree in "
                            f"{farm.modules_dir}")


def test_r_build_tree_without_kernel_release(farm: Farm) -> None:
    r = farm.run("start", "-r", "/no/such/tree")
    assert r.rc == 1 and farm.backend.started == []
    assert r.err.startswith("stap-server: Missing /no/such/tree/include/config/kernel.release")


def test_n_unknown_on_start_names_the_new_server(farm: Farm) -> None:
    r = farm.run("start", "-n", "fresh")
    assert r.rc == 0 and farm.backend.started[0].nickname == "fresh"
    assert farm.run("status", "-n", "fresh").rc == 0


def test_n_configured_with_later_options_is_like_it_for_another_arch(farm: Farm) -> None:
    # Changed by "The manual, complete on a real host" (2): the clone is another server, so
    # it no longer copies the nickname (it was "native"); it is named by its PID.
    farm.conf("native.conf", "ARCH=\nUSER=\nRELEASE=\nNICKNAME=native\nDEFINE=A\n")
    r = farm.run("start", "-n", "native", "-a", "aarch64")
    assert r.rc == 0
    (c,) = farm.backend.started
    assert (c.arch, c.define, c.nickname) == ("arm64", ("A",), "")


def test_n_running_with_other_arch_is_a_new_server_named_by_pid(farm: Farm) -> None:
    farm.run("start", "-n", "native", "-D", "A")
    r = farm.run("start", "-n", "native", "-a", "arm64")
    assert r.rc == 0
    new = farm.backend.started[1]
    assert (new.arch, new.define, new.nickname) == ("arm64", ("A",), "")
    assert len(farm.backend.servers) == 2


def test_multi_server_lists_apply_in_turn(farm: Farm) -> None:
    r = farm.run("start", "-n", "a", "-n", "b", "-n", "c", "--port", "5001", "--port=5002",
                 "--log", "/logs/a", "--ssl", "/db/a")
    assert r.rc == 0
    a, b, c = farm.backend.started
    assert (a.nickname, a.port, a.log, a.ssl) == ("a", 5001, "/logs/a", "/db/a")
    assert (b.nickname, b.port, b.log, b.ssl) == ("b", 5002, farm.log_file, "")
    assert (c.nickname, c.port, c.log, c.ssl) == ("c", None, farm.log_file, "")


def test_options_before_the_first_n_apply_to_it(farm: Farm) -> None:
    farm.run("start", "-D", "X", "-n", "a", "-n", "b")
    a, b = farm.backend.started
    assert (a.define, b.define) == (("X",), ())


def test_default_user_is_invoking_user_or_stap_user(farm: Farm) -> None:
    farm.global_file.write_text(farm.global_file.read_text() + "STAP_USER=builder\n")
    farm.run("start")
    assert farm.backend.started[0].user == "builder"


def test_root_without_u_runs_servers_as_stap_server(farm: Farm) -> None:
    r = farm.run("start", host=farm.as_root())
    assert r.rc == 0 and farm.backend.started[0].user == "stap-server"
    farm.run("start", "-u", "bob", "-a", "arm64", host=farm.as_root())
    assert farm.backend.started[1].user == "bob"


def test_u_root_is_refused(farm: Farm) -> None:
    r = farm.run("start", "-u", "root", host=farm.as_root())
    assert r.rc == 2 and farm.backend.calls == []
    assert "-u root: a compile server never runs as root" in r.err


def test_start_failure_prints_failed_and_the_reason(farm: Farm) -> None:
    farm.backend.fail_start = lambda c: "server exited: NSS error (log tail: boom)"
    r = farm.run("start", "-n", "a", "-n", "b")
    assert r.rc == 1
    assert r.out.count("FAILED") == 2 and "OK" not in r.out
    assert r.err == "stap-server: server exited: NSS error (log tail: boom)\n" * 2
    assert farm.stat_files() == {}


def test_docker_unavailable_is_one_line_not_a_traceback(farm: Farm) -> None:
    def boom() -> list[object]:
        raise DockerUnavailable("cannot reach the Docker engine",
                                hint="is the docker service running?")
    farm.backend.list_servers = boom  # type: ignore[assignment,method-assign]
    r = farm.run("status")
    assert (r.rc, r.out) == (1, "")
    assert r.err == ("stap-server: cannot reach the Docker engine "
                     "(is the docker service running?)\n")


def test_start_takes_the_lock(farm: Farm) -> None:
    seen: list[bool] = []

    def check(_: ServerConfig) -> None:
        fd = os.open(farm.state_dir / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)
        finally:
            os.close(fd)
    farm.backend.on_start = check
    farm.run("start")
    assert seen == [True]


# --------------------------------------------------------------------------- stop


def test_stop_all_and_stat_files_removed(farm: Farm) -> None:
    farm.run("start", "-n", "a")
    farm.run("start", "-n", "b")
    assert set(farm.stat_files()) == {"1000.stat", "1001.stat"}
    r = farm.run("stop")
    assert r.rc == 0
    assert r.out == (f"Stopping stap-server {opts(farm, nick='a')}\nOK\n"
                     f"Stopping stap-server {opts(farm, nick='b')}\nOK\n")
    assert farm.backend.servers == {} and farm.stat_files() == {}


def test_stop_with_nothing_running(farm: Farm) -> None:
    r = farm.run("stop")
    assert (r.rc, r.out) == (0, "Stopping stap-server: OK\n")


def test_stop_listed_not_running_is_success(farm: Farm) -> None:
    r = farm.run("stop", "-a", "arm64")
    assert (r.rc, r.out) == (0, f"Stopping stap-server {opts(farm, arch='arm64')}\nOK\n")
    assert farm.backend.stopped == []


def test_stop_unknown_nickname_fails(farm: Farm) -> None:
    r = farm.run("stop", "-n", "ghost")
    assert (r.rc, r.out) == (1, "No configuration found for the nickname 'ghost'\nFAILED\n")


def test_stop_unknown_pid(farm: Farm) -> None:
    r = farm.run("stop", "-p", "4242")
    assert (r.rc, r.out, r.err) == (1, "", "stap-server: No stap-server running as pid 4242\n")


def test_stop_failure(farm: Farm) -> None:
    farm.run("start")
    farm.backend.fail_stop = lambda s: "container would not stop"
    r = farm.run("stop")
    assert r.rc == 1 and r.out.endswith("\nFAILED\n")
    assert r.err == "stap-server: container would not stop\n"
    assert set(farm.stat_files()) == {"1000.stat"}


def test_stale_stat_files_are_cleaned(farm: Farm) -> None:
    farm.stat_path.mkdir(parents=True)
    (farm.stat_path / "77.stat").write_text("ARCH=x86_64\n")
    (farm.stat_path / "notes").write_text("kept\n")
    farm.run("start")
    assert set(farm.stat_files()) == {"1000.stat", "notes"}


def test_stat_dir_cannot_be_made(farm: Farm) -> None:
    blocker = farm.root / "file"
    blocker.write_text("")
    farm.global_file.write_text(farm.global_file.read_text() + f"STAT_PATH={blocker}/run\n")
    r = farm.run("start")
    assert r.rc == 1 and farm.backend.started == []
    assert r.err.startswith(f"stap-server: Failed to make stat directory ({blocker}/run)")


# --------------------------------------------------------------------------- restart family


def test_restart_with_nothing_running_behaves_like_start(farm: Farm) -> None:
    r = farm.run("restart")
    assert r.rc == 0
    assert r.out == f"Stopping stap-server: OK\nStarting stap-server {opts(farm)}\nOK\n"


def test_restart_running_servers(farm: Farm) -> None:
    farm.run("start", "-n", "a", "--port", "5001")
    r = farm.run("restart")
    assert r.rc == 0
    assert [c[0] for c in farm.backend.calls[-3:]] == ["list", "stop", "start"]
    (s,) = farm.backend.servers.values()
    assert (s.pid, s.config.nickname, s.config.port) == (1001, "a", 5001)
    assert set(farm.stat_files()) == {"1001.stat"}


def test_restart_listed_nickname(farm: Farm) -> None:
    farm.run("start", "-n", "a")
    farm.run("start", "-n", "b")
    assert farm.run("restart", "-n", "b").rc == 0
    assert sorted(s.pid for s in farm.backend.servers.values()) == [1000, 1002]


@pytest.mark.parametrize("action", ["condrestart", "try-restart"])
def test_condrestart_with_nothing_running(farm: Farm, action: str) -> None:
    r = farm.run(action)
    assert (r.rc, r.out) == (0, "No managed stap-server is running\nOK\n")
    assert farm.backend.started == []


def test_condrestart_skips_stopped_and_restarts_running(farm: Farm) -> None:
    farm.conf("x.conf", "NICKNAME=x\n")
    farm.run("start", "-n", "a")
    r = farm.run("condrestart", "-n", "x", "-n", "a")
    assert r.rc == 0
    assert r.out.startswith(f"stap-server {opts(farm, nick='x')} is not running\nOK\n"
                            "Stopping stap-server")
    assert [c.nickname for c in farm.backend.started] == ["a", "a"]


def test_condrestart_unknown_nickname(farm: Farm) -> None:
    r = farm.run("try-restart", "-n", "ghost")
    assert (r.rc, r.out) == (1, "No configuration found for the nickname 'ghost'\nFAILED\n")


def test_force_reload_stops_all_and_starts_configured(farm: Farm) -> None:
    farm.run("start", "-a", "arm64")
    farm.conf("n.conf", "NICKNAME=n\n")
    r = farm.run("force-reload")
    assert r.rc == 0
    assert [s.config.nickname for s in farm.backend.servers.values()] == ["n"]
    assert r.out.startswith("Stopping stap-server -a \"arm64\"")


def test_reload_is_not_supported(farm: Farm) -> None:
    r = farm.run("reload")
    assert (r.rc, r.err) == (3, "stap-server: reload is not supported; use force-reload\n")


# --------------------------------------------------------------------------- status


def test_status_lines_and_exit_codes(farm: Farm) -> None:
    r = farm.run("status")
    assert (r.rc, r.out) == (3, "No managed stap-server is running\n")
    farm.run("start")
    r = farm.run("status")
    assert (r.rc, r.out) == (0, f"stap-server {opts(farm, nick='1000')} running as PID 1000\n")
    r = farm.run("status", "-a", "arm64")
    assert (r.rc, r.out) == (3, f"stap-server {opts(farm, arch='arm64')} is not running\n")
    r = farm.run("status", "-n", "ghost")
    assert (r.rc, r.out) == (3, "No configuration found for the nickname 'ghost'\n")


def test_status_stale_server(farm: Farm) -> None:
    farm.backend.add(config(farm), pid=55, running=False)
    r = farm.run("status")
    assert r.rc == 1
    assert r.out == (f"stap-server {opts(farm, nick='55')} started as PID 55 is no longer "
                     "running\n")


def test_status_reports_a_dead_server_once_then_cleans_it_up(farm: Farm) -> None:
    dead = farm.backend.add(config(farm), pid=55, running=False)
    assert farm.run("status").rc == 1
    assert farm.backend.stopped == [dead]
    r = farm.run("status")
    assert r.rc == 3


def test_status_keeps_a_server_whose_container_is_bringing_its_daemon_back(
        farm: Farm) -> None:
    # kill -9 of a daemon: the restart policy restarts its container; a `status` in that
    # window must say so and must not remove the container as if it were dead
    farm.backend.add(config(farm, nickname="back"), pid=0, running=False, settling=True)
    r = farm.run("status")
    assert r.rc == 1
    assert r.out == (f"stap-server {opts(farm, nick='back')} is starting (its container "
                     "is bringing the daemon up)\n")
    assert farm.backend.stopped == []
    doc = json.loads(farm.run("status", "--json").out)
    assert [s["state"] for s in doc["servers"]] == ["starting"]


def test_status_prints_the_backends_notices_in_text_and_json(farm: Farm) -> None:
    farm.run("start", "-n", "a")
    farm.backend.notice_lines = ["mDNS advertiser: running"]
    r = farm.run("status")
    assert r.rc == 0 and r.out.endswith("\nmDNS advertiser: running\n")
    doc = json.loads(farm.run("status", "--json").out)
    assert doc["notices"] == ["mDNS advertiser: running"]


def test_status_json(farm: Farm) -> None:
    farm.run("start", "-n", "a", "--port", "5001")
    r = farm.run("status", "--json", "-n", "a", "-n", "ghost")
    assert r.rc == 3
    doc = json.loads(r.out)
    assert doc["exit_code"] == 3
    a, ghost = doc["servers"]
    assert (a["state"], a["nickname"], a["pid"], a["port"]) == ("running", "a", 1000, 5001)
    assert a["config"]["arch"] == "x86_64" and a["config"]["releases"] == ["6.1.0-test"]
    assert ghost == {"state": "unknown", "nickname": "ghost", "pid": None, "port": None,
                     "container": None, "certinfo": None, "config": None}
    assert json.loads(farm.run("status", "--json").out)["exit_code"] == 0


def test_json_only_for_status(farm: Farm) -> None:
    r = farm.run("start", "--json")
    assert r.rc == 2 and "--json is only for status" in r.err


def test_status_takes_no_lock(farm: Farm) -> None:
    farm.run("status")
    assert not (farm.state_dir / "lock").exists()


# --------------------------------------------------------------------------- usage & config errors


@pytest.mark.parametrize("argv, message", [
    (["start", "-x"], "unknown option -x"),
    (["start", "--prot", "1"], "unknown option --prot (did you mean --port?)"),
    (["start", "-a"], "option -a needs a value"),
    (["start", "--port"], "option --port needs a value"),
    (["start", "--port", "http"], "--port: 'http' is not a port number (0-65535)"),
    (["start", "--port=70000"], "--port: '70000' is not a port number"),
    (["start", "--max-threads", "-1"], "--max-threads: '-1' is not a thread count"),
    (["start", "--max-request-size", "0"], "--max-request-size: '0' is not a size in bytes"),
    (["start", "--strategy", "fast"], "--strategy: 'fast' is not one of"),
    (["start", "-a", "sparc"], "-a: unknown architecture 'sparc'"),
    (["stop", "-p", "abc"], "-p: 'abc' is not a process id"),
    (["start", "extra"], "unexpected argument 'extra'"),
    (["start", "-ifoo"], "option -i takes no value"),
    (["start", "--json=1"], "option --json takes no value"),
    (["start", "--log="], "--log needs a non-empty path"),
    (["strat"], "unknown action 'strat' (did you mean 'start'?)"),
])
def test_usage_errors_exit_2(farm: Farm, argv: list[str], message: str) -> None:
    r = farm.run(*argv)
    assert r.rc == 2 and r.out == ""
    first, hint = r.err.splitlines()
    assert first.startswith(f"stap-server: {message}")
    assert hint == "Try 'stap-server --help' for more information."
    assert farm.backend.calls == []


def test_no_action_prints_usage_and_exits_2(farm: Farm) -> None:
    r = farm.run()
    assert r.rc == 2 and r.err.startswith("Usage: stap-server {start|stop|restart|")


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["start", "--help"], ["status", "-h"]])
def test_help(farm: Farm, argv: list[str]) -> None:
    r = farm.run(*argv)
    assert r.rc == 0 and r.out.startswith("Usage: stap-server")
    assert f"the default is {MRS} bytes" in r.out and "50000 and 5000" in r.out
    assert farm.backend.calls == []


def test_config_errors_name_file_and_line_exit_1(farm: Farm) -> None:
    path = farm.conf("bad.conf", "ARHC=x86_64\nPORT=x\n")
    r = farm.run("start")
    assert r.rc == 1 and farm.backend.started == []
    assert r.err == (f"stap-server: {path}:1: unknown variable 'ARHC' (did you mean ARCH?)\n"
                     f"stap-server: {path}:2: PORT: 'x' is not a port number (0-65535)\n")


def test_global_config_error(farm: Farm) -> None:
    farm.global_file.write_text("LOGFILE=/x\n")
    r = farm.run("status")
    assert r.rc == 1
    assert r.err == (f"stap-server: {farm.global_file}:1: unknown variable 'LOGFILE' "
                     "(did you mean LOG_FILE?)\n")


def test_bad_environment_variable_is_one_line_exit_1_before_anything_runs(farm: Farm) -> None:
    farm.environ.update(STAPFARM_PREFIX="my farm", STAPFARM_SERVER_UID="\u00e9t\u00e9")
    r = farm.run("start")
    assert (r.rc, r.out, farm.backend.calls) == (1, "", [])
    assert r.err == (
        "stap-server: environment: STAPFARM_PREFIX: 'my farm' is not a word Docker accepts in "
        "names (letters, digits, '_', '.', '-', a letter or digit first, at most 64 "
        "characters)\n"
        "stap-server: environment: STAPFARM_SERVER_UID: '\u00e9t\u00e9' is not a user id "
        "(1-4294967294; a compile server never runs as root)\n")


def test_environment_reaches_the_backend_factory(farm: Farm,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []

    def factory(g: object, environ: object) -> object:
        seen.append(g)
        return farm.backend

    monkeypatch.setattr(tools, "farm_backend", factory)
    farm.environ.update(STAPFARM_PREFIX="second", STAPFARM_HOSTNAME="farm2.example")
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["status"], environ=farm.environ, stdout=out, stderr=err,
                    host=farm.host) == 3
    (g,) = seen
    assert isinstance(g, GlobalConfig)
    assert (g.prefix, g.hostname, g.server_ids) == ("second", "farm2.example", (155, 155))


def test_c_missing_file(farm: Farm) -> None:
    r = farm.run("start", "-c", "/nonexistent/stap.conf")
    assert (r.rc, r.err) == (1, ("stap-server: /nonexistent/stap.conf: no such configuration "
                                "file\n"))


def test_c_is_read_before_n_is_resolved(farm: Farm) -> None:
    other = farm.root / "other.d"
    other.mkdir()
    (other / "x.conf").write_text("NICKNAME=x\nARCH=arm64\n")
    c = farm.root / "extra.conf"
    c.write_text(f"CONFIG_PATH={other}\n")
    r = farm.run("start", "-n", "x", "-c", str(c))
    assert r.rc == 0 and farm.backend.started[0].arch == "arm64"


def test_unreadable_conf_via_hypothesis_style_bytes(farm: Farm) -> None:
    farm.config_path.mkdir(parents=True)
    (farm.config_path / "bin.conf").write_bytes(b"PORT=1\n\xff\xfe\x00\n")
    r = farm.run("start")
    assert r.rc == 1 and "bin.conf:2: not valid UTF-8 text" in r.err


def test_farm_tool_actions_are_dispatched(farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[object] = []

    def fake(argv: list[str], environ: object, out: io.StringIO, err: object) -> int:
        got.append((argv, environ))
        out.write("tool ran\n")
        return 7
    monkeypatch.setitem(tools.ACTIONS, "frobnicate", fake)
    r = farm.run("frobnicate", "--x", "y")
    assert (r.rc, r.out) == (7, "tool ran\n")
    assert got == [(["--x", "y"], farm.environ)]


def test_backend_is_built_lazily_from_docker_backend(farm: Farm,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []

    def factory(g: object, environ: object) -> object:
        built.append((g, environ))
        return farm.backend

    monkeypatch.setattr(tools, "farm_backend", factory)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["status"], environ=farm.environ, stdout=out, stderr=err,
                    host=farm.host) == 3
    assert len(built) == 1
    assert cli.main(["--help"], environ=farm.environ, stdout=out, stderr=err) == 0
    assert len(built) == 1


# --------------------------------------------------------------------------- upstream bugs (§1.11)


def test_bug1_stop_p_really_stops_a_server_started_with_port(farm: Farm) -> None:
    farm.run("start", "-n", "web", "--port", "5001", "--ssl", "/db", "--max-threads", "2")
    assert farm.run("status", "-n", "web").rc == 0
    r = farm.run("stop", "-p", "1000")
    assert r.rc == 0 and [s.pid for s in farm.backend.stopped] == [1000]
    assert farm.backend.servers == {}


def test_bug2_n_of_running_server_neither_duplicates_arrays_nor_drops_nickname(
        farm: Farm) -> None:
    farm.run("start", "-n", "x", "-D", "FOO=1", "-I", "/t")
    r = farm.run("start", "-n", "x")
    assert r.rc == 0 and len(farm.backend.started) == 1
    assert r.out == (f'Starting stap-server -a "x86_64" -r "6.1.0-test" -D "FOO=1" -I "/t" '
                     f'-u "alice" -n "x" --log "{farm.log_file}" {SIZES}\nOK\n')


def test_bug3_nicknames_in_conf_files_are_honoured(farm: Farm) -> None:
    farm.conf("n.conf", "NICKNAME=native\nLOG=/logs/native\nPORT=5005\n")
    farm.run("start")
    assert farm.backend.started[0].nickname == "native"
    assert "NICKNAME=native\n" in farm.stat_files()["1000.stat"]
    assert farm.run("stop", "-n", "native").rc == 0 and farm.backend.servers == {}


def test_bug4_liveness_is_the_backends_not_a_pid_substring(farm: Farm) -> None:
    farm.backend.add(config(farm, nickname="dead"), pid=12, running=False)
    farm.backend.add(config(farm, nickname="live"), pid=123)
    r = farm.run("status", "-p", "12")
    assert r.rc == 1 and "started as PID 12 is no longer running" in r.out
    assert farm.run("status", "-p", "123").rc == 0


def test_bug5_a_server_that_dies_at_start_is_failed_not_ok(farm: Farm) -> None:
    farm.backend.fail_start = lambda c: "stap-serverd exited before listening"
    r = farm.run("start")
    assert (r.rc, r.out) == (1, f"Starting stap-server {opts(farm)}\nFAILED\n")
    assert "exited before listening" in r.err and farm.stat_files() == {}


def test_bug6_relative_paths_resolve_from_the_working_directory(farm: Farm) -> None:
    (farm.modules_dir / "6.1.0-test" / "build").mkdir(parents=True)
    work = Path(farm.host.cwd)
    (work / "my.conf").write_text(f"LOG_FILE={work}/default.log\n")
    r = farm.run("start", "-i", "-c", "my.conf", "--log", "srv.log", "--ssl", "db")
    assert r.rc == 0
    (c,) = farm.backend.started
    assert (c.log, c.ssl) == (f"{work}/srv.log", f"{work}/db")
    assert farm.run("start", "-c", "my.conf", "-a", "arm64").rc == 0
    assert farm.backend.started[1].log == f"{work}/default.log"


def test_bug7_P_is_refused_with_the_reason(farm: Farm) -> None:
    r = farm.run("start", "-P")
    assert r.rc == 2 and "cannot prompt for a certificate database password" in r.err
    assert farm.backend.calls == []
    assert farm.run("start", "-k").rc == 2


def test_bug8_certificates_do_not_depend_on_home(farm: Farm) -> None:
    env = {k: v for k, v in farm.environ.items() if k != "HOME"}
    env["SYSTEMTAP_DIR"] = "/elsewhere"
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["start"], environ=env, stdout=out, stderr=err, backend=farm.backend,
                  host=Host(arch="x86_64", release="6.1.0-test", euid=1000, user="alice",
                            cwd=farm.host.cwd))
    assert (rc, err.getvalue()) == (0, "")
    assert "Failed to make certificates" not in out.getvalue()
    assert farm.backend.started[0].ssl == ""  # the backend's own certificate database


def test_naming_a_running_servers_own_release_again_is_the_same_server(farm: Farm) -> None:
    assert farm.run("start", "-n", "x", "-r", "6.1.0-test").rc == 0
    r = farm.run("start", "-a", "x86_64", "-r", "6.1.0-test", "-n", "x")
    assert r.rc == 0
    assert len(farm.backend.started) == 1  # no second server with "-r R -r R"


# --------------------------------------------------------------------------- the manual, complete
# Issue "The manual, complete on a real host".


def test_c_twice_the_last_file_wins(farm: Farm) -> None:
    first = farm.root / "first.conf"
    first.write_text("STAP_USER=first\nLOG_FILE=/first/log\n")
    last = farm.root / "last.conf"
    last.write_text("STAP_USER=last\n")
    r = farm.run("start", "-c", str(first), "-c", str(last))
    assert (r.rc, r.err) == (0, "")
    (c,) = farm.backend.started
    # the default global file is still read first (its LOG_FILE), then only the last -c
    assert (c.user, c.log) == ("last", farm.log_file)


def test_c_twice_an_earlier_missing_file_is_not_read(farm: Farm) -> None:
    last = farm.root / "last.conf"
    last.write_text("STAP_USER=last\n")
    r = farm.run("start", "-c", "/nonexistent/first.conf", "-c", str(last))
    assert (r.rc, r.err) == (0, "")
    assert farm.backend.started[0].user == "last"
    r = farm.run("start", "-c", str(last), "-c", "/nonexistent/last.conf", "-a", "arm64")
    assert r.rc == 1 and "/nonexistent/last.conf: no such configuration file" in r.err


def test_clone_of_a_configured_server_is_named_by_its_pid(farm: Farm) -> None:
    farm.conf("native.conf", "NICKNAME=native\nDEFINE=A\n")
    assert farm.run("start").rc == 0
    r = farm.run("start", "-n", "native", "-a", "arm64")
    assert r.rc == 0 and '-n "native"' not in r.out
    native, clone = farm.backend.started
    assert (native.nickname, clone.nickname, clone.define) == ("native", "", ("A",))
    status = farm.run("status", "-n", "native")
    assert status.rc == 0 and status.out.count("running as PID") == 1
    assert farm.run("stop", "-n", "native").rc == 0
    assert [s.pid for s in farm.backend.servers.values()] == [1001]
    assert farm.run("stop", "-n", "1001").rc == 0 and farm.backend.servers == {}


def test_configured_server_named_with_its_own_values_keeps_its_nickname(farm: Farm) -> None:
    farm.conf("native.conf", "NICKNAME=native\nPORT=5001\n")
    r = farm.run("start", "-n", "native", "-r", "6.1.0-test", "--port", "5001")
    assert r.rc == 0 and farm.backend.started[0].nickname == "native"


def test_two_conf_files_with_one_nickname_are_refused_naming_both(farm: Farm) -> None:
    a = farm.conf("a.conf", "NICKNAME=twin\n")
    b = farm.conf("b.conf", "ARCH=arm64\nNICKNAME=twin\n")
    farm.conf("c.conf", "NICKNAME=other\n")
    r = farm.run("start")
    assert r.rc == 1
    assert [c.nickname for c in farm.backend.started] == ["other"]
    assert r.out.count("FAILED") == 2 and r.out.count("OK") == 1
    assert r.err == (f"stap-server: {a}:1: NICKNAME 'twin' is also set in {b}:2 "
                     "(a nickname names one server)\n"
                     f"stap-server: {b}:2: NICKNAME 'twin' is also set in {a}:1 "
                     "(a nickname names one server)\n")
    r = farm.run("start", "-n", "twin")
    assert r.rc == 1 and f"{a}:1:" in r.err and f"{b}:2" in r.err
    assert len(farm.backend.started) == 1  # not a new server named twin


MANUAL_I386 = "ARCH=i386\nRELEASE=2.6.18-128.el5\nPORT=5001\nLOG=/path/to/log/file\n"


def test_manual_i386_example_fails_alone_and_the_others_work(farm: Farm) -> None:
    farm.conf("good.conf", "NICKNAME=good\n")
    bad = farm.conf("specific.conf", MANUAL_I386)
    farm.conf("z.conf", "ARCH=arm64\n")
    r = farm.run("start")
    assert r.rc == 1
    assert r.out == (f"Starting stap-server {opts(farm, nick='good')}\nOK\n"
                     'Starting stap-server -a "i386" -r "2.6.18-128.el5" -u "alice" '
                     '--log "/path/to/log/file" --port "5001"\nFAILED\n'
                     f"Starting stap-server {opts(farm, arch='arm64')}\nOK\n")
    assert r.err == (f"stap-server: {bad}:1: ARCH: unknown architecture 'i386' "
                     "(supported: arm64, x86_64)\n")
    assert [c.nickname for c in farm.backend.started] == ["good", ""]
    assert farm.run("status", "-n", "good") == Result(
        0, f"stap-server {opts(farm, nick='good')} running as PID 1000\n", "")
    r = farm.run("stop", "-n", "good")
    assert (r.rc, r.err) == (0, "") and [s.pid for s in farm.backend.servers.values()] == [1001]


def test_status_without_arguments_lists_running_and_warns_about_bad_files(farm: Farm) -> None:
    farm.conf("good.conf", "NICKNAME=good\n")
    assert farm.run("start").rc == 0
    bad = farm.conf("specific.conf", MANUAL_I386)
    r = farm.run("status")
    assert r.rc == 0
    assert r.out == f"stap-server {opts(farm, nick='good')} running as PID 1000\n"
    assert r.err == (f"stap-server: warning: {bad}:1: ARCH: unknown architecture 'i386' "
                     "(supported: arm64, x86_64)\n")
    farm.run("stop")
    r = farm.run("status")
    assert r.rc == 3 and r.err.startswith("stap-server: warning: ")


def test_syntax_errors_in_a_conf_name_file_and_line_and_others_start(farm: Farm) -> None:
    bad = farm.conf("a.conf", "NICKNAME=broken\n  PORT=5001\nARHC=x\n")
    farm.conf("b.conf", "NICKNAME=fine\n")
    r = farm.run("start")
    assert r.rc == 1 and [c.nickname for c in farm.backend.started] == ["fine"]
    assert r.out.startswith(f'Starting stap-server -a "x86_64" -r "6.1.0-test" -u "alice" '
                            f'-n "broken" --log "{farm.log_file}"\nFAILED\n')
    assert r.err.splitlines() == [
        (f'stap-server: {bad}:2: invalid input "  PORT=5001": expected VARIABLE=VALUE '
         "(no spaces around the name; this is not a shell script)"),
        f"stap-server: {bad}:3: unknown variable 'ARHC' (did you mean ARCH?)"]
    # naming the bad server says why, naming the good one ignores the bad file
    r = farm.run("start", "-n", "broken")
    assert r.rc == 1 and f"{bad}:2: invalid input" in r.err and r.out == ""
    assert farm.run("status", "-n", "fine") == Result(
        0, f"stap-server {opts(farm, nick='fine')} running as PID 1000\n", "")


def test_unknown_nickname_warns_about_a_bad_file_that_may_be_it(farm: Farm) -> None:
    bad = farm.conf("a.conf", "not a line\n")
    r = farm.run("stop", "-n", "ghost")
    assert (r.rc, r.out) == (1, "No configuration found for the nickname 'ghost'\nFAILED\n")
    assert r.err == (f'stap-server: warning: {bad}:1: invalid input "not a line": '
                     "expected VARIABLE=VALUE\n")


@pytest.mark.parametrize("action", ["force-reload", "restart"])
def test_restart_family_reports_a_bad_file_in_its_place(farm: Farm, action: str) -> None:
    farm.conf("a.conf", MANUAL_I386)
    farm.conf("b.conf", "NICKNAME=b\n")
    r = farm.run(action)
    assert r.rc == 1 and "FAILED" in r.out and [c.nickname for c in farm.backend.started] == ["b"]


def test_config_path_that_cannot_be_listed(farm: Farm) -> None:
    farm.config_path.write_text("")
    r = farm.run("status")
    assert r.rc == 3 and r.err == f"stap-server: warning: {farm.config_path}: CONFIG_PATH is " \
                                   "not a directory\n"
    r = farm.run("start")
    assert r.rc == 1 and "CONFIG_PATH is not a directory" in r.err and farm.backend.calls[-1] == (
        "list", None)


@pytest.mark.parametrize("argv, message", [
    (["start", "--port", "9" * 5000], ("--port: '99999999999999999999...99999999 (5000 "
                                       "characters)' is not a port number (0-65535)")),
    (["start", "--port=065536"], "--port: '065536' is not a port number (0-65535)"),
    (["start", "--max-threads", "1025"], "--max-threads: '1025' is not a thread count (0-1024)"),
    (["start", "--max-threads", "1" * 4400], "--max-threads: '"),
    (["start", "--max-request-size", str((1 << 30) + 1)],
     "--max-request-size: '1073741825' is not a size in bytes (1-1073741824, i.e. at most 1 GiB)"),
    (["start", "--max-compressed-request", "7" * 9000], "--max-compressed-request: '"),
    (["stop", "-p", "1" * 5000], "-p: '"),
    (["stop", "-p", "4194305"], "-p: '4194305' is not a process id (1-4194304)"),
    (["start", "--port", "٣"], "--port: '٣' is not a port number"),
])
def test_numbers_are_bounded_with_the_limit_named(farm: Farm, argv: list[str],
                                                  message: str) -> None:
    r = farm.run(*argv)
    assert r.rc == 2 and farm.backend.calls == []
    assert r.err.splitlines()[0].startswith(f"stap-server: {message}")


def test_huge_numbers_in_a_conf_fail_that_server_only(farm: Farm) -> None:
    bad = farm.conf("a.conf", f"PORT={'9' * 5000}\nMAXTHREADS={'1' * 4400}\n"
                              f"MAXREQSIZE={'2' * 4400}\nMAXCOMPRESSEDREQ=1073741825\n")
    farm.conf("b.conf", "NICKNAME=b\n")
    r = farm.run("start")
    assert r.rc == 1 and [c.nickname for c in farm.backend.started] == ["b"]
    lines = r.err.splitlines()
    assert [ln.split(": ")[1] for ln in lines] == [f"{bad}:{n}" for n in (1, 2, 3, 4)]
    assert "(0-65535)" in lines[0] and "(0-1024)" in lines[1] and "1 GiB" in lines[3]


def test_cpus_beyond_the_cap_is_a_config_error(farm: Farm) -> None:
    farm.global_file.write_text(farm.global_file.read_text() + "CPUS=1e308\n")
    r = farm.run("start")
    assert r.rc == 1 and farm.backend.calls == []
    assert r.err == (f"stap-server: {farm.global_file}:7: CPUS: '1e308' is not a CPU count "
                     "(0 = all, else 0.01-1024)\n")


def _strict_main(farm: Farm, *argv: str) -> tuple[int, bytes, bytes]:
    """main() writing to strict UTF-8 streams, as a real terminal's would be."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="strict", write_through=True)
    rc = cli.main(list(argv), environ=farm.environ, stdout=out, stderr=err,
                  backend=farm.backend, host=farm.host)
    out.flush()
    err.flush()
    return rc, out_b.getvalue(), err_b.getvalue()


def test_non_utf8_values_are_refused_and_printed_escaped(farm: Farm) -> None:
    nick = b"caf\xe9".decode("utf-8", "surrogateescape")  # argv as Python decodes it
    rc, out, err = _strict_main(farm, "start", "-n", nick)
    assert (rc, out) == (2, b"")
    assert err.startswith(b"stap-server: -n: 'caf\\xe9' is not valid UTF-8 text")
    assert farm.backend.calls == []
    rc, out, err = _strict_main(farm, "st\udcffart")
    assert rc == 2 and err.startswith(b"stap-server: unknown action 'st\\xffart'")
    rc, _, err = _strict_main(farm, "status", "-c", "/nonexistent/\udcff.conf")
    assert rc == 1 and err == b"stap-server: /nonexistent/\\xff.conf: no such configuration file\n"


def test_a_conf_file_name_that_is_not_utf8(farm: Farm) -> None:
    farm.conf("b.conf", "NICKNAME=b\n")
    with open(os.fsencode(farm.config_path) + b"/\xff.conf", "w") as f:
        f.write("NICKNAME=odd\n")
    rc, out, err = _strict_main(farm, "start")
    assert rc == 1 and [c.nickname for c in farm.backend.started] == ["b"]
    assert err.endswith(b"/\\xff.conf: the file name is not valid UTF-8 (rename it)\n")
    assert b"FAILED" in out


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_values_with_line_breaks_are_refused(farm: Farm, value: str) -> None:
    r = farm.run("start", "-n", value)
    assert r.rc == 2 and farm.backend.calls == []
    assert r.err.startswith("stap-server: -n: the value contains a line break or a NUL")


@pytest.mark.parametrize("argv, message", [
    (["start", "-n", ""], "option -n needs a nickname, not an empty value"),
    (["start", "-r", ""], "option -r needs a kernel release or build tree, not an empty value"),
    (["start", "-I", ""], "option -I needs a directory, not an empty value"),
    (["start", "-R", ""], "option -R needs a directory, not an empty value"),
    (["start", "-B", ""], "option -B needs a 'make' option, not an empty value"),
    (["start", "-u", ""], "option -u needs a user name, not an empty value"),
    (["start", "-c", ""], "option -c needs a file name, not an empty value"),
    (["stop", "-n", ""], "option -n needs a nickname, not an empty value"),
    (["start", "--ssl="], "--ssl needs a non-empty path"),
    (["start", "--log", ""], "--log needs a non-empty path"),
])
def test_empty_values_are_usage_errors(farm: Farm, argv: list[str], message: str) -> None:
    r = farm.run(*argv)
    assert (r.rc, r.out) == (2, "") and farm.backend.calls == []
    assert r.err == (f"stap-server: {message}\n"
                     "Try 'stap-server --help' for more information.\n")


def test_deleted_working_directory(farm: Farm, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()

    def run(*argv: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        rc = cli.main(list(argv), environ=farm.environ, stdout=out, stderr=err,
                      backend=farm.backend)  # the real Host.current()
        return Result(rc, out.getvalue(), err.getvalue())

    assert run("status").rc == 3
    r = run("start", "-I", "tapsets")
    assert (r.rc, farm.backend.started) == (1, [])
    assert r.err == ("stap-server: -I tapsets: a relative path, and the working directory no "
                     "longer exists (give an absolute path)\n")
    assert run("start", "-c", "my.conf").rc == 1
    assert run("start", "--log", "x.log").rc == 1
    r = run("start", "-I", "/abs/tapsets", "-u", "root-not")
    assert r.rc == 1 and "no such user" in r.err  # the real user database


# --------------------------------------------------------------------------- -u USER


def test_u_user_in_the_group_as_supplementary_or_primary(farm: Farm) -> None:
    assert farm.run("start", "-u", "bob").rc == 0
    assert farm.run("start", "-u", "stap-server", host=farm.as_root()).rc == 0
    assert [c.user for c in farm.backend.started] == ["bob", "stap-server"]


@pytest.mark.parametrize("user, message", [
    ("nosuch", "-u nosuch: no such user"),
    ("mallory", ("-u mallory: user 'mallory' is not a member of the 'stap-server' group "
                 "(usermod -a -G stap-server mallory)")),
])
def test_u_user_must_exist_and_be_in_the_group(farm: Farm, user: str, message: str) -> None:
    for action in ("start", "restart", "force-reload", "condrestart"):
        r = farm.run(action, "-u", user)
        assert (r.rc, r.out, r.err) == (1, "", f"stap-server: {message}\n")
    assert farm.backend.calls == []  # checked before anything is started (or even listed)


def test_u_without_a_stap_server_group(farm: Farm) -> None:
    del farm.host.accounts.groups["stap-server"]  # type: ignore[attr-defined]
    r = farm.run("start", "-u", "bob")
    assert r.rc == 1 and r.err == ("stap-server: -u bob: there is no 'stap-server' group on "
                                   "this host (scripts/setup.sh creates it)\n")


def test_u_is_not_checked_to_stop_or_report(farm: Farm) -> None:
    farm.backend.add(config(farm, user="gone"), pid=7)
    assert farm.run("status", "-u", "gone").rc == 0
    r = farm.run("stop", "-u", "gone")
    assert r.rc == 0 and [s.pid for s in farm.backend.stopped] == [7]


def test_undecodable_bytes_show_as_hex_on_any_terminal(farm: Farm) -> None:
    for errors in ("backslashreplace", "strict"):  # sys.stderr's, a UTF-8 terminal's
        err_b = io.BytesIO()
        err = io.TextIOWrapper(err_b, encoding="utf-8", errors=errors, write_through=True)
        assert cli.main(["st\udcffart"], environ=farm.environ, stdout=io.StringIO(),
                        stderr=err, backend=farm.backend, host=farm.host) == 2
        assert err_b.getvalue().startswith(b"stap-server: unknown action 'st\\xffart'")
    out_b = io.BytesIO()  # a terminal that is not UTF-8 at all
    out = io.TextIOWrapper(out_b, encoding="ascii", errors="strict", write_through=True)
    assert cli.main(["start", "-n", "caf\u00e9"], environ=farm.environ, stdout=out,
                    stderr=io.StringIO(), backend=farm.backend, host=farm.host) == 0
    assert b'-n "caf\\xe9"' in out_b.getvalue()
    assert farm.backend.started[0].nickname == "caf\u00e9"
