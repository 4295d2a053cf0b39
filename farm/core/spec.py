"""Frozen value objects shared by every layer: server configurations and the farm's settings."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Practical request limits. Upstream's 50000/5000 bytes silently drop ordinary requests
# (a one-line script request is ~3.8 kB compressed; a tapset directory is far more).
DEFAULT_MAX_REQUEST_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_COMPRESSED_REQUEST = 16 * 1024 * 1024


class Strategy(str, enum.Enum):
    """How a server builds for its target architecture."""

    AUTO = "auto"  # native, else cross, else emulated
    NATIVE = "native"  # image arch == target arch
    CROSS = "cross"  # host-arch image, cross toolchain, -B CROSS_COMPILE=...
    EMULATED = "emulated"  # target-arch image under qemu-user


@dataclass(frozen=True)
class ServerConfig:
    """One compile server as stap-server(8) describes it (a .conf file or a command line).

    Values are kept as the user wrote them (BUILD keeps its quotes, as upstream); `arch` is
    already normalised to stap's name (`x86_64`, `arm64`).
    """

    arch: str
    releases: tuple[str, ...] = ()
    build: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    define: tuple[str, ...] = ()
    runtime: str = ""
    user: str = ""
    nickname: str = ""
    log: str = ""
    port: int | None = None
    ssl: str = ""
    max_threads: int | None = None
    max_request_size: int | None = None
    max_compressed_request: int | None = None
    strategy: Strategy = Strategy.AUTO
    source: str = ""  # the .conf file it came from, "" for the command line

    def to_dict(self) -> dict[str, Any]:
        """The one serialisation of a server configuration: Docker labels, `status --json`,
        compose files (JSON types; `strategy` by value)."""
        return {"arch": self.arch, "releases": list(self.releases), "build": list(self.build),
                "include": list(self.include), "define": list(self.define),
                "runtime": self.runtime, "user": self.user, "nickname": self.nickname,
                "log": self.log, "port": self.port, "ssl": self.ssl,
                "max_threads": self.max_threads, "max_request_size": self.max_request_size,
                "max_compressed_request": self.max_compressed_request,
                "strategy": self.strategy.value, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServerConfig:
        """The configuration `to_dict` wrote.

        Raises:
            ValueError, TypeError, KeyError: D is not one.
        """
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in d.items() if k in known}
        for key in ("releases", "build", "include", "define"):
            args[key] = tuple(str(x) for x in (d.get(key) or ()))
        args["strategy"] = Strategy(d.get("strategy", "auto"))
        return cls(**args)

    def identity(self) -> tuple[object, ...]:
        """What makes two configurations the same server (everything but nickname/source)."""
        return (self.arch, self.releases, self.build, self.include, self.define, self.runtime,
                self.user, self.log, self.port, self.ssl, self.max_threads,
                self.max_request_size, self.max_compressed_request, self.strategy)


@dataclass(frozen=True)
class GlobalConfig:
    """The global configuration file's settings (the manual's variables plus the farm's)."""

    config_path: str
    stat_path: str
    log_file: str
    stap_user: str = ""
    state_dir: str = ""  # farm state: certificate databases, locks, caches
    strategy: Strategy = Strategy.AUTO
    image_prefix: str = "stapfarm/server"
    listen_address: str = "0.0.0.0"
    mdns_interfaces: tuple[str, ...] = ()  # () = every LAN interface
    cert_names: tuple[str, ...] = ()  # extra DNS names for server certificates
    modules_dir: str = "/lib/modules"  # what -i scans
    debian_mirror: str = ""  # "" until load_global resolves it from the host's apt sources
    kernel_suites: tuple[str, ...] = ("trixie",)
    apt_allow_expired: bool = False
    memory_limit: str = "2g"
    pids_limit: int = 512
    cpus: float = 2.0  # per server; one compile uses one core (0 = no limit)
    tmpfs_size: str = "1g"
    # The farm endpoint (farm/endpoint.py): one TLS address for every target.
    endpoint_port: int = 5100
    endpoint_metrics_port: int = 9164  # Prometheus metrics (0 = off)
    endpoint_provision: bool = False  # start a server for a target nobody serves
    endpoint_offer: tuple[str, ...] = ()  # ARCH[:RELEASE] provisioning may start ( () = any )
    endpoint_cache_size: str = "4g"
    endpoint_max_connections: int = 256
    endpoint_idle_timeout: int = 30  # seconds of silence while a request is read
    # The endpoint as a trust boundary (docs/reliability.md, "The endpoint as a trust
    # boundary"): every bound explicit.
    endpoint_user: str = "stap-endpoint"  # the unprivileged uid of the TLS front door
    endpoint_policy: tuple[str, ...] = ()  # allowances: allow-guru, allow-absolute-paths
    endpoint_metrics_address: str = "127.0.0.1"
    endpoint_max_per_source: int = 32  # open connections from one client address
    endpoint_write_timeout: int = 60  # seconds a client may take to read one answer
    endpoint_queue_timeout: int = 900  # seconds a request may wait for a build slot
    endpoint_max_queue: int = 256  # requests waiting for a build slot, all servers
    endpoint_memory: str = "512m"  # request bytes held in memory at once, all requests
    # the largest server answer accepted, on the wire and unpacked: a tracepoint module's
    # answer is ~80 MiB unpacked (measured, x86_64, Debian 13 kernel)
    endpoint_max_response: str = "256m"
    endpoint_provision_idle: int = 14400  # seconds unused before a provisioned server goes
    endpoint_max_provisioned: int = 8
    # Set by the environment only (docs/cli.md, "Environment"): tests, a second farm on one
    # host, the compose farm.
    prefix: str = "stapfarm"  # the owner label and the first word of every resource name
    test_label: str = ""  # org.stapfarm.test on every resource ("" = none)
    hostname: str = ""  # the name clients use for this host ("" = the machine's name)
    home_volume: str = ""  # a compose farm's named volume for servers' HOME ("" = STATE_DIR)
    log_volume: str = ""  # its volume for servers' logs ("" = home_volume)
    server_ids: tuple[int, int] = (155, 155)  # uid, gid of servers on home_volume
    images_dir: str = ""  # the Dockerfiles' directory ("" = the package's images/)
    sources: tuple[str, ...] = field(default=())  # global files that were read

    @property
    def probe_address(self) -> str:
        """Where this host's published ports answer: LISTEN_ADDRESS, loopback for "any".
        The one rule for everything that probes a server or the endpoint from the host."""
        return "127.0.0.1" if self.listen_address in ("", "0.0.0.0", "::") \
            else self.listen_address
