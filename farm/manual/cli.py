"""The `stap-server` command: parse, resolve against what runs, plan, carry out, render."""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO, cast

from farm.core.arch import Arch
from farm.core.errors import (
    EXIT_NOT_RUNNING,
    EXIT_OK,
    ArchError,
    ConfigError,
    FarmError,
    ImageError,
    KernelTreeError,
    ServerError,
    UsageError,
)
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.manual import actions, statfile
from farm.manual.backend import Backend, RunningServer
from farm.manual.config import (
    MAX_PID,
    MAX_PORT,
    MAX_REQUEST_BYTES,
    MAX_THREADS,
    BadServerFile,
    Host,
    ServerDraft,
    ServerFiles,
    bounded_int,
    load_global,
    load_server_configs,
    resolve_bad_file,
    resolve_server,
    server_user_problem,
    shown,
)
from farm.manual.plan import (
    Action,
    PlannedStep,
    Request,
    Step,
    needs_defaults,
    plan,
    status_exit_code,
)
from farm.manual.render import PROG, USAGE, status_json, status_line, step_header

_VALUE_SHORT = set("acBDInprRu")
_UNSUPPORTED_SHORT = {
    "P": "-P is not supported: stap-serverd cannot prompt for a certificate database password "
         "without a terminal, and the farm's certificate databases have no password",
    "k": "-k (keep the server's temporary files) is not supported by the farm",
}
# What an empty value would silently mean instead of an error: an unnamed server, the
# current directory, an empty `make` option...
_NON_EMPTY = {"n": "a nickname", "r": "a kernel release or build tree", "I": "a directory",
              "R": "a directory", "B": "a 'make' option", "u": "a user name",
              "c": "a file name"}
# Options applied in turn to successive servers (the manual's lists), by ServerDraft field.
_DISTRIBUTED = {"log": "log", "port": "port", "ssl": "ssl", "max-threads": "max_threads",
                "max-request-size": "max_request_size",
                "max-compressed-request": "max_compressed_request"}
_VALUE_LONG = set(_DISTRIBUTED) | {"strategy"}
_FLAG_LONG = {"json", "help"}
_NUMERIC_LONG = {
    "port": (0, MAX_PORT, f"a port number (0-{MAX_PORT})"),
    "max-threads": (0, MAX_THREADS, f"a thread count (0-{MAX_THREADS})"),
    "max-request-size": (1, MAX_REQUEST_BYTES,
                         f"a size in bytes (1-{MAX_REQUEST_BYTES}, i.e. at most 1 GiB)"),
    "max-compressed-request": (1, MAX_REQUEST_BYTES,
                               f"a size in bytes (1-{MAX_REQUEST_BYTES}, i.e. at most 1 GiB)"),
}


@dataclass
class Options:
    """The command line after syntax checks, in order; nothing resolved yet."""

    events: list[tuple[str, str]] = field(default_factory=list)  # per-server options, in order
    lists: dict[str, list[str]] = field(default_factory=dict)  # distributed options
    config_file: str = ""  # the last -c (stap-server(8): the last one wins), absolute
    json: bool = False
    help: bool = False

    @property
    def names_servers(self) -> bool:
        return bool(self.events) or any(self.lists.values())


def absolute(flag: str, value: str, cwd: str) -> str:
    """VALUE of option FLAG as an absolute path: relative paths are from CWD (not from /, as
    upstream's stap-start-server would have it).

    Raises:
        FarmError: VALUE is relative and the working directory no longer exists (CWD "").
    """
    if value.startswith("/"):
        return value
    if not cwd:
        raise FarmError(f"{flag} {shown(value)}: a relative path, and the working directory "
                        "no longer exists", hint="give an absolute path")
    return os.path.join(cwd, value)


