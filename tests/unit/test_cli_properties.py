"""Properties of `stap-server` over its whole grammar: options and values, server files, the
global file and the farm's environment variables. Whatever the input, `main()` returns 0-3, writes stderr only as
`stap-server: ...` lines (or the usage hint), and raises nothing; nothing it prints can fail
to encode, even on a strict UTF-8 terminal.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from clifakes import Farm, make_farm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.core.spec import ServerConfig
from farm.manual import actions as tools
from farm.manual import cli
from farm.manual.config import ENVIRONMENT, GLOBAL_VARIABLES
from farm.manual.plan import Action
from farm.manual.server_config import SERVER_VARIABLES

HINT = b"Try 'stap-server --help' for more information."
EXTRA = "@extra-global-file"  # replaced by the path of a real extra global file

_NUMBERS = st.sampled_from([
    "0", "1", "5001", "65535", "65536", "1024", "1025", "1073741824", "1073741825", "4194304",
    "4194305", "-1", "+1", "1e308", "-1e308", "nan", "inf", "0.01", "0.001", "00", " 1", "\u0663",
    "9" * 4301, "1" * 5000, "0" * 5000 + "1", "1_000"])
_WORDS = st.sampled_from([
    "x86_64", "aarch64", "arm64", "i386", "6.1.0-test", "/abs/dir", "rel/dir", ".", "..", "~",
    "alice", "bob", "mallory", "nosuch", "root", "stap-server", "native", "good", "twin", "1000",
    "auto", "Cross", "emulated", "", " ", "()", "'A=1 B=2'", '"q"', "\\", "a\nb", "a\rb", "\0",
    EXTRA])
_BYTES = st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape"))
VALUES = st.one_of(_NUMBERS, _WORDS, st.text(max_size=12), _BYTES)

_SHORT = st.sampled_from(list("aBcDInprRu"))
_LONG = st.sampled_from(["log", "port", "ssl", "max-threads", "max-request-size",
                         "max-compressed-request", "strategy", "prot", "json", "help"])
OPTIONS = st.one_of(
    st.sampled_from(["-i", "-ifoo", "-h", "-?", "--json", "--json=1", "--help", "-P", "-k", "--",
                     "-", "-x", "---"]).map(lambda s: [s]),
    st.tuples(_SHORT, VALUES).map(lambda t: ["-" + t[0], t[1]]),
    st.tuples(_SHORT, VALUES).map(lambda t: ["-" + t[0] + t[1]]),
    st.tuples(_LONG, VALUES).map(lambda t: ["--" + t[0], t[1]]),
    st.tuples(_LONG, VALUES).map(lambda t: [f"--{t[0]}={t[1]}"]),
    VALUES.map(lambda v: [v]),
)
ACTIONS = st.one_of(
    st.sampled_from([a.value for a in Action] + ["reload", "help", "--help", "-h"]),
    st.text(max_size=8).filter(lambda a: a not in tools.ACTIONS),
    _BYTES.filter(lambda a: a not in tools.ACTIONS))
ARGV = st.tuples(ACTIONS, st.lists(OPTIONS, max_size=8)).map(
    lambda t: [t[0], *itertools.chain.from_iterable(t[1])])


def _lines(names: list[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """File texts: `NAME=VALUE` / `NAME+=VALUE` lines of NAMES and junk, as bytes (values that
    came from bytes are written back as those bytes)."""
    line = st.one_of(
        st.tuples(st.sampled_from(names), st.sampled_from(["=", "+=", " = ", ""]), values)
        .map(lambda t: "".join(t)),
        st.sampled_from(["# comment", "", "  ", "not a line", "=x", "  PORT=1"]),
        st.text(max_size=16))
    structured = st.lists(line, max_size=8).map(
        lambda ls: "\n".join(ls).encode("utf-8", "surrogateescape"))
    return st.one_of(structured, st.binary(max_size=60))


SERVER_FILES = st.dictionaries(
    st.sampled_from([b"a.conf", b"b.conf", b"z.conf", b"\xff.conf", b"notes.txt"]),
    _lines([*SERVER_VARIABLES, "ARHC", "port", "NICK"],
           st.one_of(_NUMBERS, _WORDS.filter(lambda w: w != EXTRA), st.text(max_size=10),
                     _BYTES)),
    max_size=3)


def _global_lines(root: Path) -> st.SearchStrategy[bytes]:
    # Paths stay under ROOT: the farm creates STATE_DIR and STAT_PATH and writes stat files.
    inside = st.sampled_from([f"{root}/conf.d", f"{root}/elsewhere", f"{root}/run2", "relative",
                              "", "~", "~/sub", "~nosuchuser-stapfarm/x"])
    paths = {"CONFIG_PATH", "STAT_PATH", "LOG_FILE", "STATE_DIR", "MODULES_DIR"}
    others = [n for n in GLOBAL_VARIABLES if n not in paths] + ["LOGFILE", "cpus"]
    return st.tuples(
        _lines(sorted(paths), inside),
        _lines(others, st.one_of(_NUMBERS, _WORDS.filter(lambda w: w != EXTRA),
                                 st.text(max_size=10)))).map(lambda t: t[0] + b"\n" + t[1])


ENVIRON = st.dictionaries(st.sampled_from(sorted(ENVIRONMENT)),
                          st.one_of(VALUES, st.sampled_from(["stapfarm", "farm.example", "155"])),
                          max_size=3)


@pytest.fixture(scope="module")
def farms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """A fresh farm (paths, fake backend, fake host) for every example."""
    base = tmp_path_factory.mktemp("farms")
    return (make_farm(base / str(n)) for n in itertools.count())


def _run(farm: Farm, argv: list[str]) -> tuple[int, bytes, bytes]:
    out_b, err_b = io.BytesIO(), io.BytesIO()
    # strict, as a UTF-8 terminal: printing an undecodable argv byte must not raise
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="strict", write_through=True)
    rc = cli.main(argv, environ=farm.environ, stdout=out, stderr=err, backend=farm.backend,
                  host=farm.host)
    return rc, out_b.getvalue(), err_b.getvalue()


def _check(rc: int, err: bytes) -> None:
    assert rc in (0, 1, 2, 3)
    for line in err.split(b"\n")[:-1]:
        assert line.startswith(b"stap-server: ") or line == HINT, err
    assert err == b"" or err.endswith(b"\n")


def _seed(farm: Farm, running: bool, stale: bool, failing: str | None) -> None:
    if running:
        farm.backend.add(ServerConfig(arch="x86_64", releases=("6.1.0-test",), user="alice",
                                      nickname="native", log=farm.log_file), pid=1000)
    if stale:
        farm.backend.add(ServerConfig(arch="arm64", user="bob", log=farm.log_file), pid=77,
                         running=False)
    if failing is not None:
        farm.backend.fail_start = lambda c: failing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=ARGV, confs=SERVER_FILES, running=st.booleans(), stale=st.booleans(),
       failing=st.sampled_from([None, "boom", "two\nlines"]))
def test_any_command_line_exits_0_to_3_with_prefixed_errors(
        farms: Iterator[Farm], argv: list[str], confs: dict[bytes, bytes], running: bool,
        stale: bool, failing: str | None) -> None:
    farm = next(farms)
    extra = farm.root / "extra.conf"
    extra.write_text(f"STAP_USER=bob\nCONFIG_PATH={farm.config_path}\n")
    argv = [str(extra) if a == EXTRA else a for a in argv]
    _write_confs(farm, confs)
    _seed(farm, running, stale, failing)
    rc, _, err = _run(farm, argv)
    _check(rc, err)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(confs=SERVER_FILES, data=st.data(), environ=ENVIRON,
       argv=st.sampled_from([["start"], ["status"], ["stop"], ["restart"], ["force-reload"],
                             ["start", "-n", "good"], ["status", "-n", "twin"],
                             ["stop", "-n", "native"], ["start", "-n", "native", "-a", "arm64"],
                             ["condrestart"], ["status", "--json"]]),
       running=st.booleans())
def test_any_configuration_files_exit_0_to_3_with_prefixed_errors(
        farms: Iterator[Farm], confs: dict[bytes, bytes], data: st.DataObject,
        environ: dict[str, str], argv: list[str], running: bool) -> None:
    farm = next(farms)
    farm.environ.update(environ)
    farm.global_file.write_bytes(farm.global_file.read_bytes()
                                 + data.draw(_global_lines(farm.root)))
    _write_confs(farm, confs)
    _seed(farm, running, stale=False, failing=None)
    rc, out, err = _run(farm, argv)
    _check(rc, err)
    if argv == ["start"] and rc == 0:
        assert b"FAILED" not in out


def _write_confs(farm: Farm, confs: dict[bytes, bytes]) -> None:
    directory = os.fsencode(farm.config_path)
    os.makedirs(directory, exist_ok=True)
    for name, text in confs.items():
        with open(directory + b"/" + name, "wb") as f:
            f.write(text)
