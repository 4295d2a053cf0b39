"""One timed compile each way: through a client (farm or hand-started upstream server), and
bare `stap -p4` in a throwaway container of a server image (the floor).

Times are taken inside the container that runs `stap` (date +%s%N around it), so the
harness's own Docker round trips (copying files in and modules out, polling for the end) are
not counted; the host's wall clock is recorded beside them.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.support import client as tclient
from tests.support.stap_run import run_in_image

STAMP = re.compile(r"^BENCH_NS (\d+) (\d+) (\d+)$", re.MULTILINE)
# stap's own exit code is reported on the stamp line, the container's is the shell's
TIMED = ('s=$(date +%s%N); stap "$@" >"$BENCH_OUT" 2>&1; rc=$?; e=$(date +%s%N); '
         'cat "$BENCH_OUT"; echo "BENCH_NS $s $e $rc"; exit $rc')


@dataclass
class Run:
    """One compile: what ran, its exit code, seconds inside the container, host seconds."""

    rc: int
    seconds: float  # stap's own run time, measured where it ran
    wall: float  # the host's view, harness overhead included
    start_ns: int  # container clock (the client's, for client runs)
    end_ns: int
    output: str
    modules: list[str]

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.modules)

    def brief(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rc": self.rc, "seconds": round(self.seconds, 3),
                             "wall": round(self.wall, 3), "modules": self.modules}
        if not self.ok:
            d["output_tail"] = self.output[-2000:]
        return d


def _parse(output: str, wall: float, modules: list[str]) -> Run:
    m = None
    for m in STAMP.finditer(output):
        pass
    if m is None:
        return Run(rc=255, seconds=wall, wall=wall, start_ns=0, end_ns=0, output=output,
                   modules=modules)
    s, e, rc = (int(g) for g in m.groups())
    return Run(rc=rc, seconds=(e - s) / 1e9, wall=wall, start_ns=s, end_ns=e,
               output=output[:m.start()], modules=modules)


def client_run(container: Any, args: list[str], files: Mapping[str, str] | None = None,
               timeout: float = 1800) -> Run:
    """`stap ARGS` as the client image's user in a fresh directory holding FILES, timed."""
    work = f"w-{uuid.uuid4().hex[:10]}"
    d = f"{tclient.HOME}/{work}"
    tclient._put(container, tclient.HOME, dict(files or {}), tclient._uid(container), top=work)
    t0 = time.monotonic()
    _, output = tclient._exec(
        container, ["sh", "-c", f'cd "{d}" && BENCH_OUT="{d}/.out" && {TIMED}', "stap",
                    *args], user=tclient.USER, timeout=timeout)
    wall = time.monotonic() - t0
    _code, listing = container.exec_run(["sh", "-c", (f'cd "{d}" && ls *.ko *.ko.sgn 2>/dev/null'
                                        f'; cd / && rm -rf "{d}"')])
    return _parse(output, wall, listing.decode("utf-8", "replace").split())


def clear_client_cache(container: Any) -> None:
    container.exec_run(["rm", "-rf", f"{tclient.HOME}/.systemtap/cache"])


def bare_run(docker_client: Any, image: str, volume: str, args: list[str], label: str,
             files: Mapping[str, str] | None = None, platform: str | None = None,
             timeout: float = 1800) -> Run:
    """`stap ARGS` run directly in a throwaway container of IMAGE, as tests/conftest.run_stap
    does (read-only root, tmpfs /tmp and home — so stap's cache is always cold — kernel
    VOLUME read-only, user stap-server, no network), timed inside the container."""
    _, output, modules, wall = run_in_image(
        docker_client, image, volume, args, label, files, platform, timeout=timeout,
        shell=f"BENCH_OUT=/tmp/.out && {TIMED}")
    return _parse(output, wall, list(modules))
