"""Configuration files as stap-server(8) reads them: the global file(s) and per-server `*.conf`.

Both are line-oriented `VARIABLE=VALUE` files, not shell: the value is everything after the
`=`, taken literally (quotes are kept). `#` lines and blank lines are ignored. Every problem
in a file is collected and reported at once as one `ConfigError`, each naming `FILE:LINE`.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from farm.core.arch import Arch
from farm.core.errors import ArchError, ConfigError
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
    ServerConfig,
    Strategy,
)
from farm.kernels.mirror import host_debian_mirror

DEFAULT_GLOBAL_FILE = "/etc/sysconfig/stap-server"
MAX_CONFIG_BYTES = 1 << 20  # no configuration file is this large
CONFIG_FILE_ENV = "STAPFARM_CONFIG_FILE"  # replaces DEFAULT_GLOBAL_FILE ("" = none)
ROOT_DEFAULT_USER = "stap-server"  # who servers run as when root starts them (never root)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMORY = re.compile(r"[0-9]+[bkmgBKMG]?")


# --------------------------------------------------------------------------- lines


@dataclass(frozen=True)
class Assignment:
    """One `NAME=VALUE` or `NAME+=VALUE` line of a configuration file."""

    name: str
    append: bool
    value: str
    where: str  # "FILE:LINE"


def read_config_text(path: str) -> str:
    """Return the text of configuration file PATH.

    Raises:
        ConfigError: the file is missing, unreadable, a directory, larger than 1 MiB
            (`-c /dev/zero`) or not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such configuration file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except ValueError as e:  # a NUL in the name: no such file can exist
        raise ConfigError(f"{shown(path)}: no such configuration file") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a configuration "
                          "file")
    return decode_config_bytes(data, path)


def decode_config_bytes(data: bytes, path: str) -> str:
    """Decode DATA as UTF-8, naming the first bad line.

    Raises:
        ConfigError: DATA is not UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 text") from e


def split_lines(text: str, path: str) -> list[Assignment | str]:
    """Parse TEXT into assignments, in order, and a `FILE:LINE: ...` problem per invalid line."""
    out: list[Assignment | str] = []
    # Split on "\n" only, as bash `read -r` does (str.splitlines also splits on \x0b, \x1c...).
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        where = f"{path}:{number}"
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\0" in line:
            out.append(f"{where}: invalid line (contains a NUL byte)")
            continue
        eq = line.find("=")
        name = line[:eq] if eq > 0 else ""
        append = name.endswith("+")
        if append:
            name = name[:-1]
        if not _NAME.fullmatch(name):
            hint = " (no spaces around the name; this is not a shell script)" if (
                line[:1].isspace() or (eq > 0 and line[:eq].strip() != line[:eq])) else ""
            out.append(f"{where}: invalid input \"{line}\": expected VARIABLE=VALUE{hint}")
            continue
        out.append(Assignment(name, append, line[eq + 1:], where))
    return out


def _unknown(a: Assignment, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(a.name.upper(), sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{a.where}: unknown variable '{a.name}'{hint}"


# Bounds of numeric values, named in every message that refuses one (docs/cli.md).
MAX_PORT = 65535
MAX_THREADS = 1024  # stap-serverd starts one thread per worker; more only exhausts PIDS_LIMIT
MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: --max-request-size, --max-compressed-request
MAX_PID = 4194304  # PID_MAX_LIMIT, the largest pid_max a 64-bit Linux kernel accepts
MAX_CPUS = 1024.0  # CPUS: a sane cap (Docker itself refuses more CPUs than the host has)
MIN_CPUS = 0.01  # Docker's smallest CPU limit (0 still means "no limit")


def bounded_int(text: str, lo: int, hi: int) -> int | None:
    """TEXT as a decimal integer in LO..HI, else None.

    Never calls int() on more digits than HI has: Python refuses to convert strings of more
    than 4,300 digits (ValueError), and a value that long is out of range anyway.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(hi)):
        return None
    n = int(digits)
    return n if lo <= n <= hi else None


