"""mDNS service records for the farm's servers, exactly as upstream stap-serverd publishes them.

Pure: observed servers in, `_stap._tcp.local.` services out (names, TXT bytes, ports), plus
the naming rules and the interface choice. The zeroconf and Docker side is farm/advertiser.py.
See stap-protocol.md §4: one service per (server, release), instance name
`Systemtap Compile Server on <host>` then ` #2`, ` #3`..., TXT strings in the order sysinfo,
optinfo, version, certinfo, mok_info....
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from farm.core.errors import ConfigError

SERVICE_TYPE = "_stap._tcp.local."
BASE_NAME = "Systemtap Compile Server on "
MAX_LABEL = 63  # bytes in one DNS label: upstream truncates the instance name to this
DISABLED = "none"  # MDNS_INTERFACES=none: advertise nothing

ServiceKey = tuple[str, str]  # (server id, release)


@dataclass(frozen=True)
class ObservedServer:
    """One running compile server as the advertiser found it (every field already known)."""

    server_id: str  # stable across restarts of the same server (its container name)
    host: str  # the name the server's certificate carries (its container's hostname)
    port: int  # the published host port
    arch: str  # stap's name: what `-a` was given (`arm64`, `x86_64`)
    releases: tuple[str, ...]  # kernel release strings, in the daemon's `-r` order
    optinfo: str
    version: str  # the server's systemtap version, e.g. "5.6"
    certinfo: str  # the live certificate's serial, lowercase colon hex
    mok_info: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    """One `_stap._tcp` service: what is published for one (server, release)."""

    key: ServiceKey
    host: str
    port: int
    strings: tuple[bytes, ...]  # the TXT strings, in wire order
    name: str = field(default="", compare=True)  # instance name, without the type

    @property
    def txt(self) -> bytes:
        """The TXT RDATA: each string prefixed by its length (RFC 6763 §6)."""
        return b"".join(bytes([len(s)]) + s for s in self.strings)

    @property
    def fullname(self) -> str:
        return f"{self.name}.{SERVICE_TYPE}"


def txt_strings(release: str, arch: str, optinfo: str, version: str, certinfo: str,
                mok_info: Sequence[str] = ()) -> tuple[bytes, ...]:
    """The TXT strings upstream publishes, in its order (mok_info last: clients read every
    entry after the first mok_info as a fingerprint)."""
    strings = [f"sysinfo={release} {arch}", f"optinfo={optinfo}", f"version={version}",
               f"certinfo={certinfo}"] + [f"mok_info={m}" for m in mok_info]
    out = tuple(s.encode("utf-8") for s in strings)
    for s in out:
        if len(s) > 255:
            raise ValueError(f"TXT string longer than 255 bytes: {s[:40]!r}...")
    return out


# --------------------------------------------------------------------------- daemon argv


_SHORT_WITH_VALUE = "aBDIRr"
_LONG_WITH_VALUE = ("--port", "--ssl", "--log", "--max-threads", "--max-request-size",
                    "--max-compressed-request")


@dataclass(frozen=True)
class DaemonArgs:
    """What stap-serverd's command line says about its advertisement."""

    arch: str = ""
    releases: tuple[str, ...] = ()
    runtime: str = ""  # -R value
    build: tuple[str, ...] = ()
    define: tuple[str, ...] = ()
    include: tuple[str, ...] = ()

    @property
    def optinfo(self) -> str:
        """Upstream's optinfo: `-R<R> -B<B>... -D<D>... -I<I>...`, space-separated (no -a)."""
        parts = ([f"-R{self.runtime}"] if self.runtime else []) + \
            [f"-B{b}" for b in self.build] + [f"-D{d}" for d in self.define] + \
            [f"-I{i}" for i in self.include]
        return " ".join(parts)


