"""The one door to the Docker engine: every SDK call of the farm, its label queries and the
translation of its errors, for the resources of one farm (its owner label, the prefix).

    engine = Engine.connect(environ, prefix="stapfarm")          # DockerUnavailable
    for c in engine.containers("server", running=True): ...      # owner + kind labels
    engine.run(spec, "the server")                                # ServerError, port in use
    engine.remove(c)                                              # stop, then remove
    out = engine.job(image, ["stap", "-V"])                       # a one-shot container

Nothing else in the farm imports the Docker SDK (docker-py ships no type information, so
containers, images and volumes are the SDK's objects, typed `Any`, read only through the
few attributes this module documents: `.id`, `.name`, `.labels`, `.status`, `.attrs`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
from docker.types import Healthcheck, Mount

from farm.core import labels
from farm.core.errors import DockerUnavailable, ImageError, ServerError

__all__ = ["Engine", "Healthcheck", "Mount", "started_at", "still_running"]

Container = Any  # docker.models.containers.Container
Say = Callable[[str], None]
MAX_FILE = 16 << 20  # bytes read_file returns at most


class NameTaken(ServerError):
    """A container of that name exists already."""


def _explain(e: BaseException) -> str:
    """Docker's reason in one line."""
    text = getattr(e, "explanation", None) or str(e)
    return " ".join(str(text).split())[:300]