def shown(value: str, limit: int = 40) -> str:
    """VALUE for an error message: very long values are cut, with their length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit // 2]}...{value[-8:]} ({len(value)} characters)"


def _parse_int(a: Assignment, lo: int, hi: int | None, what: str, problems: list[str]
               ) -> int | None:
    value = a.value.strip()
    top = hi if hi is not None else 10 ** 18  # no traceback for an unbounded variable either
    n = bounded_int(value, lo, top)
    if n is None:
        upper = f"-{hi}" if hi is not None else " or more"
        problems.append(f"{a.where}: {a.name}: '{shown(a.value)}' is not {what} ({lo}{upper})")
    return n


# --------------------------------------------------------------------------- servers


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
        problems.append(_unknown(a, SERVER_VARIABLES))
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
        d.port = _parse_int(a, 0, MAX_PORT, "a port number", problems) or None if value else None
    elif a.name == "MAXTHREADS":
        d.max_threads = (_parse_int(a, 0, MAX_THREADS, "a thread count", problems)
                         if value else None)
    elif a.name in ("MAXREQSIZE", "MAXCOMPRESSEDREQ"):
        n = _parse_int(a, 1, MAX_REQUEST_BYTES, _SIZE, problems) if value else None
        if a.name == "MAXREQSIZE":
            d.max_request_size = n
        else:
            d.max_compressed_request = n
    elif a.name == "STRATEGY":
        d.strategy = _parse_strategy(a, problems) if value else None


def _parse_strategy(a: Assignment, problems: list[str]) -> Strategy | None:
    try:
        return Strategy(a.value.strip().lower())
    except ValueError:
        names = "|".join(s.value for s in Strategy)
        problems.append(f"{a.where}: {a.name}: '{shown(a.value)}' is not one of {names}")
        return None


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


SERVER_GROUP = "stap-server"  # stap-server(8): servers run as users of this group


@dataclass(frozen=True)
class Account:
    """A user as the host's user database knows it."""

    name: str
    gid: int  # primary group


@dataclass(frozen=True)
class Group:
    """A group as the host's group database knows it."""

    name: str
    gid: int
    members: tuple[str, ...]  # supplementary members


class Accounts(Protocol):
    """The host's users and groups (injectable: unit tests do not read /etc/passwd)."""

    def user(self, name: str) -> Account | None:
        """The user NAME, or None when there is none."""
        ...

    def group(self, name: str) -> Group | None:
        """The group NAME, or None when there is none."""
        ...


class SystemAccounts:
    """`Accounts` from the host's databases (pwd, grp: NSS)."""

    def user(self, name: str) -> Account | None:
        try:
            pw = pwd.getpwnam(name)
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            return None
        return Account(pw.pw_name, pw.pw_gid)

    def group(self, name: str) -> Group | None:
        try:
            gr = grp.getgrnam(name)
        except (KeyError, ValueError):
            return None
        return Group(gr.gr_name, gr.gr_gid, tuple(gr.gr_mem))


def server_user_problem(name: str, accounts: Accounts) -> str | None:
    """Why user NAME cannot run compile servers, or None: stap-server(8) wants an existing
    user in the `stap-server` group (as its primary or a supplementary group)."""
    user = accounts.user(name)
    if user is None:
        return f"-u {shown(name)}: no such user"
    group = accounts.group(SERVER_GROUP)
    if group is None:
        return (f"-u {shown(name)}: there is no '{SERVER_GROUP}' group on this host "
                "(scripts/setup.sh creates it)")
    if user.gid != group.gid and user.name not in group.members:
        return (f"-u {shown(name)}: user '{shown(name)}' is not a member of the "
                f"'{SERVER_GROUP}' group (usermod -a -G {SERVER_GROUP} {shown(name)})")
    return None


@dataclass(frozen=True)
class Host:
    """What the defaults depend on: the machine and the invoking user (injectable in tests)."""

    arch: str  # stap name
    release: str  # uname -r
    euid: int
    user: str  # the invoking user's name
    cwd: str  # "" when the working directory no longer exists
    accounts: Accounts = field(default_factory=SystemAccounts, compare=False, repr=False)

    @classmethod
    def current(cls) -> Host:
        """The real machine and user."""
        euid = os.geteuid()
        try:
            user = pwd.getpwuid(euid).pw_name
        except KeyError:
            user = str(euid)
        try:
            cwd = os.getcwd()
        except OSError:  # run from a deleted directory: only relative paths need it
            cwd = ""
        return cls(arch=Arch.host().stap, release=os.uname().release, euid=euid, user=user,
                   cwd=cwd)


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


