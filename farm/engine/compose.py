"""Compose files from the farm's container specs, pure: `service` translates the keyword
arguments of `containers.run` (farm/engine/specs.py, service_specs.py) key by key into a
compose service, `dump` writes a document as YAML (PyYAML).

Values compose takes from the environment go into the spec functions as `StrVar`/`IntVar`:
a string or an integer that a spec function uses as any other, and that comes out as the
compose variable `${NAME:-DEFAULT}`. A spec key compose cannot express raises
`ComposeError`; none is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Self

import yaml

from farm.core.arch import Arch
from farm.core.errors import FarmError

HOST_NETWORK = "hostnet"  # the stack's attachment to the external `host` network
# The options a tmpfs mount has anyway (the Mount API's defaults), and the default mode.
TMPFS_IMPLIED = frozenset({"rw", "nosuid", "nodev", "noexec", "mode=1777"})
# Keys of a container spec that have no compose counterpart, and why leaving them is right.
NOT_IN_COMPOSE = {
    "name": "compose names containers itself (a fixed name would stop replicas and stacks)",
}
_SIZE = re.compile(r"(\d+)([kmg]?)b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ComposeError(FarmError):
    """A container spec that compose cannot express."""


class StrVar(str):
    """A string compose takes from the environment: its text is `${NAME:-DEFAULT}`, or
    `${NAME:?MESSAGE}` for a required one (REQUIRED holds the message)."""

    name: str
    default: str

    def __new__(cls, name: str, default: str = "", *, required: str = "") -> Self:
        text = f"${{{name}:?{required}}}" if required else f"${{{name}:-{default}}}"
        self = super().__new__(cls, text)
        self.name, self.default = name, default
        return self


class IntVar(int):
    """An integer compose takes from the environment: DEFAULT to arithmetic and hashes,
    `${NAME:-DEFAULT}` wherever it is formatted as text (str(), f-strings, compose files)."""

    name: str

    def __new__(cls, name: str, default: int) -> Self:
        self = super().__new__(cls, default)
        self.name = name
        return self

    def __str__(self) -> str:
        return f"${{{self.name}:-{int(self)}}}"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)


class Literal(str):
    """A multi-line string written as a `|` block (a shell script)."""


class Reset:
    """Compose's `!reset` of a key (the override file only): VALUE is what replaces it."""

    def __init__(self, value: list[Any]) -> None:
        self.value = value


def script(text: str) -> Literal:
    """Shell TEXT for a compose file: `$` doubled, so compose leaves it to the shell."""
    return Literal(text.replace("$", "$$"))


def size_bytes(text: str) -> int:
    """Docker's size syntax (`1g`, `16m`, `512`) in bytes.

    Raises:
        ComposeError: not one.
    """
    m = _SIZE.match(text.strip())
    if not m:
        raise ComposeError(f"'{text}' is not a size (e.g. 1g, 16m)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def json_with_vars(obj: Any) -> str:
    """OBJ as sorted JSON, each IntVar as its bare `${NAME:-N}` (a JSON number once compose
    substitutes it); StrVars are strings already."""
    marks: dict[str, str] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, IntVar):
            mark = f"\0{len(marks)}\0"
            marks[json.dumps(mark)] = str(v)
            return mark
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(obj), sort_keys=True)
    for mark, placeholder in marks.items():
        text = text.replace(mark, placeholder)
    return text


def _value(v: Any) -> Any:
    """A value of a spec as compose reads it (each IntVar its placeholder)."""
    if isinstance(v, IntVar):
        return str(v)
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    return v


def _mount(m: Mapping[str, Any]) -> dict[str, Any]:
    extra = set(m) - {"Target", "Source", "Type", "ReadOnly"}
    if extra:
        raise ComposeError(f"mount {m.get('Target')}: cannot translate {sorted(extra)}")
    if m["Type"] not in ("volume", "bind"):
        raise ComposeError(f"mount {m['Target']}: cannot translate type {m['Type']}")
    out = {"type": m["Type"], "source": m["Source"], "target": m["Target"]}
    if m.get("ReadOnly"):
        out["read_only"] = True
    return out


def _tmpfs(target: str, options: str) -> dict[str, Any]:
    size: int | None = None
    mode: int | None = None
    for opt in options.split(","):
        key, _, value = opt.partition("=")
        if opt in TMPFS_IMPLIED:
            continue
        if key == "size":
            size = size_bytes(value)
        elif key == "mode":
            mode = int(value, 8)
        else:
            raise ComposeError(f"tmpfs {target}: cannot translate the option '{opt}'")
    fs: dict[str, Any] = {}
    if size is not None:
        fs["size"] = size  # a literal: stack deploy does not cast a variable here
    if mode is not None:
        fs["mode"] = mode
    out: dict[str, Any] = {"type": "tmpfs", "target": target}
    if fs:
        out["tmpfs"] = fs
    return out


