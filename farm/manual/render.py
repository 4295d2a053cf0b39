"""Text the CLI prints: upstream's option display, status lines, usage, and `status --json`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from farm.core.backend import RunningServer
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    ServerConfig,
    Strategy,
)
from farm.manual.plan import PlannedStep, Step
from farm.manual.server_config import BadServerFile

PROG = "stap-server"


def quote(value: str) -> str:
    """Upstream's `quote_for_cmd`: backslash and double quote escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def server_options(config: ServerConfig, nickname: str = "") -> str:
    """Upstream's `echo_server_options` for CONFIG (NICKNAME overrides the config's)."""
    parts = [f'-a "{quote(config.arch)}"']
    parts += [f'-r "{quote(r)}"' for r in config.releases]
    if config.runtime:
        parts.append(f'-R "{quote(config.runtime)}"')
    parts += [f'-D "{quote(d)}"' for d in config.define]
    parts += [f'-I "{quote(i)}"' for i in config.include]
    parts += [f'-B "{quote(b)}"' for b in config.build]
    parts.append(f'-u "{quote(config.user)}"')
    nick = nickname or config.nickname
    if nick:
        parts.append(f'-n "{quote(nick)}"')
    parts.append(f'--log "{quote(config.log)}"')
    for flag, value in (("--port", config.port), ("--ssl", config.ssl),
                        ("--max-threads", config.max_threads),
                        ("--max-request-size", config.max_request_size),
                        ("--max-compressed-request", config.max_compressed_request)):
        if value is not None and value != "":
            parts.append(f'{flag} "{quote(str(value))}"')
    if config.strategy is not Strategy.AUTO:
        parts.append(f'--strategy "{config.strategy.value}"')
    return " ".join(parts)


# A server file's variables as upstream's `echo_server_options` shows them, in its order.
_WRITTEN_FLAGS = (("ARCH", "-a"), ("RELEASE", "-r"), ("RUNTIME", "-R"), ("DEFINE", "-D"),
                  ("INCLUDE", "-I"), ("BUILD", "-B"), ("USER", "-u"), ("NICKNAME", "-n"),
                  ("LOG", "--log"), ("PORT", "--port"), ("SSL", "--ssl"),
                  ("MAXTHREADS", "--max-threads"), ("MAXREQSIZE", "--max-request-size"),
                  ("MAXCOMPRESSEDREQ", "--max-compressed-request"), ("STRATEGY", "--strategy"))


def written_options(bad: BadServerFile) -> str:
    """The option display of a server file that describes no server, from its values as
    written (`ARCH=i386` shows as `-a "i386"`, as upstream would show it before failing)."""
    return " ".join(f'{flag} "{quote(v)}"' for name, flag in _WRITTEN_FLAGS
                    for v in bad.value(name))


def running_options(server: RunningServer) -> str:
    """Display options of a running SERVER: its nickname defaults to its PID, as upstream."""
    return server_options(server.config, server.nickname)


def step_header(step: PlannedStep) -> str:
    """The line printed before OK/FAILED for a mutating STEP ("" for silent steps)."""
    k = step.kind
    if k in (Step.START, Step.ALREADY_RUNNING):
        assert step.config is not None
        return f"Starting {PROG} {server_options(step.config)}"
    if k is Step.INVALID:
        assert step.invalid is not None
        return f"Starting {PROG} {written_options(step.invalid)}".rstrip()
    if k is Step.STOP:
        assert step.server is not None
        return f"Stopping {PROG} {running_options(step.server)}"
    if k is Step.STOP_NOT_RUNNING:
        assert step.config is not None
        return f"Stopping {PROG} {server_options(step.config)}"
    if k is Step.UNKNOWN_NICKNAME:
        return f"No configuration found for the nickname '{step.nickname}'"
    if k is Step.SKIP_NOT_RUNNING:
        assert step.config is not None
        return f"{PROG} {server_options(step.config)} is not running"
    if k is Step.NONE_RUNNING:
        return f"No managed {PROG} is running"
    return ""


def status_line(step: PlannedStep) -> str:
    """The `status` line for STEP; a running server that cannot serve (a kernel tree removed
    under it) gets one more line per problem, indented: `  kernel tree R (ARCH) missing: …`."""
    k = step.kind
    if k is Step.STATUS_RUNNING:
        assert step.server is not None
        line = f"{PROG} {running_options(step.server)} running as PID {step.server.pid}"
        return "\n".join([line, *(f"  {p}" for p in step.server.problems)])
    if k is Step.STATUS_STALE:
        assert step.server is not None
        if step.server.settling:
            return (f"{PROG} {running_options(step.server)} is starting (its container is "
                    "bringing the daemon up)")
        return (f"{PROG} {running_options(step.server)} started as PID {step.server.pid} "
                "is no longer running")
    if k is Step.STATUS_NOT_RUNNING:
        assert step.config is not None
        return f"{PROG} {server_options(step.config)} is not running"
    if k is Step.STATUS_UNKNOWN:
        return f"No configuration found for the nickname '{step.nickname}'"
    return f"No managed {PROG} is running"