# --------------------------------------------------------------------------- global


_GLOBAL_PATHS = {"CONFIG_PATH": "config_path", "STAT_PATH": "stat_path",
                 "LOG_FILE": "log_file", "STATE_DIR": "state_dir", "MODULES_DIR": "modules_dir"}
_GLOBAL_WORDS = {"MDNS_INTERFACES": "mdns_interfaces", "CERT_NAMES": "cert_names",
                 "KERNEL_SUITES": "kernel_suites", "ENDPOINT_OFFER": "endpoint_offer",
                 "ENDPOINT_POLICY": "endpoint_policy"}
_GLOBAL_OTHER = ("STAP_USER", "STRATEGY", "IMAGE_PREFIX", "LISTEN_ADDRESS", "DEBIAN_MIRROR",
                 "APT_ALLOW_EXPIRED", "MEMORY_LIMIT", "PIDS_LIMIT", "CPUS", "TMPFS_SIZE",
                 "ENDPOINT_PORT", "ENDPOINT_METRICS_PORT", "ENDPOINT_PROVISION",
                 "ENDPOINT_CACHE_SIZE", "ENDPOINT_MAX_CONNECTIONS", "ENDPOINT_IDLE_TIMEOUT",
                 "ENDPOINT_USER", "ENDPOINT_METRICS_ADDRESS", "ENDPOINT_MAX_PER_SOURCE",
                 "ENDPOINT_WRITE_TIMEOUT", "ENDPOINT_QUEUE_TIMEOUT", "ENDPOINT_MAX_QUEUE",
                 "ENDPOINT_MEMORY", "ENDPOINT_MAX_RESPONSE", "ENDPOINT_PROVISION_IDLE",
                 "ENDPOINT_MAX_PROVISIONED")
_ENDPOINT_INTS = {"ENDPOINT_PORT": (1, 65535, "a port number"),
                  "ENDPOINT_METRICS_PORT": (0, 65535, "a port number (0 = off)"),
                  "ENDPOINT_MAX_CONNECTIONS": (1, 100000, "a connection count"),
                  "ENDPOINT_IDLE_TIMEOUT": (1, 3600, "a number of seconds"),
                  "ENDPOINT_MAX_PER_SOURCE": (1, 100000, "a connection count"),
                  "ENDPOINT_WRITE_TIMEOUT": (1, 3600, "a number of seconds"),
                  "ENDPOINT_QUEUE_TIMEOUT": (1, 86400, "a number of seconds"),
                  "ENDPOINT_MAX_QUEUE": (0, 100000, "a request count"),
                  "ENDPOINT_PROVISION_IDLE": (0, 31 * 86400, "a number of seconds (0 = never)"),
                  "ENDPOINT_MAX_PROVISIONED": (0, 256, "a server count")}
ENDPOINT_POLICY_WORDS = ("allow-guru", "allow-absolute-paths")
GLOBAL_VARIABLES = tuple(_GLOBAL_PATHS) + tuple(_GLOBAL_WORDS) + _GLOBAL_OTHER
_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


def _home(environ: Mapping[str, str], euid: int) -> str:
    home = environ.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(euid).pw_dir
    except KeyError:
        return "/"


def default_global(environ: Mapping[str, str], euid: int) -> GlobalConfig:
    """Defaults before any file: upstream's paths for root, per-user XDG paths otherwise."""
    if euid == 0:
        return GlobalConfig(config_path="/etc/stap-server/conf.d",
                            stat_path="/var/run/stap-server",
                            log_file="/var/log/stap-server/log",
                            state_dir="/var/lib/stapfarm")
    home = _home(environ, euid)
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    state_home = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    state = os.path.join(state_home, "stapfarm")
    return GlobalConfig(config_path=os.path.join(config_home, "stap-server", "conf.d"),
                        stat_path=os.path.join(state, "run"),
                        log_file=os.path.join(state, "log", "stap-server.log"),
                        state_dir=state)


