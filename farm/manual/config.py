"""The farm's settings (`GlobalConfig`), loaded in stages: defaults, the global file
(`/etc/sysconfig/stap-server` or `$STAPFARM_CONFIG_FILE`), the last `-c FILE`, then the
farm's environment variables.

The files have the syntax of farm/manual/config_lines.py; every problem of a stage is
collected and reported at once as one `ConfigError`, each naming `FILE:LINE` (or the
environment variable). Per-server files are farm/manual/server_config.py.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import replace

from farm.core.arch import Arch
from farm.core.errors import ConfigError, FarmError
from farm.core.spec import GlobalConfig
from farm.kernels.mirror import host_debian_mirror
from farm.manual.config_lines import (
    MAX_CPUS,
    MAX_PID,
    MIN_CPUS,
    bounded_int,
    parse_int,
    parse_strategy,
    read_config_text,
    shown,
    split_lines,
    unknown_variable,
)

DEFAULT_GLOBAL_FILE = "/etc/sysconfig/stap-server"
CONFIG_FILE_ENV = "STAPFARM_CONFIG_FILE"  # replaces DEFAULT_GLOBAL_FILE ("" = none)

_MEMORY = re.compile(r"[0-9]+[bkmgBKMG]?")

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
            problems.append(unknown_variable(a, GLOBAL_VARIABLES))
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
            strategy = parse_strategy(a, problems)
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
            n = parse_int(replace(a, value=value), lo, hi, what, problems)
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
            n = parse_int(replace(a, value=value), 1, MAX_PID, "a process count", problems)
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
    arch, sep, release = word.partition(":")
    try:
        Arch.parse(arch)
    except FarmError:
        return False
    return not sep or re.fullmatch(r"[a-zA-Z0-9_.+-]+", release) is not None


def global_file(environ: Mapping[str, str]) -> str:
    """The default global configuration file ("" for none)."""
    return environ.get(CONFIG_FILE_ENV, DEFAULT_GLOBAL_FILE)


# --------------------------------------------------------------------------- environment

# Docker's rule for container and volume names, and a DNS name as farm/trust/store.py's
# check_host accepts it (the host name is written into certificates and a root script).
_DOCKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")
MAX_PREFIX = 64  # the prefix starts every container and volume name of the farm
MAX_ID = 4294967294  # the largest uid/gid: (uid_t)-1 means "no change" to chown(2)


def _prefix(text: str) -> str:
    if len(text) > MAX_PREFIX or not _DOCKER_NAME.fullmatch(text):
        raise ValueError(f"a word Docker accepts in names (letters, digits, '_', '.', '-', "
                         f"a letter or digit first, at most {MAX_PREFIX} characters)")
    return text


def _volume(text: str) -> str:
    if len(text) < 2 or len(text) > 255 or not _DOCKER_NAME.fullmatch(text):
        raise ValueError("a Docker volume name (2-255 letters, digits, '_', '.', '-', a "
                         "letter or digit first)")
    return text


def _hostname(text: str) -> str:
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise ValueError("a DNS name (the name clients use for this host)")
    return text


def _uid(text: str) -> int:
    n = bounded_int(text, 1, MAX_ID)
    if n is None:
        raise ValueError(f"a user id (1-{MAX_ID}; a compile server never runs as root)")
    return n


def _gid(text: str) -> int:
    n = bounded_int(text, 0, MAX_ID)
    if n is None:
        raise ValueError(f"a group id (0-{MAX_ID})")
    return n


def _directory(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("an absolute path")
    return os.path.normpath(text)


def _printable(text: str) -> str:
    """TEXT with control characters (and undecodable bytes) escaped: one line, always."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# The farm's environment variables (docs/cli.md, "Environment"), applied over the files:
# variable → (GlobalConfig field, parser raising ValueError with what the value must be).
# STAPFARM_SERVER_UID/GID each set one half of `server_ids`.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "STAPFARM_PREFIX": ("prefix", _prefix),
    "STAPFARM_TEST_LABEL": ("test_label", str),
    "STAPFARM_HOSTNAME": ("hostname", _hostname),
    "STAPFARM_HOME_VOLUME": ("home_volume", _volume),
    "STAPFARM_LOG_VOLUME": ("log_volume", _volume),
    "STAPFARM_SERVER_UID": ("server_uid", _uid),
    "STAPFARM_SERVER_GID": ("server_gid", _gid),
    "STAPFARM_IMAGES_DIR": ("images_dir", _directory),
}


def apply_environment(g: GlobalConfig, environ: Mapping[str, str]) -> GlobalConfig:
    """G with the farm's environment variables of ENVIRON applied (`load_global`'s last
    stage); a variable set to "" counts as unset.

    Raises:
        ConfigError: every variable with a bad value, each as `environment: VARIABLE: ...`.
    """
    problems: list[str] = []
    changes: dict[str, object] = {}
    for name, (attr, parse) in ENVIRONMENT.items():
        text = environ.get(name, "")
        if not text:
            continue
        try:
            changes[attr] = parse(text)
        except ValueError as e:
            problems.append(f"environment: {name}: '{shown(_printable(text))}' is not {e}")
    if problems:
        raise ConfigError(problems)
    uid = changes.pop("server_uid", g.server_ids[0])
    gid = changes.pop("server_gid", g.server_ids[1])
    assert isinstance(uid, int) and isinstance(gid, int)
    # mypy cannot match **changes to the fields by name; each parser gave its field's type
    return replace(g, server_ids=(uid, gid), **changes)  # type: ignore[arg-type]


def load_global(config_files: list[str], environ: Mapping[str, str], *,
                euid: int | None = None, apt_root: str = "/") -> GlobalConfig:
    """The farm's settings: defaults, the default global file if present, then the LAST of
    CONFIG_FILES (the `-c` options), then the farm's variables of ENVIRON (`ENVIRONMENT`).

    stap-server(8)'s `-c FILE` names one additional file (upstream keeps `OPT_CONFIG_FILE`:
    the last one wins), so the earlier ones are not read. The default file
    (`/etc/sysconfig/stap-server`, or `$STAPFARM_CONFIG_FILE`) is skipped when missing,
    as upstream; a file named explicitly must exist. Without DEBIAN_MIRROR, the mirror is
    the host's apt configuration under APT_ROOT (farm/kernels/mirror.py; "" when it names
    none).

    Raises:
        ConfigError: a missing or unreadable explicit file, or every problem in the files
            and the environment.
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
    try:
        g = apply_environment(g, environ)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if not g.debian_mirror:
        g = replace(g, debian_mirror=host_debian_mirror(apt_root))
    return g
