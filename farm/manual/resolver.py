"""The resolver: the command line's options against the running servers and the server
files, as the `Request`s the planner takes (stap-server(8)'s `-n`/`-p` selection rules)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from farm.core.backend import RunningServer
from farm.core.errors import ConfigError, FarmError, KernelTreeError
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.manual.host import Host
from farm.manual.options import DISTRIBUTED, Options, absolute
from farm.manual.plan import Action, Request
from farm.manual.render import PROG
from farm.manual.server_config import (
    BadServerFile,
    ServerDraft,
    ServerFiles,
    load_server_configs,
    resolve_bad_file,
    resolve_server,
)


@dataclass
class _Entry:
    draft: ServerDraft
    server: RunningServer | None = None  # selected by -p / -n of a running server
    origin: str = "cli"  # cli | running | configured | new | unknown
    nickname: str = ""
    modified: bool = False
    base: ServerConfig | None = None  # a configured server as its file describes it


class Resolver:
    """Turns the command line into `Request`s against the observed servers and the config.

    Problems in server files that do not concern the command are collected in `warnings`.
    """

    def __init__(self, action: Action, g: GlobalConfig, host: Host,
                 observed: list[RunningServer]) -> None:
        self.action, self.g, self.host, self.observed = action, g, host, observed
        self._configured: ServerFiles | None = None
        self.warnings: list[str] = []
        self._warned = False

    def configured(self) -> ServerFiles:
        """The server files of CONFIG_PATH, read once.

        Raises:
            ConfigError: CONFIG_PATH cannot be listed.
        """
        if self._configured is None:
            self._configured = load_server_configs(self.g.config_path)
        return self._configured

    def warn_bad_files(self, files: ServerFiles | None = None) -> None:
        """Add a warning per problem of every bad server file (once)."""
        if self._warned:
            return
        self._warned = True
        if files is None:
            try:
                files = self.configured()
            except ConfigError as e:
                self.warnings += [f"warning: {p}" for p in e.problems]
                return
        self.warnings += [f"warning: {p}" for b in files.bad for p in b.problems]

    def requests(self, o: Options) -> list[Request] | None:
        """A request per server the options describe, in order; None when they name none.

        Raises:
            FarmError: a `-p` that no server has, a nickname only a bad file describes, a
                `-r /PATH` that is no build tree, an unreadable MODULES_DIR for `-i`.
        """
        if not o.names_servers:
            return None
        entries: list[_Entry] = []
        leading: list[tuple[str, str]] = []
        for opt, value in o.events:
            if opt in ("n", "p"):
                entries.append(self._select(opt, value))
                if len(entries) == 1:
                    for ev in leading:
                        self._apply(entries[0], *ev)
            elif entries:
                self._apply(entries[-1], opt, value)
            else:
                leading.append((opt, value))
        if not entries:
            entries.append(_Entry(ServerDraft()))
            for ev in leading:
                self._apply(entries[0], *ev)
        live = [e for e in entries if e.origin != "unknown"]
        for name, values in o.lists.items():
            attr = DISTRIBUTED[name]
            for entry, value in zip(live, values):
                entry.modified = True
                setattr(entry.draft, attr, value if name in ("log", "ssl") else int(value))
        return [self._request(e) for e in entries]

    def _select(self, opt: str, value: str) -> _Entry:
        if opt == "p":
            pid = int(value)
            for s in self.observed:
                if s.pid == pid:
                    return _Entry(ServerDraft.from_config(s.config), s, "running")
            raise FarmError(f"No {PROG} running as pid {pid}")
        named = [s for s in self.observed if s.nickname == value]
        named.sort(key=lambda s: not s.running)
        if named:
            return _Entry(ServerDraft.from_config(named[0].config), named[0], "running")
        files = self.configured()
        for d in files.good:
            if d.nickname == value:
                return _Entry(d.copy(), origin="configured",
                              base=resolve_server(d, self.g, self.host))
        bad = [b for b in files.bad if b.nickname == value]
        if bad:  # the server the user means is described by a bad file: say why
            raise ConfigError([p for b in bad for p in b.problems])
        # a bad file whose NICKNAME could not be read may be the one meant
        self.warn_bad_files(ServerFiles(tuple(b for b in files.bad if b.nickname is None)))
        if self.action.start_like:
            return _Entry(ServerDraft(nickname=value), origin="new")
        return _Entry(ServerDraft(), origin="unknown", nickname=value)

    def _apply(self, e: _Entry, opt: str, value: str) -> None:
        if e.origin == "unknown":
            return
        e.modified = True
        d = e.draft
        if opt == "a":
            d.arch = value
        elif opt == "r":
            if value.startswith("/") and not os.path.isfile(
                    os.path.join(value, "include", "config", "kernel.release")):
                raise KernelTreeError(f"Missing {value}/include/config/kernel.release",
                                      hint="-r /PATH must be a configured kernel build tree")
            if value not in d.releases:  # `-n X -r R` where X already has R: same server
                d.releases.append(value)
        elif opt == "i":
            for release in self._installed_releases():
                if release not in d.releases:
                    d.releases.append(release)
        elif opt == "I":
            d.include.append(os.path.normpath(absolute("-I", value, self.host.cwd)))
        elif opt == "D":
            d.define.append(value)
        elif opt == "B":
            d.build.append(value)
        elif opt == "R":
            d.runtime = os.path.normpath(absolute("-R", value, self.host.cwd))
        elif opt == "u":
            d.user = value
        elif opt == "strategy":
            d.strategy = Strategy(value.lower())

    def _installed_releases(self) -> list[str]:
        base = self.g.modules_dir
        try:
            names = sorted(os.listdir(base))
        except OSError as e:
            raise KernelTreeError(f"-i: cannot list {base}: {e.strerror or e}") from e
        found = [n for n in names if os.path.isdir(os.path.join(base, n, "build"))]
        if not found:
            raise KernelTreeError(f"-i: no kernel release with a build tree in {base}",
                                  hint="install the kernel headers, or name releases with -r")
        return found

    def _request(self, e: _Entry) -> Request:
        if e.origin == "unknown":
            return Request(None, nickname=e.nickname)
        if e.server is not None and not e.modified:
            return Request(e.server.config, e.server)
        config = resolve_server(e.draft, self.g, self.host)
        if e.server is not None:
            if config.identity() == e.server.config.identity():
                return Request(config, e.server)
            # A server derived from a running one is another server: it must not take the
            # running one's name (upstream's intent: "a configuration based on a nicknamed
            # configuration"); it is named by its PID.
            config = replace(config, nickname="")
        elif e.base is not None and config.identity() != e.base.identity():
            # Likewise for one derived from a configured server (`start -n NICK -a ARCH`):
            # two servers named NICK would leave `stop -n NICK` reaching only one.
            config = replace(config, nickname="")
        return Request(config)

    def defaults(self) -> list[ServerConfig | BadServerFile]:
        """The configured servers (a bad file stands for the server it fails to describe),
        else one default server."""
        files = self.configured()
        if not files.entries:
            return [resolve_server(ServerDraft(), self.g, self.host)]
        return [resolve_server(x, self.g, self.host) if isinstance(x, ServerDraft)
                else resolve_bad_file(x, self.g, self.host) for x in files.entries]