def expand_tilde(value: str, environ: Mapping[str, str], euid: int,
                 home_of: Callable[[str], str] | None = None) -> str:
    """`~/x` → $HOME/x, `~user/x` → that user's home/x (the manual's `CONFIG_PATH=~<user>/...`).

    Raises:
        KeyError: `~user` names no user.
    """
    if not value.startswith("~"):
        return value
    head, sep, rest = value[1:].partition("/")
    if head:
        base = home_of(head) if home_of else pwd.getpwnam(head).pw_dir
    else:
        base = _home(environ, euid)
    return base.rstrip("/") + "/" + rest if sep else base


def parse_global_text(text: str, path: str, base: GlobalConfig, environ: Mapping[str, str],
                      euid: int) -> GlobalConfig:
    """Apply the global file TEXT (named PATH) on top of BASE; empty values keep BASE's.

    Raises:
        ConfigError: every problem of the file, each as `PATH:LINE: ...`.
    """
    problems: list[str] = []
    changes: dict[str, object] = {}
    defaults = GlobalConfig(config_path="", stat_path="", log_file="")
    for a in split_lines(text, path):
        if isinstance(a, str):
            problems.append(a)
            continue
        if a.name not in GLOBAL_VARIABLES:
            problems.append(_unknown(a, GLOBAL_VARIABLES))
            continue
        if a.append and a.name not in _GLOBAL_WORDS:
            problems.append(f"{a.where}: {a.name} is not a list; write {a.name}={a.value}")
            continue
        value = a.value.strip() if a.name not in ("STAP_USER",) else a.value
        if a.name in _GLOBAL_WORDS:
            attr = _GLOBAL_WORDS[a.name]
            words = tuple(a.value.split())
            if a.name == "ENDPOINT_OFFER":
                bad = [w for w in words if not _offer_ok(w)]
                if bad:
                    problems.append(f"{a.where}: ENDPOINT_OFFER: '{bad[0]}' is not ARCH or "
                                    "ARCH:RELEASE (x86_64, aarch64, ...)")
                    continue
            if a.name == "ENDPOINT_POLICY":
                bad = [w for w in words if w not in ENDPOINT_POLICY_WORDS]
                if bad:
                    problems.append(f"{a.where}: ENDPOINT_POLICY: '{bad[0]}' is not one of "
                                    f"{', '.join(ENDPOINT_POLICY_WORDS)}")
                    continue
            if a.append:
                current = changes.get(attr, getattr(base, attr))
                assert isinstance(current, tuple)
                changes[attr] = current + words
            else:
                changes[attr] = words or getattr(defaults, attr)
            continue
        if not value:
            continue  # as upstream: an empty value keeps the default
        if a.name in _GLOBAL_PATHS:
            try:
                expanded = expand_tilde(value, environ, euid)
            except KeyError:
                problems.append(f"{a.where}: {a.name}: no such user in '{value}'")
                continue
            if not expanded.startswith("/"):
                problems.append(f"{a.where}: {a.name}: '{value}' is not an absolute path")
                continue
            changes[_GLOBAL_PATHS[a.name]] = os.path.normpath(expanded)
        elif a.name == "STAP_USER":
            if value == "root":
                problems.append(f"{a.where}: STAP_USER=root: a compile server never runs as "
                                "root (stap-serverd refuses it); name an unprivileged user")
                continue
            changes["stap_user"] = value
        elif a.name == "STRATEGY":
            strategy = _parse_strategy(a, problems)
            if strategy is not None:
                changes["strategy"] = strategy
        elif a.name in ("LISTEN_ADDRESS", "ENDPOINT_METRICS_ADDRESS"):
            try:
                changes[a.name.lower()] = str(ipaddress.ip_address(value))
            except ValueError:
                problems.append(f"{a.where}: {a.name}: '{value}' is not an IP address")
        elif a.name == "ENDPOINT_USER":
            if value == "root":
                problems.append(f"{a.where}: ENDPOINT_USER=root: the endpoint's front door "
                                "never runs as root; name an unprivileged user")
                continue
            changes["endpoint_user"] = value
        elif a.name in ("APT_ALLOW_EXPIRED", "ENDPOINT_PROVISION"):
            if value.lower() in _YES:
                changes[a.name.lower()] = _YES[value.lower()]
            else:
                problems.append(f"{a.where}: {a.name}: '{value}' is not yes or no")
        elif a.name in _ENDPOINT_INTS:
            lo, hi, what = _ENDPOINT_INTS[a.name]
            n = _parse_int(replace(a, value=value), lo, hi, what, problems)
            if n is not None:
                changes[a.name.lower()] = n
        elif a.name in ("MEMORY_LIMIT", "TMPFS_SIZE", "ENDPOINT_CACHE_SIZE", "ENDPOINT_MEMORY",
                        "ENDPOINT_MAX_RESPONSE"):
            if _MEMORY.fullmatch(value):
                changes[a.name.lower()] = value.lower()
            else:
                problems.append(f"{a.where}: {a.name}: '{value}' is not a size "
                                "(a number with an optional b, k, m or g suffix)")
        elif a.name == "PIDS_LIMIT":
            n = _parse_int(replace(a, value=value), 1, MAX_PID, "a process count", problems)
            if n is not None:
                changes["pids_limit"] = n
        elif a.name == "CPUS":
            try:
                cpus = float(value)
                # 1e308 parses, and overflows as Docker's nano_cpus: bounded here
                if not (cpus == 0 or MIN_CPUS <= cpus <= MAX_CPUS):
                    raise ValueError(value)
                changes["cpus"] = cpus
            except ValueError:
                problems.append(f"{a.where}: CPUS: '{shown(value)}' is not a CPU count "
                                f"(0 = all, else {MIN_CPUS:g}-{MAX_CPUS:g})")
        elif a.name == "DEBIAN_MIRROR":
            if not value.startswith(("http://", "https://", "file:/")):
                problems.append(f"{a.where}: DEBIAN_MIRROR: '{value}' is not an http(s) URL")
            else:
                changes["debian_mirror"] = value.rstrip("/")
        else:  # IMAGE_PREFIX
            changes[a.name.lower()] = value
    if problems:
        raise ConfigError(problems)
    return replace(base, sources=base.sources + (path,), **changes)  # type: ignore[arg-type]