def _check_text(flag: str, value: str) -> None:
    """Refuse what cannot be recorded: values go into Docker labels (UTF-8 JSON) and into
    line-oriented stat files, one `VARIABLE=VALUE` per line."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{flag}: the value contains a line break or a NUL character "
                         "(values are recorded one per line in the stat files)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes decoded with surrogateescape
        raise UsageError(f"{flag}: '{shown(value)}' is not valid UTF-8 text (values are "
                         "recorded in Docker labels and stat files)") from None


def parse_options(args: list[str], cwd: str) -> Options:
    """Check the syntax of ARGS (everything after the action).

    Raises:
        UsageError: an unknown option, a missing, empty or malformed value.
        FarmError: a relative `-c`, `--log` or `--ssl` path while the working directory is gone.
    """
    o = Options(lists={k: [] for k in _DISTRIBUTED})
    config_file: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name in _FLAG_LONG:
                if eq:
                    raise UsageError(f"option --{name} takes no value")
                o.json |= name == "json"
                o.help |= name == "help"
                continue
            if name not in _VALUE_LONG:
                close = difflib.get_close_matches(name, sorted(_VALUE_LONG | _FLAG_LONG), n=1)
                hint = f"did you mean --{close[0]}?" if close else None
                raise UsageError(f"unknown option --{shown(name)}", hint=hint)
            if not eq:
                if i >= len(args):
                    raise UsageError(f"option --{name} needs a value")
                value = args[i]
                i += 1
            _check_long(name, value)
            if name in ("log", "ssl"):
                o.lists[name].append(os.path.normpath(absolute(f"--{name}", value, cwd)))
            elif name in _DISTRIBUTED:
                o.lists[name].append(value)
            else:
                o.events.append((name, value))
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            letter, value = arg[1], arg[2:]
            if letter in ("h", "?") and not value:
                o.help = True
            elif letter in _UNSUPPORTED_SHORT and not value:
                raise UsageError(_UNSUPPORTED_SHORT[letter])
            elif letter == "i":
                if value:
                    raise UsageError(f"option -i takes no value (got '{shown(arg)}')")
                o.events.append(("i", ""))
            elif letter in _VALUE_SHORT:
                if not value:
                    if i >= len(args):
                        raise UsageError(f"option -{letter} needs a value")
                    value = args[i]
                    i += 1
                if not value and letter in _NON_EMPTY:
                    raise UsageError(f"option -{letter} needs {_NON_EMPTY[letter]}, not an "
                                     "empty value")
                if letter == "c":
                    config_file = value
                elif letter == "p":
                    if bounded_int(value, 1, MAX_PID) is None:
                        raise UsageError(f"-p: '{shown(value)}' is not a process id "
                                         f"(1-{MAX_PID})")
                    o.events.append((letter, value))
                elif letter == "u" and value == "root":
                    raise UsageError("-u root: a compile server never runs as root "
                                     "(stap-serverd refuses it); name an unprivileged user")
                else:
                    _check_text(f"-{letter}", value)
                    if letter == "a":
                        try:
                            value = Arch.parse(value).stap
                        except ArchError as e:
                            raise UsageError(f"-a: {e.message}", hint=e.hint) from e
                    o.events.append((letter, value))
            else:
                raise UsageError(f"unknown option {shown(arg)}")
        else:
            raise UsageError(f"unexpected argument '{shown(arg)}'")
    if config_file is not None:
        o.config_file = absolute("-c", config_file, cwd)
    return o


def _check_long(name: str, value: str) -> None:
    if name == "strategy":
        if value.lower() not in {s.value for s in Strategy}:
            raise UsageError(f"--strategy: '{shown(value)}' is not one of "
                             + "|".join(s.value for s in Strategy))
        return
    if name in ("log", "ssl"):
        if not value:
            raise UsageError(f"--{name} needs a non-empty path")
        _check_text(f"--{name}", value)
        return
    lo, hi, what = _NUMERIC_LONG[name]
    if bounded_int(value, lo, hi) is None:
        raise UsageError(f"--{name}: '{shown(value)}' is not {what}")


def check_users(action: Action, o: Options, host: Host) -> None:
    """The `-u USER` of a command that may start servers names an existing user of the
    `stap-server` group (stap-server(8)), checked before anything is started.

    Raises:
        FarmError: the user does not exist or is not in the group (exit 1: what is wrong is
            the host's user database, not the command line's syntax).
    """
    if action in (Action.STOP, Action.STATUS):
        return  # stopping a server whose user was removed since must still work
    for opt, value in o.events:
        if opt == "u":
            problem = server_user_problem(value, host.accounts)
            if problem:
                raise FarmError(problem)


# --------------------------------------------------------------------------- resolving


@dataclass
class _Entry:
    draft: ServerDraft
    server: RunningServer | None = None  # selected by -p / -n of a running server
    origin: str = "cli"  # cli | running | configured | new | unknown
    nickname: str = ""
    modified: bool = False
    base: ServerConfig | None = None  # a configured server as its file describes it


class _Resolver:
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
            attr = _DISTRIBUTED[name]
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


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _locked(state_dir: str) -> Iterator[None]:
    """Hold `<state_dir>/lock` so that two invocations never start duplicates."""
    path = os.path.join(state_dir, "lock")
    try:
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FarmError(f"cannot create the lock file {path}: {e.strerror or e}",
                        hint="set STATE_DIR in the global configuration to a writable "
                             "directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_backend(g: GlobalConfig, environ: Mapping[str, str]) -> Backend:
    # Imported here: the Docker SDK is needed only when servers are really managed.
    try:
        module = importlib.import_module("farm.engine.servers")
    except ImportError as e:
        raise FarmError(f"the Docker backend is not available: {e}") from e
    backend: Backend = module.DockerBackend.from_env(g, environ)
    return backend


class _Runner:
    """Carries out planned steps, printing upstream's lines as each completes."""

    def __init__(self, backend: Backend, out: TextIO, err: TextIO,
                 servers: list[RunningServer]) -> None:
        self.backend, self.out, self.err = backend, out, err
        self.servers = list(servers)  # what runs after the steps done so far
        self.first = True
        self.rc = EXIT_OK

    def _begin(self, text: str, newline: bool = True) -> None:
        if not self.first:
            self.out.write("\n")  # upstream ends each OK/FAILED with the next `echo`
        self.first = False
        self.out.write(text + ("\n" if newline else ""))
        self.out.flush()

    def _end(self, ok: bool) -> None:
        self.out.write("OK" if ok else "FAILED")
        self.out.flush()
        if not ok:
            self.rc = 1

    def _error(self, e: FarmError) -> None:
        self.out.flush()
        report(self.err, str(e))
        self.err.flush()

    def run(self, steps: list[PlannedStep]) -> int:
        for st in steps:
            self.step(st)
        if not self.first:
            self.out.write("\n")
        return self.rc

    def step(self, st: PlannedStep) -> None:
        k = st.kind
        if k is Step.REMOVE_STALE:
            assert st.server is not None
            self._call_stop(st.server, quiet=True)
        elif k is Step.NOTHING_TO_STOP:
            self._begin(f"Stopping {PROG}: ", newline=False)
            self._end(True)
        elif k in (Step.ALREADY_RUNNING, Step.STOP_NOT_RUNNING, Step.SKIP_NOT_RUNNING,
                   Step.NONE_RUNNING):
            self._begin(step_header(st))
            self._end(True)
        elif k is Step.UNKNOWN_NICKNAME:
            self._begin(step_header(st))
            self._end(False)
        elif k is Step.STOP:
            assert st.server is not None
            self._begin(step_header(st))
            self._end(self._call_stop(st.server))
        elif k is Step.START:
            assert st.config is not None
            self._begin(step_header(st))
            self._end(self._call_start(st.config))
        elif k is Step.INVALID:
            assert st.invalid is not None
            self._begin(step_header(st))
            self._error(ConfigError(list(st.invalid.problems)))
            self._end(False)

    def _call_stop(self, server: RunningServer, quiet: bool = False) -> bool:
        try:
            self.backend.stop(server)
        except ServerError as e:
            if not quiet:
                self._error(e)
            return False
        except FarmError:
            if not quiet:
                self._end(False)
                self.out.write("\n")
            raise
        self.servers = [s for s in self.servers if s.container != server.container]
        return True

    def _call_start(self, config: ServerConfig) -> bool:
        try:
            started = self.backend.start(config)
        except (ServerError, KernelTreeError, ImageError) as e:
            # this server cannot start (its tree, image or daemon): the others still may
            self._error(e)
            return False
        except FarmError:
            self._end(False)
            self.out.write("\n")
            raise
        self.servers.append(started)
        return True


