"""Configuration files: the manual's examples, defaults, every error, and arbitrary bytes."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.core.backend import RunningServer
from farm.core.errors import ConfigError, FarmError
from farm.core.spec import DEFAULT_MAX_REQUEST_SIZE, GlobalConfig, ServerConfig, Strategy
from farm.manual import statfile
from farm.manual.config import (
    CONFIG_FILE_ENV,
    ENVIRONMENT,
    apply_environment,
    default_global,
    load_global,
    parse_global_text,
)
from farm.manual.config_lines import bounded_int, decode_config_bytes, read_config_text, shown
from farm.manual.host import Account, Group, Host, SystemAccounts, server_user_problem
from farm.manual.server_config import (
    ServerDraft,
    load_server_configs,
    parse_server_text,
    resolve_bad_file,
    resolve_server,
)

HOST = Host(arch="x86_64", release="6.1.0-test", euid=1000, user="alice", cwd="/work")
G = GlobalConfig(config_path="/c", stat_path="/s", log_file="/l/log")


def problems(text: str, path: str = "f.conf") -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_server_text(text, path)
    return e.value.problems


# --------------------------------------------------------------------------- manual examples


def test_manual_example_native_blank_fields_take_defaults() -> None:
    d = parse_server_text("ARCH=\nUSER=\nRELEASE=\nNICKNAME=native\n", "native.conf")
    c = resolve_server(d, G, HOST)
    assert (c.arch, c.releases, c.user, c.nickname, c.log) == (
        "x86_64", ("6.1.0-test",), "alice", "native", "/l/log")


def test_manual_example_specific_arch_i386_is_reported_with_file_and_line() -> None:
    text = "ARCH=i386\nRELEASE=2.6.18-128.el5\nPORT=5001\nLOG=/path/to/log/file\n"
    (msg,) = problems(text, "specific.conf")
    assert msg.startswith("specific.conf:1: ARCH: unknown architecture 'i386'")
    assert "x86_64" in msg  # the supported ones are listed


def test_manual_example_specific_parses_for_a_supported_arch() -> None:
    text = "ARCH=amd64\nRELEASE=2.6.18-128.el5\nPORT=5001\nLOG=/path/to/log/file\n"
    c = resolve_server(parse_server_text(text, "s.conf"), G, HOST)
    assert (c.arch, c.releases, c.port, c.log) == (
        "x86_64", ("2.6.18-128.el5",), 5001, "/path/to/log/file")


def test_manual_example_complicated_keeps_build_quotes() -> None:
    text = ("USER=serveruser\n"
            "RELEASE=/kernels/2.6.18-92.1.18.el5/build\n"
            "INCLUDE=/mytapsets\n"
            "INCLUDE+=/yourtapsets\n"
            "BUILD='VARIABLE1=VALUE1 VARIABLE2=VALUE2'\n"
            "DEFINE=STP_MAXMEMORY=1024\n"
            "DEFINE+=DEBUG_TRANS\n"
            "RUNTIME=/myruntime\n"
            "NICKNAME=my-server\n"
            "SSL=/path/to/NSS/certificate/database\n")
    c = resolve_server(parse_server_text(text, "c.conf"), G, HOST)
    assert c == ServerConfig(
        arch="x86_64", releases=("/kernels/2.6.18-92.1.18.el5/build",),
        build=("'VARIABLE1=VALUE1 VARIABLE2=VALUE2'",),
        include=("/mytapsets", "/yourtapsets"), define=("STP_MAXMEMORY=1024", "DEBUG_TRANS"),
        runtime="/myruntime", user="serveruser", nickname="my-server", log="/l/log",
        ssl="/path/to/NSS/certificate/database", max_request_size=DEFAULT_MAX_REQUEST_SIZE,
        max_compressed_request=c.max_compressed_request, source="c.conf")


def test_manual_global_example_config_path_of_a_user(tmp_path: Path) -> None:
    user = pwd.getpwuid(0).pw_name
    home = pwd.getpwuid(0).pw_dir.rstrip("/")
    g = parse_global_text(f"CONFIG_PATH=~{user}/my-stap-server-configs\n"
                          "LOG_FILE=/tmp/stap-server/log\n", "g", G, {}, 1000)
    assert g.config_path == f"{home}/my-stap-server-configs"
    assert g.log_file == "/tmp/stap-server/log"
    assert g.sources == ("g",)


def test_global_tilde_alone_is_home() -> None:
    g = parse_global_text("CONFIG_PATH=~/confs\nSTATE_DIR=~\n", "g", G, {"HOME": "/h/al"}, 1000)
    assert (g.config_path, g.state_dir) == ("/h/al/confs", "/h/al")


def test_global_tilde_unknown_user() -> None:
    with pytest.raises(ConfigError, match=r"g:1: CONFIG_PATH: no such user in '~nosuchuser-x/a'"):
        parse_global_text("CONFIG_PATH=~nosuchuser-x/a\n", "g", G, {}, 1000)


# --------------------------------------------------------------------------- arrays


def test_array_assign_resets_append_adds_empty_clears() -> None:
    d = parse_server_text("DEFINE=A\nDEFINE+=B\nDEFINE=C\nDEFINE+=D\n", "f")
    assert d.define == ["C", "D"]
    assert parse_server_text("BUILD=x\nBUILD=\n", "f").build == []
    assert parse_server_text("BUILD=x\nBUILD=()\n", "f").build == []
    assert parse_server_text("RELEASE=a\nRELEASE+=b\n", "f").releases == ["a", "b"]


def test_include_append_empty_is_ignored_upstream_off_by_one_fixed() -> None:
    assert parse_server_text("INCLUDE=/a\nINCLUDE+=\n", "f").include == ["/a"]


def test_values_are_literal_not_shell() -> None:
    d = parse_server_text('DEFINE="X=1"  \nNICKNAME=$HOME # no\n', "f")
    assert d.define == ['"X=1"  ']
    assert d.nickname == "$HOME # no"


def test_comments_blank_lines_and_crlf() -> None:
    d = parse_server_text("# c\n\n   \n  # indented comment\r\nPORT=5001\r\n", "f")
    assert d.port == 5001


# --------------------------------------------------------------------------- errors


def test_all_problems_reported_in_one_pass_with_file_and_line() -> None:
    text = "ARHC=x86_64\nPORT=abc\nnot a line\nMAXTHREADS=-1\nSTRATEGY=fast\nARCH+=arm64\n"
    assert problems(text, "/c/a.conf") == [
        "/c/a.conf:1: unknown variable 'ARHC' (did you mean ARCH?)",
        "/c/a.conf:2: PORT: 'abc' is not a port number (0-65535)",
        '/c/a.conf:3: invalid input "not a line": expected VARIABLE=VALUE',
        "/c/a.conf:4: MAXTHREADS: '-1' is not a thread count (0-1024)",
        "/c/a.conf:5: STRATEGY: 'fast' is not one of auto|native|cross|emulated",
        "/c/a.conf:6: ARCH is not an array; write ARCH=arm64",
    ]


def test_unknown_variable_without_near_miss_has_no_hint() -> None:
    assert problems("ZZZZZZ=1\n") == ["f.conf:1: unknown variable 'ZZZZZZ'"]


def test_indented_assignment_is_explained() -> None:
    (msg,) = problems("  PORT=5001\n")
    assert "not a shell script" in msg and msg.startswith("f.conf:1:")


@pytest.mark.parametrize("line, needle", [
    ("PORT=70000", "PORT: '70000' is not a port number"),
    ("MAXREQSIZE=0", "MAXREQSIZE: '0' is not a size in bytes (1-1073741824, i.e. at most 1 GiB)"),
    ("MAXCOMPRESSEDREQ=1k", "MAXCOMPRESSEDREQ: '1k' is not a size in bytes"),
    ("USER=root", "USER=root: a compile server never runs as root"),
    ("LOG=relative/log", "LOG: 'relative/log' is not an absolute path"),
    ("INCLUDE+=tapsets", "INCLUDE: 'tapsets' is not an absolute path"),
    ("ARCH=sparc", "ARCH: unknown architecture 'sparc'"),
    ("NICKNAME=a\0b", "contains a NUL byte"),
])
def test_bad_values(line: str, needle: str) -> None:
    (msg,) = problems(line + "\n")
    assert msg.startswith("f.conf:1: ") and needle in msg


def test_arch_aliases_normalised() -> None:
    assert parse_server_text("ARCH=aarch64\n", "f").arch == "arm64"
    assert parse_server_text("STRATEGY=Cross\n", "f").strategy is Strategy.CROSS


def test_not_utf8_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^f:2: not valid UTF-8 text$"):
        decode_config_bytes(b"PORT=1\nNICKNAME=\xff\n", "f")


def test_load_server_configs_sorted_and_problems_of_every_file(tmp_path: Path) -> None:
    # Changed by "The manual, complete on a real host" (3): bad files are returned beside
    # the good ones (in file-name order) instead of one ConfigError for all.
    (tmp_path / "b.conf").write_text("NICKNAME=b\n")
    (tmp_path / "a.conf").write_text("NICKNAME=a\n")
    (tmp_path / "notes.txt").write_text("garbage\n")
    assert [d.nickname for d in load_server_configs(str(tmp_path)).good] == ["a", "b"]
    (tmp_path / "c.conf").write_text("PORT=x\n")
    (tmp_path / "d.conf").write_text("BAD\n")
    files = load_server_configs(str(tmp_path))
    assert [d.nickname for d in files.good] == ["a", "b"]
    assert [b.path for b in files.bad] == [str(tmp_path / "c.conf"), str(tmp_path / "d.conf")]
    assert [p.split(":")[0] for b in files.bad for p in b.problems] == [
        str(tmp_path / "c.conf"), str(tmp_path / "d.conf")]
    assert [type(e).__name__ for e in files.entries] == [
        "ServerDraft", "ServerDraft", "BadServerFile", "BadServerFile"]


def test_missing_config_path_means_no_configured_servers(tmp_path: Path) -> None:
    assert load_server_configs(str(tmp_path / "nope")).entries == ()


def test_config_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="CONFIG_PATH is not a directory"):
        load_server_configs(str(tmp_path / "f"))


# --------------------------------------------------------------------------- global


def test_defaults_for_root_are_upstreams() -> None:
    g = default_global({}, 0)
    assert (g.config_path, g.stat_path, g.log_file, g.state_dir) == (
        "/etc/stap-server/conf.d", "/var/run/stap-server", "/var/log/stap-server/log",
        "/var/lib/stapfarm")


def test_defaults_for_a_user_are_per_user() -> None:
    g = default_global({"HOME": "/home/al"}, 1000)
    assert g.config_path == "/home/al/.config/stap-server/conf.d"
    assert g.state_dir == "/home/al/.local/state/stapfarm"
    assert g.stat_path.startswith(g.state_dir) and g.log_file.startswith(g.state_dir)
    x = default_global({"HOME": "/h", "XDG_CONFIG_HOME": "/x/c", "XDG_STATE_HOME": "/x/s"}, 1)
    assert (x.config_path, x.state_dir) == ("/x/c/stap-server/conf.d", "/x/s/stapfarm")


def test_every_farm_variable(tmp_path: Path) -> None:
    text = ("STRATEGY=cross\nIMAGE_PREFIX=reg/farm\nLISTEN_ADDRESS=::1\n"
            "MDNS_INTERFACES=eth0 eth1\nMDNS_INTERFACES+=wlan0\nCERT_NAMES=a.example\n"
            "MODULES_DIR=/mods\nSTATE_DIR=/st\nDEBIAN_MIRROR=http://mirror.example/debian/\n"
            "KERNEL_SUITES=bookworm trixie\nAPT_ALLOW_EXPIRED=yes\nMEMORY_LIMIT=4G\n"
            "PIDS_LIMIT=100\nCPUS=1.5\nTMPFS_SIZE=512m\nSTAP_USER=builder\n")
    g = parse_global_text(text, "g", G, {}, 1000)
    assert g.strategy is Strategy.CROSS and g.image_prefix == "reg/farm"
    assert g.listen_address == "::1"
    assert g.mdns_interfaces == ("eth0", "eth1", "wlan0")
    assert g.cert_names == ("a.example",) and g.modules_dir == "/mods" and g.state_dir == "/st"
    assert g.debian_mirror == "http://mirror.example/debian"
    assert g.kernel_suites == ("bookworm", "trixie") and g.apt_allow_expired is True
    assert (g.memory_limit, g.pids_limit, g.cpus, g.tmpfs_size) == ("4g", 100, 1.5, "512m")
    assert g.stap_user == "builder"


def test_global_empty_value_keeps_default() -> None:
    g = parse_global_text("CONFIG_PATH=\nLOG_FILE=\nKERNEL_SUITES=\n", "g", G, {}, 1000)
    assert (g.config_path, g.log_file, g.kernel_suites) == ("/c", "/l/log", ("trixie",))


def test_global_errors_in_one_pass() -> None:
    text = ("CONFIG_PAHT=/x\nSTAT_PATH=relative\nLISTEN_ADDRESS=everywhere\n"
            "APT_ALLOW_EXPIRED=maybe\nMEMORY_LIMIT=lots\nPIDS_LIMIT=0\nCPUS=-2\n"
            "STAP_USER=root\nSTRATEGY=x\nDEBIAN_MIRROR=ftp://x\nLOG_FILE+=/x\n")
    with pytest.raises(ConfigError) as e:
        parse_global_text(text, "/etc/g", G, {}, 1000)
    p = e.value.problems
    assert p[0] == "/etc/g:1: unknown variable 'CONFIG_PAHT' (did you mean CONFIG_PATH?)"
    assert [x.split(":")[1] for x in p] == [str(n) for n in range(1, 12)]
    assert "STAT_PATH: 'relative' is not an absolute path" in p[1]
    assert "STAP_USER=root" in p[7]


def test_load_global_order_default_file_then_the_last_c_file(tmp_path: Path) -> None:
    # Changed by "The manual, complete on a real host" (1): of several -c files only the
    # last is read (stap-server(8): OPT_CONFIG_FILE, the last one wins); c1 was read too.
    default = tmp_path / "default"
    default.write_text("CONFIG_PATH=/one\nLOG_FILE=/one/log\n")
    c1 = tmp_path / "c1"
    c1.write_text("CONFIG_PATH=/two\nSTAT_PATH=/two/run\n")
    c2 = tmp_path / "c2"
    c2.write_text("CONFIG_PATH=/three\n")
    env = {"STAPFARM_CONFIG_FILE": str(default), "HOME": str(tmp_path)}
    g = load_global([str(c1), str(c2)], env, euid=1000)
    assert (g.config_path, g.log_file) == ("/three", "/one/log")
    assert g.stat_path != "/two/run"
    assert g.sources == (str(default), str(c2))
    # an earlier -c is not even opened
    assert load_global([str(tmp_path / "absent"), str(c2)], env, euid=1000).sources == (
        str(default), str(c2))


def test_load_global_missing_default_is_fine_missing_c_file_is_not(tmp_path: Path) -> None:
    env = {"STAPFARM_CONFIG_FILE": str(tmp_path / "absent"), "HOME": str(tmp_path)}
    assert load_global([], env, euid=1000).sources == ()
    assert load_global([], {"STAPFARM_CONFIG_FILE": "", "HOME": "/h"}, euid=1000).sources == ()
    with pytest.raises(ConfigError, match=r"/nope\.conf: no such configuration file"):
        load_global([str(tmp_path / "nope.conf")], env, euid=1000)
    with pytest.raises(ConfigError, match="is a directory"):
        load_global([str(tmp_path)], env, euid=1000)


# --------------------------------------------------------------------------- environment


def env_global(tmp_path: Path, environ: dict[str, str], files: list[str] | None = None
               ) -> GlobalConfig:
    """load_global with no default file, no host apt sources, and ENVIRON."""
    env = {"STAPFARM_CONFIG_FILE": "", "HOME": str(tmp_path), **environ}
    return load_global(files or [], env, euid=1000, apt_root=str(tmp_path))


def env_problems(tmp_path: Path, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        env_global(tmp_path, environ)
    return e.value.problems


def test_environment_defaults(tmp_path: Path) -> None:
    g = env_global(tmp_path, {})
    assert (g.prefix, g.test_label, g.hostname, g.home_volume, g.log_volume, g.server_ids,
            g.images_dir) == ("stapfarm", "", "", "", "", (155, 155), "")


@pytest.mark.parametrize(("variable", "value", "attr", "expected"), [
    ("STAPFARM_PREFIX", "stapfarmtest1a2b", "prefix", "stapfarmtest1a2b"),
    ("STAPFARM_PREFIX", "Farm_2.b-c", "prefix", "Farm_2.b-c"),
    ("STAPFARM_TEST_LABEL", "0123abcd ef", "test_label", "0123abcd ef"),
    ("STAPFARM_HOSTNAME", "build-1.lab.example", "hostname", "build-1.lab.example"),
    ("STAPFARM_HOME_VOLUME", "farm-a-home", "home_volume", "farm-a-home"),
    ("STAPFARM_LOG_VOLUME", "farm_a.log", "log_volume", "farm_a.log"),
    ("STAPFARM_SERVER_UID", "1001", "server_ids", (1001, 155)),
    ("STAPFARM_SERVER_GID", "0", "server_ids", (155, 0)),
    ("STAPFARM_IMAGES_DIR", "/src/farm//images/", "images_dir", "/src/farm/images"),
])
def test_environment_each_variable(tmp_path: Path, variable: str, value: str, attr: str,
                                   expected: object) -> None:
    g = env_global(tmp_path, {variable: value})
    assert getattr(g, attr) == expected
    default = GlobalConfig(config_path="", stat_path="", log_file="")
    assert replace(g, **{attr: getattr(default, attr)}) == env_global(tmp_path, {})


def test_environment_uid_and_gid_together(tmp_path: Path) -> None:
    g = env_global(tmp_path, {"STAPFARM_SERVER_UID": "2000", "STAPFARM_SERVER_GID": "3000"})
    assert g.server_ids == (2000, 3000)


def test_environment_empty_value_is_unset(tmp_path: Path) -> None:
    g = env_global(tmp_path, dict.fromkeys(ENVIRONMENT, ""))
    assert g == env_global(tmp_path, {})


def test_environment_is_the_last_stage_over_the_files(tmp_path: Path) -> None:
    gfile = tmp_path / "g"
    gfile.write_text(f"STATE_DIR={tmp_path}/state\n")
    g = env_global(tmp_path, {"STAPFARM_PREFIX": "second"}, [str(gfile)])
    assert (g.prefix, g.state_dir, g.sources) == ("second", f"{tmp_path}/state", (str(gfile),))


@pytest.mark.parametrize(("variable", "value", "what"), [
    ("STAPFARM_PREFIX", "two words", "a word Docker accepts in names"),
    ("STAPFARM_PREFIX", "-dash", "a word Docker accepts in names"),
    ("STAPFARM_PREFIX", "a/b", "a word Docker accepts in names"),
    ("STAPFARM_PREFIX", "caf\u00e9", "a word Docker accepts in names"),
    ("STAPFARM_PREFIX", "p" * 65, "a word Docker accepts in names"),
    ("STAPFARM_HOSTNAME", "under_score", "a DNS name"),
    ("STAPFARM_HOSTNAME", "a..b", "a DNS name"),
    ("STAPFARM_HOSTNAME", "host\nname", "a DNS name"),
    ("STAPFARM_HOSTNAME", "x" * 64, "a DNS name"),
    ("STAPFARM_HOSTNAME", ".".join(["a" * 63] * 4) + "b", "a DNS name"),
    ("STAPFARM_HOME_VOLUME", "h", "a Docker volume name"),
    ("STAPFARM_HOME_VOLUME", "/srv/home", "a Docker volume name"),
    ("STAPFARM_LOG_VOLUME", "log volume", "a Docker volume name"),
    ("STAPFARM_SERVER_UID", "stap-server", "a user id"),
    ("STAPFARM_SERVER_UID", "0", "a user id"),
    ("STAPFARM_SERVER_UID", "-1", "a user id"),
    ("STAPFARM_SERVER_UID", "4294967295", "a user id"),
    ("STAPFARM_SERVER_UID", "9" * 5000, "a user id"),
    ("STAPFARM_SERVER_GID", "1e3", "a group id"),
    ("STAPFARM_SERVER_GID", " 155", "a group id"),
    ("STAPFARM_IMAGES_DIR", "images", "an absolute path"),
])
def test_environment_bad_values(tmp_path: Path, variable: str, value: str, what: str) -> None:
    (problem,) = env_problems(tmp_path, {variable: value})
    shown_value = shown(value.replace("\n", "\\n"))
    assert problem.startswith(f"environment: {variable}: '{shown_value}' is not {what}")
    assert "\n" not in problem and len(problem) < 200


def test_environment_bad_value_messages() -> None:
    with pytest.raises(ConfigError) as e:
        apply_environment(G, {"STAPFARM_PREFIX": "my farm", "STAPFARM_SERVER_UID": "0"})
    assert e.value.problems == [
        ("environment: STAPFARM_PREFIX: 'my farm' is not a word Docker accepts in names "
         "(letters, digits, '_', '.', '-', a letter or digit first, at most 64 characters)"),
        ("environment: STAPFARM_SERVER_UID: '0' is not a user id (1-4294967294; a compile "
         "server never runs as root)")]


def test_environment_problems_join_the_files_problems(tmp_path: Path) -> None:
    gfile = tmp_path / "g"
    gfile.write_text("CPUS=many\n")
    with pytest.raises(ConfigError) as e:
        env_global(tmp_path, {"STAPFARM_SERVER_GID": "staff", "STAPFARM_HOSTNAME": "a b"},
                   [str(gfile)])
    assert [p.split(": ")[:2] for p in e.value.problems] == [
        [f"{gfile}:1", "CPUS"], ["environment", "STAPFARM_HOSTNAME"],
        ["environment", "STAPFARM_SERVER_GID"]]


def test_environment_other_variables_are_not_read() -> None:
    assert apply_environment(G, {"STAPFARM_CPUS": "x", "PREFIX": "x y", "HOSTNAME": "a_b",
                                 "STAPFARM_RELEASE_X86_64": "?"}) == G


def test_environment_table_in_docs_lists_every_variable() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    table = docs.split("### Environment", 1)[1].split("\n###", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `STAPFARM_")]
    named = {v for row in rows for v in re.findall(r"`(STAPFARM_[A-Z_]+)`", row.split("|")[1])}
    assert named == {*ENVIRONMENT, CONFIG_FILE_ENV}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ENVIRONMENT)), st.one_of(
    st.text(max_size=80),
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_environment_any_value_loads_or_is_one_config_error(variable: str, value: str) -> None:
    try:
        g = apply_environment(G, {variable: value})
    except ConfigError as e:
        (problem,) = e.problems
        assert problem.startswith(f"environment: {variable}: ") and "\n" not in problem
        return
    if not value:
        assert g == G
        return
    attr = ENVIRONMENT[variable][0]
    if attr.startswith("server_"):
        assert g.server_ids[attr == "server_gid"] == int(value)
    else:
        assert getattr(g, attr) in (value, os.path.normpath(value))


# --------------------------------------------------------------------------- stat files

STAT_SAMPLE = """\
ARCH=arm64
USER=builder
BUILD+='VARIABLE1=VALUE1 VARIABLE2=VALUE2'
INCLUDE+=/mytapsets
INCLUDE+=/yourtapsets
DEFINE+=STP_MAXMEMORY=1024
NICKNAME=10701
RUNTIME=
RELEASE+=/tmp/example/kb
RELEASE+=5.10.0-test
LOG=/tmp/example/g/log/server.log
PORT=5001
SSL=
MAXTHREADS=
MAXREQSIZE=
MAXCOMPRESSEDREQ=
"""


def test_stat_file_renders_upstream_line_order() -> None:
    c = ServerConfig(arch="arm64", releases=("/tmp/example/kb", "5.10.0-test"),
                     build=("'VARIABLE1=VALUE1 VARIABLE2=VALUE2'",),
                     include=("/mytapsets", "/yourtapsets"), define=("STP_MAXMEMORY=1024",),
                     user="builder", log="/tmp/example/g/log/server.log", port=5001)
    assert statfile.render(c, 10701) == STAT_SAMPLE


def test_stat_file_parses_back_pid_nickname_means_none() -> None:
    d = statfile.parse(STAT_SAMPLE, "/run/10701.stat")
    assert d.nickname is None and d.port == 5001 and d.max_request_size is None
    assert d.build == ["'VARIABLE1=VALUE1 VARIABLE2=VALUE2'"]
    named = statfile.parse(STAT_SAMPLE.replace("NICKNAME=10701", "NICKNAME=nick"), "/r/1.stat")
    assert named.nickname == "nick"


def test_stat_write_is_atomic(tmp_path: Path) -> None:
    statfile.write_atomic(str(tmp_path / "1.stat"), "ARCH=x86_64\n")
    statfile.write_atomic(str(tmp_path / "1.stat"), "ARCH=arm64\n")
    assert [p.name for p in tmp_path.iterdir()] == ["1.stat"]
    assert (tmp_path / "1.stat").read_text() == "ARCH=arm64\n"


def test_draft_round_trip_from_config() -> None:
    c = resolve_server(ServerDraft(arch="arm64", define=["A"], port=5000), G, HOST)
    assert resolve_server(ServerDraft.from_config(c), G, HOST) == c


# --------------------------------------------------------------------------- property


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_farm_errors(data: bytes) -> None:
    for parse in (lambda t: parse_server_text(t, "f.conf"),
                  lambda t: parse_global_text(t, "g", G, {"HOME": "/h"}, 1000)):
        try:
            parse(decode_config_bytes(data, "f"))
        except FarmError as e:
            assert isinstance(e, ConfigError)
            assert all(p.startswith(("f.conf:", "f:", "g:")) for p in e.problems)


_LINES = st.lists(st.one_of(
    st.sampled_from(["ARCH", "RELEASE", "BUILD", "INCLUDE", "PORT", "MAXTHREADS", "USER",
                     "STRATEGY", "CONFIG_PATH", "CPUS", "ARHC", "LOG"]).flatmap(
        lambda n: st.tuples(st.just(n), st.sampled_from(["=", "+="]), st.text(max_size=12))
        .map(lambda t: "".join(t))),
    st.text(max_size=20)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_LINES)
def test_structured_lines_raise_only_config_errors(lines: list[str]) -> None:
    text = "\n".join(lines)
    for parse in (lambda t: parse_server_text(t, "f.conf"),
                  lambda t: parse_global_text(t, "g", G, {"HOME": "/h"}, 1000)):
        try:
            parse(text)
        except ConfigError:
            pass


def test_global_endpoint_settings() -> None:
    g = parse_global_text("ENDPOINT_PORT=5200\nENDPOINT_METRICS_PORT=0\nENDPOINT_PROVISION=yes\n"
                          "ENDPOINT_OFFER=aarch64:6.12.1+tst13-arm64\nENDPOINT_OFFER+=x86_64\n"
                          "ENDPOINT_CACHE_SIZE=512m\nENDPOINT_MAX_CONNECTIONS=10\n"
                          "ENDPOINT_IDLE_TIMEOUT=5\n", "g", G, {}, 1000)
    assert (g.endpoint_port, g.endpoint_metrics_port, g.endpoint_provision) == (5200, 0, True)
    assert g.endpoint_offer == ("aarch64:6.12.1+tst13-arm64", "x86_64")
    assert (g.endpoint_cache_size, g.endpoint_max_connections, g.endpoint_idle_timeout) == (
        "512m", 10, 5)


def test_global_endpoint_errors() -> None:
    text = ("ENDPOINT_PORT=0\nENDPOINT_PROVISION=perhaps\nENDPOINT_OFFER=sparc:1\n"
            "ENDPOINT_CACHE_SIZE=big\nENDPOINT_IDLE_TIMEOUT=-1\n")
    with pytest.raises(ConfigError) as e:
        parse_global_text(text, "/etc/g", G, {}, 1000)
    p = e.value.problems
    assert [x.split(":")[1] for x in p] == ["1", "2", "3", "4", "5"]
    assert "ENDPOINT_OFFER: 'sparc:1' is not ARCH or ARCH:RELEASE" in p[2]
    assert "ENDPOINT_PROVISION: 'perhaps' is not yes or no" in p[1]


# --------------------------------------------------------------------------- the manual, complete
# Issue "The manual, complete on a real host".


def test_duplicate_nicknames_make_both_files_bad_naming_each_other(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("NICKNAME=twin\n")
    (tmp_path / "b.conf").write_text("PORT=x\n# c\nNICKNAME=twin\n")
    (tmp_path / "c.conf").write_text("NICKNAME=solo\n")
    files = load_server_configs(str(tmp_path))
    a, b = (str(tmp_path / n) for n in ("a.conf", "b.conf"))
    assert [d.nickname for d in files.good] == ["solo"]
    bad_a, bad_b = files.bad
    assert (bad_a.nickname, bad_b.nickname) == ("twin", "twin")
    assert bad_a.problems == ((f"{a}:1: NICKNAME 'twin' is also set in {b}:3 "
                               "(a nickname names one server)"),)
    assert bad_b.problems[-1] == (f"{b}:3: NICKNAME 'twin' is also set in {a}:1 "
                                  "(a nickname names one server)")
    assert bad_b.problems[0].startswith(f"{b}:1: PORT: 'x'")


def test_bad_file_keeps_what_it_says_for_display(tmp_path: Path) -> None:
    (tmp_path / "s.conf").write_text("ARCH=i386\nRELEASE=a\nRELEASE+=b\nDEFINE=X\nDEFINE=\n"
                                     "NICKNAME=\nPORT=5001\n")
    (bad,) = load_server_configs(str(tmp_path)).bad
    assert bad.nickname is None
    assert bad.written == (("ARCH", ("i386",)), ("RELEASE", ("a", "b")), ("PORT", ("5001",)))
    shown_defaults = resolve_bad_file(bad, G, HOST)
    assert shown_defaults.value("ARCH") == ("i386",)
    assert (shown_defaults.value("USER"), shown_defaults.value("LOG")) == (("alice",), ("/l/log",))


@pytest.mark.parametrize("text, lo, hi, expected", [
    ("0", 0, 65535, 0), ("65535", 0, 65535, 65535), ("65536", 0, 65535, None),
    ("0005001", 0, 65535, 5001), ("0" * 5000 + "7", 0, 9, 7), ("9" * 5000, 0, 65535, None),
    ("", 0, 9, None), ("-1", 0, 9, None), ("+1", 0, 9, None), (" 1", 0, 9, None),
    ("٣", 0, 9, None), ("1e3", 0, 5000, None), ("0", 1, 9, None),
])
def test_bounded_int(text: str, lo: int, hi: int, expected: int | None) -> None:
    assert bounded_int(text, lo, hi) == expected


def test_shown_cuts_long_values() -> None:
    assert shown("short") == "short"
    assert shown("x" * 5000) == "x" * 20 + "..." + "x" * 8 + " (5000 characters)"


@pytest.mark.parametrize("line, needle", [
    ("PORT=" + "9" * 5000, ("PORT: '99999999999999999999...99999999 (5000 characters)' is "
                            "not a port number (0-65535)")),
    ("MAXTHREADS=1025", "MAXTHREADS: '1025' is not a thread count (0-1024)"),
    ("MAXTHREADS=" + "1" * 4400, "is not a thread count (0-1024)"),
    ("MAXREQSIZE=1073741825", "is not a size in bytes (1-1073741824, i.e. at most 1 GiB)"),
    ("MAXCOMPRESSEDREQ=" + "5" * 4301, "is not a size in bytes (1-1073741824"),
])
def test_server_numbers_are_bounded(line: str, needle: str) -> None:
    (msg,) = problems(line + "\n")
    assert msg.startswith("f.conf:1: ") and needle in msg


def test_server_numbers_at_their_limits() -> None:
    d = parse_server_text("PORT=65535\nMAXTHREADS=1024\nMAXREQSIZE=1073741824\n", "f")
    assert (d.port, d.max_threads, d.max_request_size) == (65535, 1024, 1 << 30)


@pytest.mark.parametrize("line, ok", [
    ("CPUS=0", True), ("CPUS=0.01", True), ("CPUS=1024", True), ("CPUS=1.5", True),
    ("CPUS=1e308", False), ("CPUS=1025", False), ("CPUS=0.001", False), ("CPUS=nan", False),
    ("CPUS=inf", False), ("CPUS=-1", False),
    ("PIDS_LIMIT=" + "9" * 5000, False), ("PIDS_LIMIT=4194304", True),
    ("ENDPOINT_PORT=" + "9" * 5000, False),
])
def test_global_numbers_are_bounded(line: str, ok: bool) -> None:
    try:
        parse_global_text(line + "\n", "g", G, {}, 1000)
        assert ok
    except ConfigError as e:
        assert not ok, e
        (msg,) = e.problems
        assert msg.startswith("g:1: ") and len(msg) < 200
        if line.startswith("CPUS"):
            assert "(0 = all, else 0.01-1024)" in msg


def test_read_config_text_refuses_a_nul_name_and_a_huge_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        read_config_text("/tmp/a\0b")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        read_config_text("/dev/zero")
    big = tmp_path / "big"
    big.write_text("# x\n" * 300000)
    with pytest.raises(ConfigError, match="larger than"):
        read_config_text(str(big))


class _Accounts:
    def __init__(self, users: dict[str, int], groups: dict[str, tuple[int, tuple[str, ...]]]
                 ) -> None:
        self.users, self.groups = users, groups

    def user(self, name: str) -> Account | None:
        return Account(name, self.users[name]) if name in self.users else None

    def group(self, name: str) -> Group | None:
        g = self.groups.get(name)
        return Group(name, g[0], g[1]) if g else None


def test_server_user_problem() -> None:
    accounts = _Accounts({"prim": 155, "supp": 100, "out": 100},
                         {"stap-server": (155, ("supp",))})
    assert server_user_problem("prim", accounts) is None
    assert server_user_problem("supp", accounts) is None
    assert server_user_problem("out", accounts) == (
        "-u out: user 'out' is not a member of the 'stap-server' group "
        "(usermod -a -G stap-server out)")
    assert server_user_problem("nobody-x", accounts) == "-u nobody-x: no such user"
    assert "no 'stap-server' group" in (server_user_problem("prim", _Accounts({"prim": 1}, {}))
                                        or "")


def test_system_accounts_read_the_host_databases() -> None:
    root = pwd.getpwuid(0)
    assert SystemAccounts().user(root.pw_name) == Account(root.pw_name, root.pw_gid)
    for name in ("no-such-user-stapfarm", "a\0b", "\udcff", ""):
        assert SystemAccounts().user(name) is None
        assert SystemAccounts().group(name) is None


def test_host_current_in_a_deleted_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    def gone() -> str:
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr("farm.manual.host.os.getcwd", gone)
    assert Host.current().cwd == ""


def test_stat_file_with_a_non_utf8_path_is_written_as_its_bytes(tmp_path: Path) -> None:
    log = "/logs/\udcff"  # from the environment: bytes decoded with surrogateescape
    c = ServerConfig(arch="x86_64", user="u", log=log)
    run = tmp_path / "run"
    statfile.sync(str(run), [RunningServer(config=c, pid=5, port=1, container="c", running=True)])
    assert b"LOG=/logs/\xff\n" in (run / "5.stat").read_bytes()
    statfile.sync(str(run), [RunningServer(config=c, pid=5, port=1, container="c", running=True)])