@dataclass
class Engine:
    """The Docker engine as the farm of PREFIX uses it (TEST_LABEL marks a test's resources)."""

    client: Any  # docker.DockerClient
    prefix: str = "stapfarm"
    test_label: str = ""
    _closed: bool = field(default=False, repr=False)
    _events: Any = field(default=None, repr=False)

    @classmethod
    def connect(cls, environ: Mapping[str, str] | None = None, prefix: str = "stapfarm",
                test_label: str = "", timeout: int = 300) -> Engine:
        """The engine DOCKER_HOST (or the default socket) names.

        Raises:
            DockerUnavailable: it cannot be reached or refuses this user.
        """
        try:
            client = docker.from_env(environment=dict(environ) if environ is not None else None,
                                     timeout=timeout)
            client.ping()
        except docker.errors.DockerException as e:
            text = str(e)
            if "Permission denied" in text:
                raise DockerUnavailable(
                    "permission denied on the Docker socket",
                    hint="run as root or add your user to the 'docker' group") from e
            raise DockerUnavailable(
                f"cannot reach the Docker engine ({text.splitlines()[0] if text else e!r})",
                hint="start it (make up sets it up) or set DOCKER_HOST") from e
        return cls(client, prefix, test_label)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    # ------------------------------------------------------------------ labels
    def labels(self, kind: str, **extra: str) -> dict[str, str]:
        """The labels of a resource of this farm: owner, kind, the test's label, EXTRA."""
        out = {labels.OWNER: self.prefix, labels.KIND: kind, **extra}
        if self.test_label:
            out[labels.TEST] = self.test_label
        return out

    def _filter(self, kind: str, extra: Iterable[str]) -> list[str]:
        return [f"{labels.OWNER}={self.prefix}", f"{labels.KIND}={kind}", *extra]

    # ------------------------------------------------------------------ containers
    def containers(self, kind: str, *, running: bool = False,
                   having: Iterable[str] = ()) -> list[Container]:
        """This farm's containers of KIND (and labels HAVING: `key` or `key=value`), running
        ones only when RUNNING.

        Raises:
            DockerUnavailable: the engine went away.
        """
        filters: dict[str, Any] = {"label": self._filter(kind, having)}
        if running:
            filters["status"] = "running"
        try:
            # ignore_removed: a container removed between the listing and its inspection
            # (a stack, the broker or another command removing it) is simply not listed
            return list(self.client.containers.list(all=not running, filters=filters,
                                                    ignore_removed=True))
        except docker.errors.DockerException as e:
            raise DockerUnavailable(f"cannot list containers: {_explain(e)}") from e

    def container(self, name_or_id: str) -> Container | None:
        """The container NAME_OR_ID, or None when there is none."""
        try:
            return self.client.containers.get(name_or_id)
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as e:
            raise DockerUnavailable(f"cannot look up {name_or_id}: {_explain(e)}") from e

    def run(self, spec: Mapping[str, Any], what: str) -> Container:
        """Start a detached container from SPEC (`containers.run` keyword arguments); a
        failed start leaves nothing behind.

        Raises:
            ServerError: the port is taken, or Docker refused (with its reason).
            ImageError: the image is missing.
        """
        try:
            return self.client.containers.run(detach=True, **spec)
        except docker.errors.ImageNotFound as e:
            raise ImageError(f"image {spec.get('image')} is missing",
                             hint="build it: stap-server images build") from e
        except docker.errors.APIError as e:
            name = spec.get("name")
            if e.status_code == 409:  # the name is taken: a concurrent start made it first
                raise NameTaken(f"{what}: a container named {name} exists already") from e
            if name:
                self.remove_named(str(name))
            text = str(e)
            if "port is already allocated" in text or "address already in use" in text:
                raise ServerError(f"{what}: its port is already in use",
                                  hint="choose another port") from e
            raise ServerError(f"docker refused to start {what}: {_explain(e)}") from e

    def ensure(self, spec: Mapping[str, Any], what: str, stop_timeout: int = 10) -> Container:
        """The container SPEC describes, running: kept when one of its name runs with the
        same spec hash, else (re)created. Idempotent, also against a concurrent caller.

        Raises:
            ServerError: Docker refused.
        """
        current = self.container(str(spec["name"]))
        if current is not None:
            if current.labels.get(labels.SPEC_HASH) == spec["labels"][labels.SPEC_HASH] \
                    and current.status == "running":
                return current
            self.remove(current, timeout=stop_timeout)
        try:
            return self.run(spec, what)
        except NameTaken:
            again = self.container(str(spec["name"]))
            if again is None:
                raise
            return again

    def remove(self, c: Container, timeout: int = 10) -> None:
        """Stop C (its stop signal, then KILL after TIMEOUT s) and remove it; gone is fine.

        Raises:
            ServerError: Docker refused.
        """
        try:
            if c.status in ("running", "restarting"):
                c.stop(timeout=timeout)
            c.remove(force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:
            raise ServerError(f"docker could not remove {c.name}: {_explain(e)}") from e

    def remove_named(self, name: str) -> None:
        """Remove the container NAME at once (no stop signal) if it exists."""
        c = self.container(name)
        if c is not None:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                raise ServerError(f"docker could not remove {name}: {_explain(e)}") from e

    def exec(self, c: Container, cmd: list[str], user: str = "") -> tuple[int, str]:
        """(exit code, output) of CMD run in C.

        Raises:
            ServerError: C is gone or Docker refused.
        """
        try:
            code, out = c.exec_run(cmd, user=user) if user else c.exec_run(cmd)
        except docker.errors.DockerException as e:
            raise ServerError(f"exec {cmd[0]} in {c.name} failed: {_explain(e)}") from e
        text = out.decode("utf-8", "replace") if isinstance(out, bytes) else str(out)
        return int(code if code is not None else -1), text

    def read_file(self, c: Container, path: str) -> bytes:
        """The regular file PATH in C (at most MAX_FILE bytes); b"" when it is not there."""
        try:
            stream, _ = c.get_archive(path)
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                for m in tar.getmembers():
                    f = tar.extractfile(m)
                    if f is not None:
                        return f.read(MAX_FILE)
        except (docker.errors.DockerException, tarfile.TarError, OSError):
            return b""
        return b""

    def put_archive(self, c: Container, path: str, data: bytes | Any) -> None:
        """Unpack the tar DATA at PATH in C.

        Raises:
            ServerError: Docker refused.
        """
        try:
            ok = c.put_archive(path, data)
        except docker.errors.DockerException as e:
            raise ServerError(f"cannot write into {c.name}:{path}: {_explain(e)}") from e
        if not ok:
            raise ServerError(f"cannot write into {c.name}:{path}")

    def top_pids(self, c: Container, marker: str) -> list[int]:
        """Host PIDs of C's processes whose command line contains MARKER."""
        try:
            top = c.top(ps_args="-eo pid,args")
        except docker.errors.DockerException:
            return []  # a container that just exited has no processes
        titles = [t.upper() for t in top.get("Titles", [])]
        pid_col = titles.index("PID") if "PID" in titles else 0
        return [int(p[pid_col]) for p in top.get("Processes") or []
                if any(marker in part for part in p[pid_col + 1:])]

    def logs(self, c: Container, tail: int = 15) -> str:
        try:
            return str(c.logs(tail=tail).decode("utf-8", "replace").strip())
        except docker.errors.DockerException as e:
            return f"(no log: {_explain(e)})"

    def job(self, image: str, command: list[str] | None = None, *, what: str,
            entrypoint: list[str] | None = None, **kw: Any) -> str:
        """Run a one-shot container of IMAGE (labelled a job of this farm, removed after) and
        return its output (stdout and stderr).

        Raises:
            ServerError: it exited non-zero (its output in the message) or Docker refused.
            ImageError: the image is missing.
        """
        kw.setdefault("labels", self.labels("job"))
        try:
            out = self.client.containers.run(image, command, entrypoint=entrypoint,
                                             remove=True, stderr=True, **kw)
        except docker.errors.ContainerError as e:
            err = (e.stderr or b"").decode("utf-8", "replace").strip()
            raise ServerError(f"{what} failed (exit {e.exit_status}): {err}") from e
        except docker.errors.ImageNotFound as e:
            raise ImageError(f"image {image} is missing",
                             hint="build it: stap-server images build") from e
        except docker.errors.DockerException as e:
            raise ServerError(f"{what} failed: {_explain(e)}") from e
        return str(out.decode("utf-8", "replace") if isinstance(out, bytes) else out)

    def helper(self, image: str, *, what: str, **kw: Any) -> Container:
        """A long-lived helper container of IMAGE (`sleep` under tini, labelled a job); the
        caller removes it.

        Raises:
            ImageError: the image is missing.
            ServerError: Docker refused.
        """
        spec = {"image": image, "entrypoint": ["/usr/bin/tini", "--"],
                "command": ["sleep", "86400"], "labels": self.labels("job"), **kw}
        return self.run(spec, what)

    def events(self, kind: str) -> Iterator[dict[str, Any]]:
        """This farm's container events of KIND, decoded, until the engine goes away (the
        iterator then ends; `close_events` ends it from another thread)."""
        stream = self.client.events(decode=True, filters={
            "type": ["container"], "label": self._filter(kind, ())})
        self._events = stream
        try:
            yield from stream
        finally:
            self._events = None

    def close_events(self) -> None:
        stream = self._events
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream is best effort
                return

    def events_since(self, since: int, until: int, event: str) -> list[dict[str, Any]]:
        """Container events named EVENT between two Unix times (any owner)."""
        return list(self.client.events(since=since, until=until, decode=True,
                                       filters={"type": "container", "event": event}))

    # ------------------------------------------------------------------ volumes
    def volume_exists(self, name: str) -> bool:
        try:
            self.client.volumes.get(name)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.DockerException as e:
            raise DockerUnavailable(f"cannot look up volume {name}: {_explain(e)}") from e

    def ensure_volume(self, name: str, kind: str, **extra: str) -> None:
        """The volume NAME, labelled as this farm's KIND (created when missing)."""
        if not self.volume_exists(name):
            try:
                self.client.volumes.create(name, labels=self.labels(kind, **extra))
            except docker.errors.APIError as e:
                if e.status_code != 409:  # created meanwhile
                    raise ServerError(f"cannot create volume {name}: {_explain(e)}") from e

    # ------------------------------------------------------------------ images
    def image(self, tag: str) -> Any:
        """The local image TAG, or None."""
        try:
            return self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.DockerException as e:
            raise DockerUnavailable(f"cannot look up image {tag}: {_explain(e)}") from e

    def pull(self, repository: str, tag: str, platform: str) -> Any:
        """The image pulled from a registry, or None when no registry has it."""
        try:
            return self.client.images.pull(repository, tag, platform=platform)
        except docker.errors.APIError:
            return None

    def tag(self, image: Any, tag: str) -> None:
        repository, _, name = tag.rpartition(":")
        image.tag(repository, name)

    def build(self, *, path: str, dockerfile: str, tag: str, buildargs: Mapping[str, str],
              platform: str, image_labels: Mapping[str, str], say: Say,
              show: Callable[[str], bool] = lambda line: False) -> Any:
        """Build TAG (classic builder) and return the image; the lines SHOW selects are said.

        Raises:
            ImageError: the build failed (its last lines in the message).
        """
        tail: list[str] = []
        error = ""
        try:
            for chunk in self.client.api.build(path=path, dockerfile=dockerfile, tag=tag,
                                               buildargs=dict(buildargs), platform=platform,
                                               labels=dict(image_labels), rm=True,
                                               forcerm=True, pull=False, decode=True):
                if "error" in chunk:
                    error = str(chunk["error"]).strip()
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        tail = (tail + [line])[-15:]
                        if show(line):
                            say(f"  {line.strip()}")
        except docker.errors.DockerException as e:
            error = _explain(e)
        if error:
            raise ImageError(f"building {tag} failed: {error}\n" + "\n".join(tail),
                             hint="on a mirror serving an expired testing Release, build with "
                                  "--allow-expired-release (APT_ALLOW_EXPIRED=yes)")
        return self.image(tag)

    def stats_memory(self, c: Container) -> int:
        """C's current memory use in bytes (0 when unknown)."""
        try:
            return int(c.stats(stream=False)["memory_stats"].get("usage", 0))
        except (docker.errors.DockerException, KeyError, TypeError, ValueError):
            return 0


def still_running(c: Container) -> bool:
    """Whether C (refreshed from the engine) has not exited."""
    try:
        c.reload()
    except docker.errors.NotFound:
        return False
    except docker.errors.DockerException as e:
        raise DockerUnavailable(f"cannot look up {c.name}: {_explain(e)}") from e
    return c.status not in ("exited", "dead")


def started_at(c: Container) -> str:
    """When C's current run started (Docker's StartedAt), "" when unknown."""
    return str((c.attrs.get("State") or {}).get("StartedAt", ""))
