"""A kernel tree removed under a running server: what `status` says (issue 9, faults)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from farm.core.arch import ARM64, X86_64
from farm.core.backend import RunningServer
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.core.strategy import BuildPlan
from farm.engine.docker import Engine
from farm.engine.servers import TREE_CHECK, DockerBackend, tree_problem
from farm.kernels.trees import MANIFESTS
from farm.kernels.trees import MOUNT as KERNELS_MOUNT
from farm.manual.plan import Action, plan, status_exit_code
from farm.manual.render import status_json, status_line

REL = "6.12.99+tst13-amd64"
X86 = ServerConfig(arch="x86_64", releases=(REL,), user="u", log="/l", nickname="k")


def srv(problems: tuple[str, ...] = ()) -> RunningServer:
    return RunningServer(config=X86, pid=7, port=40007, container="c7", running=True,
                         problems=problems)


def test_tree_problem_names_the_release_and_the_command_that_fixes_it() -> None:
    native = BuildPlan(Strategy.NATIVE, X86_64, X86_64)
    assert tree_problem(REL, native) == (
        f"kernel tree {REL} (x86_64) missing: stap-server kernels add -a x86_64 -r {REL}")
    emulated = BuildPlan(Strategy.EMULATED, ARM64, ARM64)
    assert tree_problem("6.12.99+tst13-arm64", emulated).endswith(
        "kernels add -a aarch64 -r 6.12.99+tst13-arm64 --strategy emulated")


def _check(root: Path, *releases: str) -> list[str]:
    script = TREE_CHECK.replace(KERNELS_MOUNT, str(root))
    out = subprocess.run(["sh", "-c", script, "tree-check", *releases], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def _tree(root: Path, rel: str, manifest: bool = True, build: bool = True) -> None:
    (root / MANIFESTS).mkdir(parents=True, exist_ok=True)
    if manifest:
        (root / MANIFESTS / f"{rel}.json").write_text("{}")
    src = root / "usr/src" / f"linux-headers-{rel}"
    src.mkdir(parents=True)
    if build:
        (src / "Makefile").write_text("")
    mod = root / "usr/lib/modules" / rel
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(f"../../../src/linux-headers-{rel}")


def test_tree_check_script_lists_exactly_the_incomplete_trees(tmp_path: Path) -> None:
    _tree(tmp_path, "ok")
    _tree(tmp_path, "no-manifest", manifest=False)
    _tree(tmp_path, "no-build", build=False)
    assert _check(tmp_path, "ok", "no-manifest", "no-build", "absent") == [
        "no-manifest", "no-build", "absent"]
    assert _check(tmp_path, "ok") == []


class FakeContainer:
    def __init__(self, code: int, out: bytes) -> None:
        self.code, self.out, self.calls = code, out, []  # type: ignore[var-annotated]

    def exec_run(self, cmd: list[str]) -> tuple[int, bytes]:
        self.calls.append(cmd)
        return self.code, self.out


def _backend() -> DockerBackend:
    return DockerBackend(engine=Engine(None), gcfg=GlobalConfig(config_path="", stat_path="",
                                                                log_file=""))


def test_backend_reports_the_releases_the_check_prints() -> None:
    c: Any = FakeContainer(0, f"{REL}\n".encode())
    cfg = ServerConfig(arch="x86_64", releases=(REL, "6.1.0-other", "/srv/build"), user="u",
                       log="/l")
    problems = _backend()._tree_problems(c, cfg)
    assert problems == (tree_problem(REL, BuildPlan(Strategy.NATIVE, X86_64, X86_64)),)
    assert c.calls[0][-2:] == [REL, "6.1.0-other"]  # build-tree paths are not checked
    # a failed check (container gone, exec refused) reports nothing rather than a guess
    assert _backend()._tree_problems(FakeContainer(126, f"{REL}\n".encode()), cfg) == ()
    only_paths = ServerConfig(arch="x86_64", releases=("/srv/build",), user="u", log="/l")
    nothing: Any = FakeContainer(0, b"")
    assert _backend()._tree_problems(nothing, only_paths) == () and nothing.calls == []


def test_status_shows_the_problem_under_the_server_and_exits_1() -> None:
    problem = tree_problem(REL, BuildPlan(Strategy.NATIVE, X86_64, X86_64))
    steps = plan(Action.STATUS, None, [srv((problem,))])
    assert status_exit_code(steps) == 1
    lines = status_line(steps[0]).split("\n")
    assert lines[0].endswith("running as PID 7") and lines[1:] == [f"  {problem}"]
    doc = json.loads(status_json(steps, 1))
    assert doc["servers"][0]["state"] == "running"
    assert doc["servers"][0]["problems"] == [problem]
    healthy = plan(Action.STATUS, None, [srv()])
    assert status_exit_code(healthy) == 0 and "\n" not in status_line(healthy[0])
    assert json.loads(status_json(healthy, 0))["servers"][0]["problems"] == []