def config_json(config: ServerConfig) -> dict[str, Any]:
    return {
        "arch": config.arch, "releases": list(config.releases), "build": list(config.build),
        "include": list(config.include), "define": list(config.define),
        "runtime": config.runtime, "user": config.user, "nickname": config.nickname,
        "log": config.log, "port": config.port, "ssl": config.ssl,
        "max_threads": config.max_threads, "max_request_size": config.max_request_size,
        "max_compressed_request": config.max_compressed_request,
        "strategy": config.strategy.value, "source": config.source,
    }


_STATE = {Step.STATUS_RUNNING: "running", Step.STATUS_STALE: "stale",
          Step.STATUS_NOT_RUNNING: "not-running", Step.STATUS_UNKNOWN: "unknown"}


def status_json(steps: Sequence[PlannedStep], exit_code: int,
                notices: Sequence[str] = ()) -> str:
    """`status --json`: {"servers": [...], "notices": [...], "exit_code": N}."""
    servers: list[dict[str, Any]] = []
    for st in steps:
        if st.kind is Step.STATUS_NONE:
            continue
        state = _STATE[st.kind]
        if st.server is not None and st.kind is Step.STATUS_STALE and st.server.settling:
            state = "starting"
        entry: dict[str, Any] = {"state": state, "nickname": st.nickname,
                                 "pid": None, "port": None, "container": None,
                                 "certinfo": None, "config": None}
        if st.server is not None:
            entry.update(nickname=st.server.nickname, pid=st.server.pid,
                         port=st.server.port or None, container=st.server.container,
                         certinfo=st.server.certinfo or None)
            entry["problems"] = list(st.server.problems)
        if st.config is not None:
            entry["config"] = config_json(st.config)
            entry["nickname"] = entry["nickname"] or st.config.nickname
        servers.append(entry)
    return json.dumps({"servers": servers, "notices": list(notices), "exit_code": exit_code},
                      indent=2) + "\n"


USAGE = f"""\
Usage: {PROG} {{start|stop|restart|condrestart|try-restart|force-reload|status}} [options]
Options:
  -c configfile                  : specify an additional global configuration file.
  -a arch                        : specify the target architecture.
  -r release                     : specify the kernel release (or a /path/to/build/tree).
  -I path                        : augment the search path for tapsets.
  -R path                        : specify the location of the systemtap runtime.
  -B options                     : specify 'make' options for building systemtap modules.
  -D name[=value]                : add a macro definition for building systemtap modules.
  -u username                    : the user who will run the server(s), of group stap-server.
  -i                             : serve every kernel release with a build tree in /lib/modules.
  -n nickname                    : specify a server configuration by nickname.
  -p pid                         : specify a server by process id.
  --port port                    : specify the network port to be used by the server.
  --log path                     : specify the location of the server's log file.
  --ssl path                     : specify the location of the server's certificate database.
  --max-threads threads          : maximum worker threads for concurrent requests.
  --max-request-size size        : maximum size of an uncompressed client request, in bytes.
  --max-compressed-request size  : maximum size of a compressed client request, in bytes.
  --strategy auto|native|cross|emulated : how a foreign architecture is built (farm option).
  --json                         : (status) print machine-readable JSON.
  -h, --help                     : print this help.

Option values may be separate words (--port 5000) or attached (--port=5000, -ax86_64).

If -a is not specified, the default architecture is that of the host.
If -r is not specified, the default kernel release is the one running on the host.
If -u is not specified, the default is STAP_USER, else the invoking user; servers never run
as root: when root starts them without -u, they run as 'stap-server'.
If --port is not specified (or is 0), a randomly selected port is used.
If --log is not specified, the default is LOG_FILE of the global configuration.
If --ssl is not specified, the farm's certificate database for the server user is used.
If --max-threads is not specified, the default is the number of processors.
If --max-request-size is not specified, the default is {DEFAULT_MAX_REQUEST_SIZE} bytes.
If --max-compressed-request is not specified, the default is {DEFAULT_MAX_COMPRESSED_REQUEST} bytes.
  (Upstream's defaults, 50000 and 5000 bytes, silently drop ordinary requests: a one-line
  script is about 3.8 kB compressed. Explicit options and configuration files win.)

Each -D, -I, -B and -r option adds to the server being described; -a, -R, -u replace.
Each -n or -p starts the description of another server; options after it modify it
(start -n NICK -a ARCH = "like NICK, for ARCH": another server, named by its PID).
Limits: --port 0-65535, --max-threads 0-1024, --max-request-size and
--max-compressed-request 1-1073741824 (1 GiB), -p 1-4194304. Empty values are refused.
Each --port, --log, --ssl, --max-threads, --max-request-size and --max-compressed-request
option is added to a list applied, in turn, to each server specified; servers beyond a list
keep their configured value or get the default.

With no server specified: start starts the servers configured in CONFIG_PATH/*.conf, else
one default server; stop stops all; restart restarts all running (or starts, when none
runs); condrestart/try-restart restart the running ones only; force-reload stops all and
starts as 'start'; status reports every managed server.
"""
