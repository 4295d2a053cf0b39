"""Per-server configuration files (`CONFIG_PATH/*.conf`, stat files) and the manual's
defaults that turn a draft into a `ServerConfig`.

A file is one server. Every problem of a file is collected (each naming `FILE:LINE`); a file
with problems describes no server but blocks no other (`BadServerFile`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from farm.core.arch import Arch
from farm.core.errors import ArchError, ConfigError
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
    ServerConfig,
    Strategy,
)
from farm.manual.config_lines import (
    MAX_PORT,
    MAX_REQUEST_BYTES,
    MAX_THREADS,
    Assignment,
    parse_int,
    parse_strategy,
    read_config_text,
    shown,
    split_lines,
    unknown_variable,
)
from farm.manual.host import Host

ROOT_DEFAULT_USER = "stap-server"  # who servers run as when root starts them (never root)

SERVER_ARRAYS = ("RELEASE", "BUILD", "INCLUDE", "DEFINE")
SERVER_SCALARS = ("ARCH", "RUNTIME", "USER", "NICKNAME", "LOG", "PORT", "SSL", "MAXTHREADS",
                  "MAXREQSIZE", "MAXCOMPRESSEDREQ", "STRATEGY")
SERVER_VARIABLES = SERVER_ARRAYS + SERVER_SCALARS
_ARRAY_FIELD = {"RELEASE": "releases", "BUILD": "build", "INCLUDE": "include",
                "DEFINE": "define"}
_SIZE = f"a size in bytes (1-{MAX_REQUEST_BYTES}, i.e. at most 1 GiB)"


@dataclass
class ServerDraft:
    """A server description being assembled from a file and/or the command line.

    `None` (or an empty list) means "not set": `resolve_server` applies the defaults.
    """

    arch: str | None = None
    releases: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    define: list[str] = field(default_factory=list)
    runtime: str | None = None
    user: str | None = None
    nickname: str | None = None
    log: str | None = None
    port: int | None = None
    ssl: str | None = None
    max_threads: int | None = None
    max_request_size: int | None = None
    max_compressed_request: int | None = None
    strategy: Strategy | None = None
    source: str = ""

    @classmethod
    def from_config(cls, c: ServerConfig) -> ServerDraft:
        """The draft that resolves back to C."""
        return cls(arch=c.arch, releases=list(c.releases), build=list(c.build),
                   include=list(c.include), define=list(c.define), runtime=c.runtime or None,
                   user=c.user or None, nickname=c.nickname or None, log=c.log or None,
                   port=c.port, ssl=c.ssl or None, max_threads=c.max_threads,
                   max_request_size=c.max_request_size,
                   max_compressed_request=c.max_compressed_request, strategy=c.strategy,
                   source=c.source)

    def copy(self) -> ServerDraft:
        """An independent copy (the lists are not shared)."""
        return replace(self, releases=list(self.releases), build=list(self.build),
                       include=list(self.include), define=list(self.define))


@dataclass(frozen=True)
class BadServerFile:
    """A server `.conf` that describes no server: its problems, and what it says.

    WRITTEN holds the file's values as written (`VARIABLE`, values), arrays after `=`/`+=`,
    so that `start` can show the server it could not start, as upstream would.
    """

    path: str
    problems: tuple[str, ...]
    nickname: str | None = None  # NICKNAME as written, when the file sets one
    written: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def value(self, name: str) -> tuple[str, ...]:
        """The values the file gives VARIABLE NAME (() when none)."""
        return next((v for n, v in self.written if n == name), ())


@dataclass
class _ParsedFile:
    """One parse of a server file: the draft of its valid lines and everything else."""

    draft: ServerDraft
    problems: list[str]
    written: dict[str, list[str]]
    nickname_where: str = ""  # FILE:LINE of the NICKNAME in effect

    def bad(self, extra: Iterable[str] = ()) -> BadServerFile:
        return BadServerFile(self.draft.source, tuple(self.problems) + tuple(extra),
                             (self.written.get("NICKNAME") or [""])[0] or None,
                             tuple((n, tuple(v)) for n, v in self.written.items() if v))


def _parse_server_file(text: str, path: str) -> _ParsedFile:
    parsed = _ParsedFile(ServerDraft(source=path), [], {})
    for a in split_lines(text, path):
        if isinstance(a, str):
            parsed.problems.append(a)
            continue
        _apply_server(parsed.draft, a, parsed.problems)
        if a.name in SERVER_ARRAYS:
            items = parsed.written.setdefault(a.name, [])
            if not a.append:
                items.clear()
            if a.value not in ("", "()"):
                items.append(a.value)
        elif a.name in SERVER_SCALARS and not a.append:
            parsed.written[a.name] = [a.value] if a.value else []
            if a.name == "NICKNAME":
                parsed.nickname_where = a.where
    return parsed


def parse_server_text(text: str, path: str) -> ServerDraft:
    """Parse the text of a server `.conf` (or `.stat`) file named PATH.

    Raises:
        ConfigError: every invalid line, unknown variable or bad value, each as `PATH:LINE: ...`.
    """
    parsed = _parse_server_file(text, path)
    if parsed.problems:
        raise ConfigError(parsed.problems)
    return parsed.draft


def _apply_server(d: ServerDraft, a: Assignment, problems: list[str]) -> None:
    if a.name not in SERVER_VARIABLES:
        problems.append(unknown_variable(a, SERVER_VARIABLES))
        return
    if a.name in SERVER_ARRAYS:
        items: list[str] = getattr(d, _ARRAY_FIELD[a.name])
        empty = a.value in ("", "()")  # upstream treats `X=()` like `X=`
        if a.name == "INCLUDE" and not empty and not a.value.startswith("/"):
            problems.append(f"{a.where}: INCLUDE: '{shown(a.value)}' is not an absolute path")
            return
        if not a.append:
            items.clear()
        if not empty:
            items.append(a.value)
        return
    if a.append:
        problems.append(f"{a.where}: {a.name} is not an array; write {a.name}={shown(a.value)}")
        return
    value = a.value
    if a.name == "ARCH":
        if value.strip():
            try:
                d.arch = Arch.parse(value).stap
            except ArchError as e:
                problems.append(f"{a.where}: ARCH: {e}")
        else:
            d.arch = None
    elif a.name == "USER":
        if value == "root":
            problems.append(f"{a.where}: USER=root: a compile server never runs as root "
                            "(stap-serverd refuses it); name an unprivileged user")
        d.user = value or None
    elif a.name in ("RUNTIME", "LOG", "SSL"):
        if value and not value.startswith("/"):
            problems.append(f"{a.where}: {a.name}: '{shown(value)}' is not an absolute path")
        setattr(d, a.name.lower(), value or None)
    elif a.name == "NICKNAME":
        d.nickname = value or None
    elif a.name == "PORT":
        d.port = parse_int(a, 0, MAX_PORT, "a port number", problems) or None if value else None
    elif a.name == "MAXTHREADS":
        d.max_threads = (parse_int(a, 0, MAX_THREADS, "a thread count", problems)
                         if value else None)
    elif a.name in ("MAXREQSIZE", "MAXCOMPRESSEDREQ"):
        n = parse_int(a, 1, MAX_REQUEST_BYTES, _SIZE, problems) if value else None
        if a.name == "MAXREQSIZE":
            d.max_request_size = n
        else:
            d.max_compressed_request = n
    elif a.name == "STRATEGY":
        d.strategy = parse_strategy(a, problems) if value else None



def server_files(config_path: str) -> list[str]:
    """The `*.conf` files of directory CONFIG_PATH, sorted; [] if it does not exist.

    Raises:
        ConfigError: CONFIG_PATH exists but cannot be listed.
    """
    try:
        names = sorted(os.listdir(config_path))
    except FileNotFoundError:
        return []
    except NotADirectoryError as e:
        raise ConfigError(f"{config_path}: CONFIG_PATH is not a directory") from e
    except OSError as e:
        raise ConfigError(f"{config_path}: cannot list CONFIG_PATH: {e.strerror or e}") from e
    return [os.path.join(config_path, n) for n in names
            if n.endswith(".conf") and not os.path.isdir(os.path.join(config_path, n))]


@dataclass(frozen=True)
class ServerFiles:
    """The configured servers of CONFIG_PATH, in file-name order: a draft per good file, a
    `BadServerFile` per file that describes no server (one bad file blocks no other)."""

    entries: tuple[ServerDraft | BadServerFile, ...] = ()

    @property
    def good(self) -> list[ServerDraft]:
        return [e for e in self.entries if isinstance(e, ServerDraft)]

    @property
    def bad(self) -> list[BadServerFile]:
        return [e for e in self.entries if isinstance(e, BadServerFile)]


def load_server_configs(config_path: str) -> ServerFiles:
    """Every server file of CONFIG_PATH, in file-name order, each good or with its problems.

    Two files that set the same NICKNAME are both bad: each names the other's FILE:LINE.

    Raises:
        ConfigError: CONFIG_PATH itself cannot be listed.
    """
    parsed: list[_ParsedFile | BadServerFile] = []
    for path in server_files(config_path):
        try:
            text = read_config_text(path)
        except ConfigError as e:
            parsed.append(BadServerFile(path, tuple(e.problems)))
            continue
        one = _parse_server_file(text, path)
        if not _is_utf8(os.path.basename(path)):
            one.problems.insert(0, f"{path}: the file name is not valid UTF-8 (rename it)")
        parsed.append(one)
    by_nickname: dict[str, list[_ParsedFile]] = {}
    for p in parsed:
        if isinstance(p, _ParsedFile) and p.draft.nickname:
            by_nickname.setdefault(p.draft.nickname, []).append(p)
    clashes: dict[int, list[str]] = {}
    for nick, same in by_nickname.items():
        for p in same if len(same) > 1 else ():
            others = ", ".join(o.nickname_where for o in same if o is not p)
            clashes[id(p)] = [(f"{p.nickname_where}: NICKNAME '{shown(nick)}' is also set "
                               f"in {others} (a nickname names one server)")]
    entries: list[ServerDraft | BadServerFile] = []
    for p in parsed:
        if isinstance(p, BadServerFile):
            entries.append(p)
        elif p.problems or id(p) in clashes:
            entries.append(p.bad(clashes.get(id(p), ())))
        else:
            entries.append(p.draft)
    return ServerFiles(tuple(entries))


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes decoded with surrogateescape
        return False
    return True


def default_user(g: GlobalConfig, host: Host) -> str:
    """STAP_USER, else the invoking user; `stap-server` when that would be root."""
    if g.stap_user:
        return g.stap_user
    return ROOT_DEFAULT_USER if host.euid == 0 else host.user


def resolve_server(d: ServerDraft, g: GlobalConfig, host: Host) -> ServerConfig:
    """Apply the manual's defaults to D: host arch, running kernel, default user and log."""
    return ServerConfig(
        arch=d.arch or host.arch,
        releases=tuple(d.releases) or (host.release,),
        build=tuple(d.build),
        include=tuple(d.include),
        define=tuple(d.define),
        runtime=d.runtime or "",
        user=d.user or default_user(g, host),
        nickname=d.nickname or "",
        log=d.log or g.log_file,
        port=d.port or None,
        ssl=d.ssl or "",
        max_threads=d.max_threads,
        max_request_size=d.max_request_size or DEFAULT_MAX_REQUEST_SIZE,
        max_compressed_request=d.max_compressed_request or DEFAULT_MAX_COMPRESSED_REQUEST,
        strategy=d.strategy or g.strategy,
        source=d.source,
    )


def resolve_bad_file(b: BadServerFile, g: GlobalConfig, host: Host) -> BadServerFile:
    """B with the manual's defaults where it gives no ARCH, RELEASE, USER or LOG (for its
    `Starting` line, like every other server's)."""
    defaults = {"ARCH": host.arch, "RELEASE": host.release, "USER": default_user(g, host),
                "LOG": g.log_file}
    written = dict(b.written)
    for name, value in defaults.items():
        written.setdefault(name, (value,))
    return replace(b, written=tuple(written.items()))