def parse_daemon_args(argv: Sequence[str]) -> DaemonArgs:
    """Read stap-serverd's `-a -r -B -D -I -R` options (getopt style: `-B X` or `-BX`)."""
    found: dict[str, list[str]] = {k: [] for k in _SHORT_WITH_VALUE}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _LONG_WITH_VALUE:
            i += 2
            continue
        if len(arg) >= 2 and arg[0] == "-" and arg[1] in _SHORT_WITH_VALUE:
            if len(arg) > 2:
                found[arg[1]].append(arg[2:])
            elif i + 1 < len(argv):
                found[arg[1]].append(argv[i + 1])
                i += 1
        i += 1
    return DaemonArgs(arch=found["a"][-1] if found["a"] else "",
                      releases=tuple(found["r"]),
                      runtime=found["R"][-1] if found["R"] else "",
                      build=tuple(found["B"]), define=tuple(found["D"]),
                      include=tuple(found["I"]))


_VERSION = re.compile(r"\(version ([0-9]+(?:\.[0-9]+)+)")


def parse_stap_version(text: str) -> str:
    """`5.6` from `stap -V` output (`Systemtap translator/driver (version 5.6/0.194, ...)`).

    Raises:
        ValueError: TEXT has no version.
    """
    m = _VERSION.search(text)
    if not m:
        raise ValueError(f"no systemtap version in {text.strip()[:120]!r}")
    return m.group(1)


# --------------------------------------------------------------------------- services


def _order(s: ObservedServer) -> tuple[object, ...]:
    return (s.host, s.port, s.server_id)


def services(servers: Iterable[ObservedServer]) -> list[Service]:
    """One unnamed Service per (server, release), in a deterministic order: by host, port,
    server id, then the server's own release order. A release listed twice counts once."""
    out: list[Service] = []
    for s in sorted(servers, key=_order):
        for rel in dict.fromkeys(s.releases):
            out.append(Service(key=(s.server_id, rel), host=s.host, port=s.port,
                               strings=txt_strings(rel, s.arch, s.optinfo, s.version,
                                                   s.certinfo, s.mok_info)))
    return out


def endpoint_view(servers: Iterable[ObservedServer], *, endpoint_id: str, port: int,
                  certinfo: str, offers: Iterable[tuple[str, str]] = ()) -> list[ObservedServer]:
    """What to publish while the farm endpoint runs: the endpoint once per architecture, for
    every release a server of that architecture handles plus the OFFERS (arch, release) it
    would provision, instead of the servers themselves (so clients use the one address, and
    its cache). Host, optinfo and the highest version come from the servers; an offered
    architecture no server handles yet borrows them from any server (none: not published).
    """
    servers = sorted(servers, key=_order)
    if not servers:
        return []
    by_arch: dict[str, list[ObservedServer]] = {}
    for s in servers:
        by_arch.setdefault(s.arch, []).append(s)
    offered: dict[str, list[str]] = {}
    for arch, rel in offers:
        offered.setdefault(arch, []).append(rel)
    out = []
    for arch in sorted(set(by_arch) | set(offered)):
        group = by_arch.get(arch) or servers
        releases = [r for s in by_arch.get(arch, []) for r in s.releases] + offered.get(arch, [])
        version = max((s.version for s in group), key=_version_key)
        out.append(ObservedServer(server_id=f"{endpoint_id}/{arch}", host=group[0].host,
                                  port=port, arch=arch, releases=tuple(dict.fromkeys(releases)),
                                  optinfo="", version=version, certinfo=certinfo))
    return out


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _truncate(text: str, limit: int) -> str:
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


def instance_name(host: str, n: int = 1) -> str:
    """The n-th instance name on HOST: upstream's base name, then avahi's ` #n` alternatives,
    the base cut so the whole fits one DNS label."""
    base = _truncate(BASE_NAME + host, MAX_LABEL)
    if n <= 1:
        return base
    suffix = f" #{n}"
    return _truncate(base, MAX_LABEL - len(suffix)).rstrip() + suffix


def _is_name_of(name: str, host: str) -> bool:
    m = re.fullmatch(r".* #([0-9]+)", name)
    return name == instance_name(host, int(m.group(1)) if m else 1)


