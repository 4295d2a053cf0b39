"""Configuration files as stap-server(8) reads them: the global file(s) and per-server `*.conf`.

Both are line-oriented `VARIABLE=VALUE` files, not shell: the value is everything after the
`=`, taken literally (quotes are kept). `#` lines and blank lines are ignored. Every problem
in a file is collected and reported at once as one `ConfigError`, each naming `FILE:LINE`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from farm.arch import Arch
from farm.errors import ArchError, ConfigError
from farm.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
    ServerConfig,
    Strategy,
)

DEFAULT_GLOBAL_FILE = "/etc/sysconfig/stap-server"
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
        ConfigError: the file is missing, unreadable, a directory or not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such configuration file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
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


def _parse_int(a: Assignment, lo: int, hi: int | None, what: str, problems: list[str]
               ) -> int | None:
    value = a.value.strip()
    if not value.isascii() or not value.isdigit() or not (
            lo <= int(value) and (hi is None or int(value) <= hi)):
        upper = f"-{hi}" if hi is not None else " or more"
        problems.append(f"{a.where}: {a.name}: '{a.value}' is not {what} ({lo}{upper})")
        return None
    return int(value)


# --------------------------------------------------------------------------- servers


SERVER_ARRAYS = ("RELEASE", "BUILD", "INCLUDE", "DEFINE")
SERVER_SCALARS = ("ARCH", "RUNTIME", "USER", "NICKNAME", "LOG", "PORT", "SSL", "MAXTHREADS",
                  "MAXREQSIZE", "MAXCOMPRESSEDREQ", "STRATEGY")
SERVER_VARIABLES = SERVER_ARRAYS + SERVER_SCALARS
_ARRAY_FIELD = {"RELEASE": "releases", "BUILD": "build", "INCLUDE": "include",
                "DEFINE": "define"}


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


def parse_server_text(text: str, path: str) -> ServerDraft:
    """Parse the text of a server `.conf` (or `.stat`) file named PATH.

    Raises:
        ConfigError: every invalid line, unknown variable or bad value, each as `PATH:LINE: ...`.
    """
    problems: list[str] = []
    draft = ServerDraft(source=path)
    for a in split_lines(text, path):
        if isinstance(a, str):
            problems.append(a)
        else:
            _apply_server(draft, a, problems)
    if problems:
        raise ConfigError(problems)
    return draft


def _apply_server(d: ServerDraft, a: Assignment, problems: list[str]) -> None:
    if a.name not in SERVER_VARIABLES:
        problems.append(_unknown(a, SERVER_VARIABLES))
        return
    if a.name in SERVER_ARRAYS:
        items: list[str] = getattr(d, _ARRAY_FIELD[a.name])
        empty = a.value in ("", "()")  # upstream treats `X=()` like `X=`
        if a.name == "INCLUDE" and not empty and not a.value.startswith("/"):
            problems.append(f"{a.where}: INCLUDE: '{a.value}' is not an absolute path")
            return
        if not a.append:
            items.clear()
        if not empty:
            items.append(a.value)
        return
    if a.append:
        problems.append(f"{a.where}: {a.name} is not an array; write {a.name}={a.value}")
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
            problems.append(f"{a.where}: {a.name}: '{value}' is not an absolute path")
        setattr(d, a.name.lower(), value or None)
    elif a.name == "NICKNAME":
        d.nickname = value or None
    elif a.name == "PORT":
        d.port = _parse_int(a, 0, 65535, "a port number", problems) or None if value else None
    elif a.name == "MAXTHREADS":
        d.max_threads = _parse_int(a, 0, None, "a thread count", problems) if value else None
    elif a.name in ("MAXREQSIZE", "MAXCOMPRESSEDREQ"):
        n = _parse_int(a, 1, None, "a size in bytes", problems) if value else None
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
        problems.append(f"{a.where}: {a.name}: '{a.value}' is not one of {names}")
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


def load_server_configs(config_path: str) -> list[ServerDraft]:
    """Every configured server of CONFIG_PATH, in file-name order.

    Raises:
        ConfigError: the problems of every file at once.
    """
    drafts: list[ServerDraft] = []
    problems: list[str] = []
    for path in server_files(config_path):
        try:
            drafts.append(parse_server_text(read_config_text(path), path))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return drafts


@dataclass(frozen=True)
class Host:
    """What the defaults depend on: the machine and the invoking user (injectable in tests)."""

    arch: str  # stap name
    release: str  # uname -r
    euid: int
    user: str  # the invoking user's name
    cwd: str

    @classmethod
    def current(cls) -> Host:
        """The real machine and user."""
        euid = os.geteuid()
        try:
            user = pwd.getpwuid(euid).pw_name
        except KeyError:
            user = str(euid)
        return cls(arch=Arch.host().stap, release=os.uname().release, euid=euid, user=user,
                   cwd=os.getcwd())


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


# --------------------------------------------------------------------------- global


_GLOBAL_PATHS = {"CONFIG_PATH": "config_path", "STAT_PATH": "stat_path",
                 "LOG_FILE": "log_file", "STATE_DIR": "state_dir", "MODULES_DIR": "modules_dir"}
_GLOBAL_WORDS = {"MDNS_INTERFACES": "mdns_interfaces", "CERT_NAMES": "cert_names",
                 "KERNEL_SUITES": "kernel_suites", "ENDPOINT_OFFER": "endpoint_offer"}
_GLOBAL_OTHER = ("STAP_USER", "STRATEGY", "IMAGE_PREFIX", "LISTEN_ADDRESS", "DEBIAN_MIRROR",
                 "APT_ALLOW_EXPIRED", "MEMORY_LIMIT", "PIDS_LIMIT", "CPUS", "TMPFS_SIZE",
                 "ENDPOINT_PORT", "ENDPOINT_METRICS_PORT", "ENDPOINT_PROVISION",
                 "ENDPOINT_CACHE_SIZE", "ENDPOINT_MAX_CONNECTIONS", "ENDPOINT_IDLE_TIMEOUT")
_ENDPOINT_INTS = {"ENDPOINT_PORT": (1, 65535, "a port number"),
                  "ENDPOINT_METRICS_PORT": (0, 65535, "a port number (0 = off)"),
                  "ENDPOINT_MAX_CONNECTIONS": (1, 100000, "a connection count"),
                  "ENDPOINT_IDLE_TIMEOUT": (1, 3600, "a number of seconds")}
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
        elif a.name == "LISTEN_ADDRESS":
            try:
                changes["listen_address"] = str(ipaddress.ip_address(value))
            except ValueError:
                problems.append(f"{a.where}: LISTEN_ADDRESS: '{value}' is not an IP address")
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
        elif a.name in ("MEMORY_LIMIT", "TMPFS_SIZE", "ENDPOINT_CACHE_SIZE"):
            if _MEMORY.fullmatch(value):
                changes[a.name.lower()] = value.lower()
            else:
                problems.append(f"{a.where}: {a.name}: '{value}' is not a size "
                                "(a number with an optional b, k, m or g suffix)")
        elif a.name == "PIDS_LIMIT":
            n = _parse_int(replace(a, value=value), 1, None, "a process count", problems)
            if n is not None:
                changes["pids_limit"] = n
        elif a.name == "CPUS":
            try:
                cpus = float(value)
                if not cpus >= 0 or cpus == float("inf"):
                    raise ValueError(value)
                changes["cpus"] = cpus
            except ValueError:
                problems.append(f"{a.where}: CPUS: '{value}' is not a CPU count (0 = all)")
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
    from farm.arch import Arch
    from farm.errors import FarmError

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
                euid: int | None = None) -> GlobalConfig:
    """The farm's settings: defaults, the default global file if present, then CONFIG_FILES.

    Later files override the variables they set. The default file
    (`/etc/sysconfig/stap-server`, or `$STAPFARM_CONFIG_FILE`) is skipped when missing,
    as upstream; a file named explicitly must exist.

    Raises:
        ConfigError: a missing or unreadable explicit file, or every problem in the files.
    """
    uid = os.geteuid() if euid is None else euid
    g = default_global(environ, uid)
    files: list[str] = []
    default = global_file(environ)
    if default and os.path.exists(default):
        files.append(default)
    files.extend(config_files)
    problems: list[str] = []
    for path in files:
        try:
            g = parse_global_text(read_config_text(path), path, g, environ, uid)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return g
