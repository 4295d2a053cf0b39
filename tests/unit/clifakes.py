"""Unit-test helpers: an in-memory backend and a farm whose every path is under tmp_path."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farm.core.backend import RunningServer
from farm.core.errors import ServerError
from farm.core.spec import ServerConfig
from farm.manual.cli import main
from farm.manual.host import Account, Group, Host


class FakeBackend:
    """`farm.core.backend.Backend` in memory: PIDs from 1000, random ports from 40000."""

    def __init__(self) -> None:
        self.servers: dict[str, RunningServer] = {}
        self.calls: list[tuple[str, object]] = []
        self.notice_lines: list[str] = []
        self.next_pid = 1000
        self.next_port = 40000
        self.fail_start: Callable[[ServerConfig], str | None] = lambda c: None
        self.fail_stop: Callable[[RunningServer], str | None] = lambda s: None
        self.on_start: Callable[[ServerConfig], None] = lambda c: None

    def add(self, config: ServerConfig, *, pid: int | None = None, running: bool = True,
            port: int | None = None, settling: bool = False) -> RunningServer:
        """Seed a server as if an earlier invocation had started it."""
        if pid is None:
            pid = self.next_pid
            self.next_pid += 1
        if port is None:
            port = config.port or self._port()
        server = RunningServer(config=config, pid=pid, port=port, container=f"ctr-{pid}",
                               running=running, settling=settling)
        self.servers[server.container] = server
        return server

    def _port(self) -> int:
        self.next_port += 1
        return self.next_port

    def list_servers(self) -> list[RunningServer]:
        self.calls.append(("list", None))
        return list(self.servers.values())

    def start(self, config: ServerConfig) -> RunningServer:
        self.calls.append(("start", config))
        self.on_start(config)
        problem = self.fail_start(config)
        if problem:
            raise ServerError(problem)
        return self.add(config)

    def stop(self, server: RunningServer) -> None:
        self.calls.append(("stop", server))
        problem = self.fail_stop(server)
        if problem:
            raise ServerError(problem)
        self.servers.pop(server.container, None)

    def notices(self) -> list[str]:
        return list(self.notice_lines)

    @property
    def started(self) -> list[ServerConfig]:
        return [c for kind, c in self.calls if kind == "start"]  # type: ignore[misc]

    @property
    def stopped(self) -> list[RunningServer]:
        return [s for kind, s in self.calls if kind == "stop"]  # type: ignore[misc]


@dataclass
class FakeAccounts:
    """`farm.manual.host.Accounts` in memory: users by name (their primary gid), groups by name."""

    users: dict[str, int] = field(default_factory=dict)
    groups: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)

    def user(self, name: str) -> Account | None:
        return Account(name, self.users[name]) if name in self.users else None

    def group(self, name: str) -> Group | None:
        if name not in self.groups:
            return None
        gid, members = self.groups[name]
        return Group(name, gid, members)


def farm_accounts() -> FakeAccounts:
    """alice (the invoking user) and bob are in group stap-server (bob as a supplementary
    member, stap-server by its primary group); mallory exists outside it."""
    return FakeAccounts(users={"alice": 1000, "bob": 1001, "mallory": 1002, "stap-server": 155},
                        groups={"stap-server": (155, ("alice", "bob")),
                                "users": (100, ("mallory",))})


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass
class Farm:
    """A farm in tmp_path: global file, conf.d, stat dir, log, state, /lib/modules stand-in."""

    root: Path
    backend: FakeBackend
    host: Host
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def global_file(self) -> Path:
        return self.root / "sysconfig" / "stap-server"

    @property
    def config_path(self) -> Path:
        return self.root / "conf.d"

    @property
    def stat_path(self) -> Path:
        return self.root / "run" / "stap-server"

    @property
    def log_file(self) -> str:
        return str(self.root / "log" / "stap-server" / "log")

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules"

    def conf(self, name: str, text: str) -> Path:
        self.config_path.mkdir(parents=True, exist_ok=True)
        path = self.config_path / name
        path.write_text(text)
        return path

    def run(self, *argv: str, host: Host | None = None) -> Result:
        out, err = io.StringIO(), io.StringIO()
        rc = main(list(argv), environ=self.environ, stdout=out, stderr=err,
                  backend=self.backend, host=host or self.host)
        return Result(rc, out.getvalue(), err.getvalue())

    def stat_files(self) -> dict[str, str]:
        if not self.stat_path.exists():
            return {}
        return {p.name: p.read_text() for p in sorted(self.stat_path.iterdir())}

    def as_root(self) -> Host:
        return Host(arch=self.host.arch, release=self.host.release, euid=0, user="root",
                    cwd=self.host.cwd, accounts=self.host.accounts)


def make_farm(tmp_path: Path) -> Farm:
    root = tmp_path / "farm"
    work = tmp_path / "work"
    home = tmp_path / "home"
    for d in (root / "sysconfig", work, home):
        d.mkdir(parents=True)
    f = Farm(root=root, backend=FakeBackend(),
             host=Host(arch="x86_64", release="6.1.0-test", euid=1000, user="alice",
                       cwd=str(work), accounts=farm_accounts()))
    f.global_file.write_text(
        "# test farm\n"
        f"CONFIG_PATH={f.config_path}\n"
        f"STAT_PATH={f.stat_path}\n"
        f"LOG_FILE={f.log_file}\n"
        f"STATE_DIR={f.state_dir}\n"
        f"MODULES_DIR={f.modules_dir}\n")
    f.environ = {"HOME": str(home), "STAPFARM_CONFIG_FILE": str(f.global_file),
                 "PATH": os.environ.get("PATH", "/usr/bin")}
    return f
