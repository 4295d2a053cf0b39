"""Connecting to the Docker engine, with its failures translated once; small shared helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from farm.core.errors import DockerUnavailable


def connect(environ: Mapping[str, str] | None = None) -> Any:
    """A docker.DockerClient for the engine DOCKER_HOST (or the default socket) names.

    Raises:
        DockerUnavailable: the engine cannot be reached or refuses this user.
    """
    import docker
    import docker.errors

    try:
        client = docker.from_env(environment=dict(environ) if environ is not None else None,
                                 timeout=300)
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
    return client


def still_running(container: Any) -> bool:
    """Whether CONTAINER (refreshed from the engine) has not exited."""
    container.reload()
    return container.status not in ("exited", "dead")