def assign_names(wanted: Sequence[Service], previous: Mapping[ServiceKey, str] | None = None,
                 taken: Iterable[str] = ()) -> list[Service]:
    """WANTED with instance names: a service keeps the name it had (PREVIOUS) while it is
    still free, others get the lowest free `#n` of their host in WANTED's order. TAKEN
    holds names others hold on the network (compared case-insensitively, as DNS does)."""
    prev = dict(previous or {})
    used = {t.lower() for t in taken}
    named: dict[ServiceKey, str] = {}
    for svc in wanted:
        old = prev.get(svc.key)
        if old and old.lower() not in used and _is_name_of(old, svc.host):
            named[svc.key] = old
            used.add(old.lower())
    for svc in wanted:
        if svc.key in named:
            continue
        n = 1
        while instance_name(svc.host, n).lower() in used:
            n += 1
        named[svc.key] = instance_name(svc.host, n)
        used.add(named[svc.key].lower())
    return [Service(key=s.key, host=s.host, port=s.port, strings=s.strings,
                    name=named[s.key]) for s in wanted]


@dataclass(frozen=True)
class Changes:
    """What to do to go from the published services to the wanted ones."""

    remove: tuple[Service, ...] = ()
    add: tuple[Service, ...] = ()
    update: tuple[Service, ...] = ()  # same name, new port or TXT

    def __bool__(self) -> bool:
        return bool(self.remove or self.add or self.update)


def diff(published: Iterable[Service], wanted: Iterable[Service]) -> Changes:
    """Changes turning PUBLISHED into WANTED (a renamed service is removed and added)."""
    have = {s.key: s for s in published}
    want = {s.key: s for s in wanted}
    remove, add, update = [], [], []
    for key, was in have.items():
        now = want.get(key)
        if now is None or now.name != was.name or now.host != was.host:
            remove.append(was)
    for key, now in want.items():
        prior = have.get(key)
        if prior is None or now.name != prior.name or now.host != prior.host:
            add.append(now)
        elif now != prior:
            update.append(now)
    return Changes(tuple(remove), tuple(add), tuple(update))


# --------------------------------------------------------------------------- interfaces


def disabled(wanted: Sequence[str]) -> bool:
    """MDNS_INTERFACES=none turns advertising off."""
    return [w.lower() for w in wanted] == [DISABLED]


def choose_addresses(wanted: Sequence[str],
                     interfaces: Mapping[str, Sequence[str]]) -> list[str]:
    """The IPv4 addresses to advertise on: WANTED names interfaces or addresses (an empty
    WANTED means every interface but loopback). INTERFACES maps each interface name to its
    IPv4 addresses.

    Raises:
        ConfigError: a wanted name or address this host does not have, or nothing left.
    """
    def usable(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return ip.version == 4 and not ip.is_loopback and not ip.is_link_local

    if not wanted:
        found = [a for addrs in interfaces.values() for a in addrs if usable(a)]
        if not found:
            raise ConfigError("MDNS_INTERFACES: this host has no IPv4 LAN interface to "
                              "advertise on", hint="name one in MDNS_INTERFACES")
        return list(dict.fromkeys(found))
    every = {a for addrs in interfaces.values() for a in addrs}
    out: list[str] = []
    problems = []
    for w in wanted:
        if w in interfaces:
            v4 = [a for a in interfaces[w] if ipaddress.ip_address(a).version == 4]
            if not v4:
                problems.append(f"MDNS_INTERFACES: interface {w} has no IPv4 address")
            out += v4
            continue
        try:
            ip = ipaddress.ip_address(w)
        except ValueError:
            known = ", ".join(sorted(interfaces)) or "none"
            problems.append(f"MDNS_INTERFACES: no interface '{w}' on this host "
                            f"(interfaces: {known})")
            continue
        if ip.version != 4:
            problems.append(f"MDNS_INTERFACES: {w}: only IPv4 addresses are advertised")
        elif w not in every:
            problems.append(f"MDNS_INTERFACES: no interface of this host has address {w}")
        else:
            out.append(w)
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys(out))