def _sync_stat(stat_path: str, servers: list[RunningServer], err: TextIO, quiet: bool) -> None:
    try:
        statfile.sync(stat_path, servers)
    except OSError as e:
        if not quiet:
            report(err, f"warning: cannot update the status files in {stat_path}: "
                        f"{e.strerror or e}")


def _run(action: Action, o: Options, g: GlobalConfig, host: Host, backend: Backend,
         out: TextIO, err: TextIO) -> int:
    observed = backend.list_servers()
    resolver = _Resolver(action, g, host, observed)
    requests = resolver.requests(o)
    defaults = resolver.defaults() if needs_defaults(action, requests, observed) else []
    if action is Action.STATUS and requests is None:
        resolver.warn_bad_files()
    steps = plan(action, requests, observed, defaults)
    for warning in resolver.warnings:
        report(err, warning)
    if action is Action.STATUS:
        code = status_exit_code(steps)
        notices = backend.notices()
        if o.json:
            out.write(status_json(steps, code, notices))
        else:
            out.write("".join(status_line(st) + "\n" for st in steps))
            out.write("".join(f"{n}\n" for n in notices))
        # As upstream deletes the stat file of a dead server once status has reported it,
        # the farm removes the dead server's container.
        for stale in [s for s in observed if not s.running]:
            with contextlib.suppress(FarmError):
                backend.stop(stale)
        _sync_stat(g.stat_path, [s for s in observed if s.running], err, quiet=True)
        return code
    statfile.ensure_dir(g.stat_path)
    runner = _Runner(backend, out, err, observed)
    try:
        return runner.run(steps)
    finally:
        _sync_stat(g.stat_path, runner.servers, err, quiet=False)