def _offer_ok(word: str) -> bool:
    from farm.core.arch import Arch
    from farm.core.errors import FarmError

    arch, sep, release = word.partition(":")
    try:
        Arch.parse(arch)
    except FarmError:
        return False
    return not sep or re.fullmatch(r"[a-zA-Z0-9_.+-]+", release) is not None


def global_file(environ: Mapping[str, str]) -> str:
    """The default global configuration file ("" for none)."""
    return environ.get(CONFIG_FILE_ENV, DEFAULT_GLOBAL_FILE)


def load_global(config_files: list[str], environ: Mapping[str, str], *,
                euid: int | None = None, apt_root: str = "/") -> GlobalConfig:
    """The farm's settings: defaults, the default global file if present, then the LAST of
    CONFIG_FILES (the `-c` options).

    stap-server(8)'s `-c FILE` names one additional file (upstream keeps `OPT_CONFIG_FILE`:
    the last one wins), so the earlier ones are not read. The default file
    (`/etc/sysconfig/stap-server`, or `$STAPFARM_CONFIG_FILE`) is skipped when missing,
    as upstream; a file named explicitly must exist. Without DEBIAN_MIRROR, the mirror is
    the host's apt configuration under APT_ROOT (farm/mirror.py; "" when it names none).

    Raises:
        ConfigError: a missing or unreadable explicit file, or every problem in the files.
    """
    uid = os.geteuid() if euid is None else euid
    g = default_global(environ, uid)
    files: list[str] = []
    default = global_file(environ)
    if default and os.path.exists(default):
        files.append(default)
    files.extend(config_files[-1:])
    problems: list[str] = []
    for path in files:
        try:
            g = parse_global_text(read_config_text(path), path, g, environ, uid)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if not g.debian_mirror:
        g = replace(g, debian_mirror=host_debian_mirror(apt_root))
    return g
