"""`stap` run directly in a throwaway container of a farm image: the tests' floor for module
builds (tests/conftest.run_stap) and the benchmark's "bare stap" (bench/runs.bare_run)."""

from __future__ import annotations

import io
import tarfile
import time
import uuid
from collections.abc import Mapping
from typing import Any

from farm.core import labels
from farm.engine import images
from farm.kernels import trees as kernels

WORK = "/work"  # where the per-run volume is mounted; stap runs in WORK/m
EXEC_STAP = 'exec stap "$@"'


def _tar(files: Mapping[str, bytes | str], top: str, uid: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo(top)
        d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o755, uid, uid
        tar.addfile(d)
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.uid, info.gid = len(raw), 0o644, uid, uid
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def run_in_image(docker_client: Any, image: str, volume: str, args: list[str], label: str,
                 files: Mapping[str, bytes | str] | None = None, platform: str | None = None,
                 *, timeout: float = 1800,
                 shell: str = EXEC_STAP) -> tuple[int, str, dict[str, bytes], float]:
    """Run SHELL (by default `stap ARGS`) in WORK/m of a throwaway container of IMAGE as the
    farm's servers would: read-only root, tmpfs /tmp and home (stap's cache always cold),
    kernel VOLUME read-only at /srv/stapfarm/kernels, user stap-server, no network. FILES go
    into WORK/m, a per-run volume; container and volume carry LABEL and are removed.

    Returns (exit code, stdout+stderr, {*.ko / *.ko.sgn name: bytes}, wall seconds from
    start to exit); exit code 124 and no modules when it did not finish within TIMEOUT.
    """
    import docker.errors
    import requests.exceptions

    uid = images.server_uid()
    lab = {labels.TEST: label, labels.KIND: "job"}
    work = docker_client.volumes.create(f"{volume}-run-{uuid.uuid4().hex[:10]}", labels=lab)
    container = None
    try:
        kwargs: dict[str, Any] = {"platform": platform} if platform else {}
        container = docker_client.containers.create(
            image, entrypoint=["/usr/bin/tini", "--", "sh", "-c", f"cd {WORK}/m && {shell}",
                               "stap"],
            command=list(args), user="stap-server", read_only=True, network_mode="none",
            tmpfs={"/tmp": "exec", "/home/stap-server": f"uid={uid},gid={uid},mode=0700"},
            environment={"HOME": "/home/stap-server", "TMPDIR": "/tmp"},
            volumes={volume: {"bind": kernels.MOUNT, "mode": "ro"},
                     work.name: {"bind": WORK, "mode": "rw"}},
            labels=lab, **kwargs)
        container.put_archive(WORK, _tar(files or {}, "m", uid))
        t0 = time.monotonic()
        container.start()
        try:
            code = int(container.wait(timeout=timeout)["StatusCode"])
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            container.kill()
            output = container.logs().decode("utf-8", "replace")
            return (124, output + f"\n[run_stap: no result after {timeout:.0f} s]", {},
                    time.monotonic() - t0)
        wall = time.monotonic() - t0
        output = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
        modules: dict[str, bytes] = {}
        stream, _ = container.get_archive(f"{WORK}/m")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            for info in tar:
                if info.isfile() and info.name.endswith((".ko", ".ko.sgn")):
                    data = tar.extractfile(info)
                    if data is not None:
                        modules[info.name.rsplit("/", 1)[-1]] = data.read()
        return code, output, modules, wall
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        work.remove(force=True)