def _dispatch(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO,
              backend: Backend | None, host: Host | None) -> int:
    if not argv:
        err.write(USAGE)
        return 2
    name = argv[0]
    if name in ("-h", "--help", "help"):
        out.write(USAGE)
        return EXIT_OK
    if name in actions.ACTIONS:
        return actions.ACTIONS[name](argv[1:], environ, out, err)
    if name == "reload":
        err.write(f"{PROG}: reload is not supported; use force-reload\n")
        return EXIT_NOT_RUNNING
    try:
        action = Action(name)
    except ValueError:
        names = [a.value for a in Action] + sorted(actions.ACTIONS)
        close = difflib.get_close_matches(name, names, n=1)
        raise UsageError(f"unknown action '{shown(name)}'",
                         hint=f"did you mean '{close[0]}'?" if close else None) from None
    host = host or Host.current()
    o = parse_options(argv[1:], host.cwd)
    if o.help:
        out.write(USAGE)
        return EXIT_OK
    if o.json and action is not Action.STATUS:
        raise UsageError("--json is only for status")
    check_users(action, o, host)
    g = load_global([o.config_file] if o.config_file else [], environ, euid=host.euid)
    be = backend if backend is not None else _make_backend(g, environ)
    if not action.mutating:
        return _run(action, o, g, host, be, out, err)
    with _locked(g.state_dir):
        return _run(action, o, g, host, be, out, err)


def main(argv: list[str], *, environ: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         backend: Backend | None = None, host: Host | None = None) -> int:
    """Run `stap-server ARGV...` and return its exit code (never raises for user errors)."""
    env = os.environ if environ is None else environ
    out = _printable(sys.stdout if stdout is None else stdout)
    err = _printable(sys.stderr if stderr is None else stderr)
    try:
        return _dispatch(argv, env, out, err, backend, host)
    except FarmError as e:
        out.flush()
        report(err, str(e))
        if isinstance(e, UsageError):
            err.write(f"Try '{PROG} --help' for more information.\n")
        return e.exit_code


def report(err: TextIO, text: str) -> None:
    """Write TEXT to ERR as `stap-server: ...` lines, one per line of TEXT."""
    err.writelines(f"{PROG}: {line}\n" for line in text.splitlines() or [""])


class _Printable:
    """A text stream that escapes what it cannot encode instead of raising.

    Command-line values and file names are bytes decoded with surrogateescape, so a value
    echoed in an error or a `Starting` line need not be UTF-8 (`-n $'\\xff'`); its bytes
    are shown as `\\xff`.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        encoding = getattr(self._stream, "encoding", None) or "utf-8"
        try:
            text.encode("utf-8")  # sys.stderr would print a surrogate as \udcff: show \xff
        except UnicodeEncodeError:
            return self._stream.write(_escaped(text, encoding))
        try:
            return self._stream.write(text)
        except UnicodeEncodeError:  # a terminal that is not UTF-8
            return self._stream.write(_escaped(text, encoding))

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno...: the stream's own
        return getattr(self._stream, name)


def _printable(stream: TextIO) -> TextIO:
    # _Printable has TextIO's methods by delegation, which mypy cannot see
    return stream if isinstance(stream, _Printable) else cast(TextIO, _Printable(stream))


def _escaped(text: str, encoding: str) -> str:
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    readable = raw.decode("utf-8", "backslashreplace")
    return readable.encode(encoding, "backslashreplace").decode(encoding, "replace")


def entry_point() -> None:
    """The `stap-server` console script."""
    try:
        code = main(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:  # `stap-server kernels available | head -n 1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        code = 141
    sys.exit(code)
