"""Session-level fixtures for tests that use the real Docker engine (fixtures only: the
helpers tests import live in tests/support/).

Everything a test creates in Docker (containers, volumes, networks) carries the label
`org.stapfarm.test=<session id>` (farm.core.labels.TEST); the `test_label` fixture's finalizer
removes all of it at the end of the session, containers first, then networks, then volumes,
whatever happened. Resources a test did not create are never touched.

Fixtures (all session-scoped):
    docker_client    a docker.DockerClient (fails when no engine, unless
                     STAPFARM_ALLOW_NO_DOCKER=1, then the test is skipped)
    test_label       the session id carried by every test resource
    test_prefix      `stapfarmtest<id>`: the farm resource prefix (STAPFARM_PREFIX) of tests
    session_dir      a temporary directory for the session (mirror caches, config files)
    mirror           farm.kernels.debian.Mirror for the farm's Debian mirror, cached under session_dir
    releases         {"x86_64": newest trixie amd64 release, "arm64": newest arm64 release}
    server_images    {"x86_64": tag, "arm64": tag} of the farm's server images (must exist)
    kernel_trees     KernelTrees: lazily built trees, at most once per session
    farm_environ     environ for farm.manual.actions actions (test prefix, test label, private state)
    test_network     a labelled bridge network
    gateway          the host's address on test_network

Ordering: tests marked `engine_restart` (they restart the machine's Docker engine) run last,
whatever their file's name.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `import tests.support.client` however pytest was started
    sys.path.insert(0, str(REPO))

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.core.errors import DockerUnavailable
from farm.engine import images
from farm.engine.docker import Engine
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from tests.support.resources import cleanup_label
from tests.support.trees import SUITES, KernelTrees

# --------------------------------------------------------------------------- engine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the engine is a `docker` test, marked or not (so `-m "not docker"`
    really runs without an engine); tests marked `engine_restart` run last (they restart the
    machine's Docker engine, which every other test would feel)."""
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()) and \
                item.get_closest_marker("docker") is None:
            item.add_marker(pytest.mark.docker)
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """The Docker engine. Unreachable is a failure: CI must not pass by skipping."""
    try:
        client = Engine.connect().client
    except DockerUnavailable as e:
        if os.environ.get("STAPFARM_ALLOW_NO_DOCKER") == "1":
            pytest.skip(f"no Docker engine (STAPFARM_ALLOW_NO_DOCKER=1): {e}")
        pytest.fail(f"no Docker engine: {e} (set STAPFARM_ALLOW_NO_DOCKER=1 to skip these "
                    "tests instead)", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_label(docker_client: Any) -> Iterator[str]:
    """This session's id; its resources are removed at the end of the session."""
    label = uuid.uuid4().hex[:10]
    try:
        yield label
    finally:
        problems = cleanup_label(docker_client, label)
        if problems:
            pytest.fail("test resources left behind:\n  " + "\n  ".join(problems),
                        pytrace=False)


@pytest.fixture(scope="session")
def test_prefix(test_label: str) -> str:
    """The farm resource prefix of this session (kernel volumes: <prefix>-kernels-<debarch>)."""
    return f"stapfarmtest{test_label}"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stapfarm-session")


# --------------------------------------------------------------------------- mirror


def _farm_mirror_url() -> str:
    """The Debian mirror the farm resolves: DEBIAN_MIRROR of the global file, else the host's
    apt sources (the latter alone when the global file does not load)."""
    from farm.core.errors import ConfigError
    from farm.kernels.mirror import HINT, host_debian_mirror
    from farm.manual.config import load_global

    try:
        url = load_global([], os.environ).debian_mirror
    except ConfigError:  # configuration is not what these tests are about
        url = host_debian_mirror()
    if not url:
        pytest.fail(f"no Debian mirror for the tests: {HINT}", pytrace=False)
    return url


@pytest.fixture(scope="session")
def mirror(session_dir: Path) -> Mirror:
    return Mirror(_farm_mirror_url(), session_dir / "mirror-cache")


@pytest.fixture(scope="session")
def releases(mirror: Mirror) -> dict[str, str]:
    """The newest trixie kernel release the mirror offers now, per target (stap arch name)."""
    found: dict[str, str] = {}
    for arch in (X86_64, ARM64):
        offered = kernels.available(mirror, SUITES, arch)
        if not offered:
            pytest.fail(f"{mirror.url} offers no {'/'.join(SUITES)} kernel release for "
                        f"{arch.debian}", pytrace=False)
        found[arch.stap] = offered[0]
    return found


# --------------------------------------------------------------------------- images, trees


def server_image_tag(arch: Arch) -> str:
    """The farm's default tag of ARCH's server image (stapfarm/server:<uname -m>)."""
    from farm.core.spec import GlobalConfig

    return images.image_tag(GlobalConfig(config_path="", stat_path="", log_file=""), arch)


@pytest.fixture(scope="session")
def server_images(docker_client: Any) -> dict[str, str]:
    """The farm's server images by image arch (stap name); set-up (`make test`) builds them."""
    import docker.errors

    tags: dict[str, str] = {}
    missing = []
    for arch in (X86_64, ARM64):
        tag = server_image_tag(arch)
        try:
            docker_client.images.get(tag)
        except docker.errors.ImageNotFound:
            missing.append(tag)
        tags[arch.stap] = tag
    if missing:
        pytest.fail(f"server image(s) {', '.join(missing)} missing: run `make setup` (or "
                    "`stap-server images build --allow-expired-release`)", pytrace=False)
    return tags


@pytest.fixture(scope="session")
def kernel_trees(docker_client: Any, mirror: Mirror, releases: dict[str, str],
                 server_images: dict[str, str], test_prefix: str,
                 test_label: str) -> KernelTrees:
    """Trees for the newest trixie releases: call .tree(image_arch, target) to get one."""
    engine = Engine(docker_client, test_prefix, test_label)
    stores = {a.stap: TreeStore(engine, a, server_images[a.stap]) for a in (X86_64, ARM64)}
    return KernelTrees(client=docker_client, mirror=mirror, releases=releases, stores=stores,
                       debuginfo={X86_64.stap: True, ARM64.stap: False})


@pytest.fixture(scope="session")
def farm_environ(test_prefix: str, test_label: str, session_dir: Path) -> dict[str, str]:
    """An environ for farm.manual.actions actions: test prefix and label, a private state directory.

    The global file is the host's (so the mirror and image settings are the ones the images
    were built with) followed by a private STATE_DIR.
    """
    from farm.manual import config
    from tests.support.client import TEST_HOST

    text = ""
    default = config.global_file(os.environ)
    if default and os.path.exists(default):
        text = Path(default).read_text()
    state = session_dir / "state"
    state.mkdir(exist_ok=True)
    gfile = session_dir / "stap-server.global"
    # No test advertises on the machine's own interfaces: discovery tests add their bridge.
    gfile.write_text(text + f"\n# tests: private state, no mDNS\nSTATE_DIR={state}\n"
                     "MDNS_INTERFACES=none\n")
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
                    "LANG", "TMPDIR")}
    env.update({"STAPFARM_PREFIX": test_prefix, "STAPFARM_TEST_LABEL": test_label,
                "STAPFARM_HOSTNAME": TEST_HOST, config.CONFIG_FILE_ENV: str(gfile)})
    return env


@pytest.fixture(scope="session")
def test_network(docker_client: Any, test_prefix: str, test_label: str) -> Any:
    """A user-defined bridge network for this session (removed with the label)."""
    return docker_client.networks.create(
        f"{test_prefix}-net", driver="bridge",
        labels={labels.TEST: test_label, labels.OWNER: test_prefix})


@pytest.fixture(scope="session")
def gateway(docker_client: Any, test_network: Any) -> str:
    """TEST_NETWORK's gateway: the host as containers on it see it, and the only address
    mDNS in tests is published on."""
    from tests.support.client import network_gateway

    return network_gateway(docker_client, test_network)