def _ports(ports: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, (address, published) in ports.items():
        target, _, protocol = key.rpartition("/")
        if address not in ("", "0.0.0.0"):
            raise ComposeError(f"port {key}: a stack file cannot bind to {address} (only to "
                               "every address)")
        # a literal port is an integer (a stack file refuses a string); a variable stays text
        out.append({"target": int(target) if target.isdigit() else target,
                    "published": _value(published),
                    "protocol": protocol, "mode": "host"})
    return out


def _duration(ns: int) -> str:
    return f"{ns // 1_000_000_000}s" if ns % 1_000_000_000 == 0 else f"{ns // 1_000_000}ms"


def _healthcheck(h: Mapping[str, Any]) -> dict[str, Any]:
    names = {"Test": "test", "Interval": "interval", "Timeout": "timeout",
             "Retries": "retries", "StartPeriod": "start_period"}
    extra = set(h) - set(names)
    if extra:
        raise ComposeError(f"health check: cannot translate {sorted(extra)}")
    return {names[k]: (_duration(v) if k in ("Interval", "Timeout", "StartPeriod") else v)
            for k, v in h.items()}


def _restart(policy: Mapping[str, Any]) -> str:
    name = str(policy.get("Name", ""))
    if set(policy) - {"Name"} or name not in ("no", "always", "unless-stopped", "on-failure"):
        raise ComposeError(f"cannot translate the restart policy {dict(policy)}")
    return name


def service(spec: Mapping[str, Any], *, cpus: StrVar | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compose service of the container SPEC, and what the override file adds to it
    (what `docker stack deploy` refuses). CPUS: the variable `nano_cpus` becomes, whose
    default must be SPEC's value.

    Raises:
        ComposeError: a key or value compose cannot express.
    """
    unknown = set(spec) - set(_SIMPLE) - set(_HANDLED) - set(NOT_IN_COMPOSE)
    if unknown:
        raise ComposeError(f"cannot translate the container spec key(s) {sorted(unknown)} "
                           "to compose")
    out: dict[str, Any] = {}
    override: dict[str, Any] = {}
    for key, name in _SIMPLE.items():
        if key in spec:
            out[name] = _value(spec[key])
    if "network_mode" in spec:
        if spec["network_mode"] != "host":
            raise ComposeError(f"cannot translate network_mode {spec['network_mode']}")
        # A stack joins the host network as a network; compose only by network_mode.
        out["networks"] = [HOST_NETWORK]
        override.update(networks=Reset([]), network_mode="host")
    if "restart_policy" in spec:
        out["restart"] = _restart(spec["restart_policy"])
    if "ports" in spec:
        out["ports"] = _ports(spec["ports"])
    volumes = [_mount(m) for m in spec.get("mounts", [])]
    volumes += [_tmpfs(t, o) for t, o in spec.get("tmpfs", {}).items()]
    if volumes:
        out["volumes"] = volumes
    if "healthcheck" in spec:
        out["healthcheck"] = _healthcheck(spec["healthcheck"])
    if "labels" in spec:
        out["labels"] = _value(spec["labels"])
    deploy = _deploy(spec, cpus)
    if deploy:
        out["deploy"] = deploy
    return out, override


def _deploy(spec: Mapping[str, Any], cpus: StrVar | None) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if "mem_limit" in spec:
        limits["memory"] = spec["mem_limit"]
    if "nano_cpus" in spec:
        value = f"{spec['nano_cpus'] / 1e9:g}"
        if cpus is not None and cpus.default != value:
            raise ComposeError(f"{cpus.name}'s default {cpus.default} is not the spec's "
                               f"{value} CPUs")
        limits["cpus"] = cpus if cpus is not None else value
    if "pids_limit" in spec:
        if isinstance(spec["pids_limit"], IntVar):
            raise ComposeError("the PID limit must be a literal: stack deploy does not cast "
                               "a variable to the integer it needs there")
        limits["pids"] = spec["pids_limit"]
    deploy: dict[str, Any] = {"resources": {"limits": limits}} if limits else {}
    if "platform" in spec:  # the image's architecture: nodes of that architecture
        arch = Arch.parse(spec["platform"])
        deploy["placement"] = {"constraints": [f"node.platform.arch == {arch.machine}"]}
    return deploy


# Spec keys whose compose key only differs in name (values as they are).
_SIMPLE = {"image": "image", "user": "user", "hostname": "hostname",
           "entrypoint": "entrypoint", "command": "command", "environment": "environment",
           "read_only": "read_only", "cap_drop": "cap_drop", "cap_add": "cap_add",
           "security_opt": "security_opt", "ipc_mode": "ipc", "stop_signal": "stop_signal"}
_HANDLED = ("network_mode", "restart_policy", "ports", "mounts", "tmpfs", "healthcheck",
            "labels", "mem_limit", "nano_cpus", "pids_limit", "platform")


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, no aliases, scripts as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key


def _add(kind: type, fn: Callable[[_Dumper, Any], yaml.Node]) -> None:
    _Dumper.add_representer(kind, fn)


_add(StrVar, lambda d, v: d.represent_str(str(v)))
_add(IntVar, lambda d, v: d.represent_str(str(v)))
_add(Literal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", str(v), style="|"))
_add(Reset, lambda d, v: d.represent_sequence("!reset", v.value, flow_style=True))


def dump(doc: Mapping[str, Any], header: str = "") -> str:
    """DOC as YAML after HEADER (comment lines)."""
    body = yaml.dump(dict(doc), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=96, allow_unicode=True)
    return header + body
