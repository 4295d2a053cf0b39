"""One timed compile each way: through a client (farm or hand-started upstream server), and
bare `stap -p4` in a throwaway container of a server image (the floor).

Times are taken inside the container that runs `stap` (date +%s%N around it), so the
harness's own Docker round trips (copying files in and modules out, polling for the end) are
not counted; the host's wall clock is recorded beside them.
"""

from __future__ import annotations

import io
import re
import tarfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from farm import images, kernels, labels
from tests.support import client as tclient

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


def _tar(files: Mapping[str, str], top: str, uid: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo(top)
        d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o755, uid, uid
        tar.addfile(d)
        for name, data in files.items():
            raw = data.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.uid, info.gid = len(raw), 0o644, uid, uid
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def bare_run(docker_client: Any, image: str, volume: str, args: list[str], label: str,
             files: Mapping[str, str] | None = None, platform: str | None = None,
             timeout: float = 1800) -> Run:
    """`stap ARGS` run directly in a throwaway container of IMAGE, as tests/conftest.run_stap
    does (read-only root, tmpfs /tmp and home — so stap's cache is always cold — kernel
    VOLUME read-only, user stap-server, no network), timed inside the container."""
    import requests.exceptions

    uid = images.server_uid()
    lab = {labels.TEST: label, labels.KIND: "job"}
    workdir = "/work"
    work = docker_client.volumes.create(f"{volume}-run-{uuid.uuid4().hex[:10]}", labels=lab)
    container = None
    try:
        kw: dict[str, Any] = {"platform": platform} if platform else {}
        container = docker_client.containers.create(
            image, entrypoint=["/usr/bin/tini", "--", "sh", "-c",
                               f'cd {workdir}/m && BENCH_OUT=/tmp/.out && {TIMED}', "stap"],
            command=list(args), user="stap-server", read_only=True, network_mode="none",
            tmpfs={"/tmp": "exec", "/home/stap-server": f"uid={uid},gid={uid},mode=0700"},
            environment={"HOME": "/home/stap-server", "TMPDIR": "/tmp"},
            volumes={volume: {"bind": kernels.MOUNT, "mode": "ro"},
                     work.name: {"bind": workdir, "mode": "rw"}},
            labels=lab, **kw)
        container.put_archive(workdir, _tar(files or {}, "m", uid))
        t0 = time.monotonic()
        container.start()
        try:
            container.wait(timeout=timeout)
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            container.kill()
        wall = time.monotonic() - t0
        output = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
        stream, _ = container.get_archive(f"{workdir}/m")
        mods = []
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            mods = [i.name.rsplit("/", 1)[-1] for i in tar
                    if i.isfile() and i.name.endswith((".ko", ".ko.sgn"))]
        return _parse(output, wall, mods)
    finally:
        if container is not None:
            container.remove(force=True)
        work.remove(force=True)
