"""The farm endpoint's wire format: stap client requests in, checked; response zips out.

Pure (no sockets, no Docker): the TLS front door reads a 4-byte length and a request zip
(stap-protocol.md §3.2-§3.3), then hands the bytes here::

    n = wire.parse_length(header)                       # signed big-endian int32
    try:
        request = wire.inspect_request(data, max_uncompressed=64 << 20)
    except wire.RequestError as e:
        send(wire.error_response(str(e), server_version="5.6"))   # client prints "Server: ..."
    else:
        key = wire.cache_key(request, identity)          # identity: what built the module
        route(request.release, request.arch)
        forward(wire.encode_request(request))            # never the client's own bytes
        response = wire.inspect_response(reply, max_size)   # wire.ResponseError: refuse it
        response = wire.replace_signatures(response, sign)  # the farm's .ko.sgn, not the backend's
        cache_and_send(wire.encode_response(response))   # response.rc: the rc it carries

Parser differentials are closed by construction: what is checked and keyed (`Request`) is
exactly what `encode_request` writes and forwards, and the backend's reply is re-encoded the
same way before it is cached or sent. The zip format itself is the strict reader's
(farm/endpoint/zipheaders.py: end records, central and local headers, extra fields, names;
farm/endpoint/zipread.py: entry data within a budget) and the deterministic writer's
(farm/endpoint/zipwrite.py); this module adds the protocol on top: what a request must
contain, what routing and the cache key see, how a response's `rc` and signatures are read
and replaced.

`inspect_request` never extracts anything to disk and never decompresses more than the limit
(zip headers may lie); every problem is a `RequestError` whose text is one line meant for the
user. `error_response` builds a response the real client (stap 5.1) unpacks and prints (§3.4).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from farm.endpoint.zipheaders import Kind, entries
from farm.endpoint.zipnames import show
from farm.endpoint.zipread import read_archive, read_contents
from farm.endpoint.zipwrite import encode

MAX_ENTRIES = 20000  # entries in one request (or response) zip
# The longest argument execve passes (MAX_ARG_STRLEN, 32 pages, less the NUL): the server
# runs stap with the request's argv, and a longer one (a huge -e script) cannot be run.
MAX_ARG = 32 * 4096 - 1
MIN_CLIENT_VERSION = (1, 6)  # older clients use the pre-1.6 layout (no locale, uprobes.ko)
DEFAULT_VERSION = "1.0"  # upstream's client version when the request has no `version`
PRIVILEGES = ("stapusr", "stapsys", "stapdev")
DEFAULT_PRIVILEGE = "stapdev"
RESPONSE_TMPDIR = "stap000000/"  # the one `stap??????` entry the client requires

_RC_MAX = 64  # bytes of a response's `rc` worth reading
_RELEASE_RE = re.compile(r"[a-zA-Z0-9_.+-]+")
_ARCH_RE = re.compile(r"[a-z0-9_]+")
_VERSION_RE = re.compile(r"\d{1,6}(\.\d{1,6})*")
_RC_RE = re.compile(r"-?\d{1,10}")
_KEY_TAG = b"stapfarm-wire-cache-key-v2\0"


class RequestError(Exception):
    """A request the farm refuses; str(e) is the one line the client sees after "Server: "."""


class ResponseError(Exception):
    """A backend response the farm refuses to cache or pass on; str(e) is one line."""


# What the strict reader raises, and the hints in its messages, for each side.
_REQUEST = Kind("request", RequestError, MAX_ENTRIES,
                "; send fewer files (tapset -I directories count)",
                " (MAXREQSIZE); make the request smaller", 1)
_RESPONSE = Kind("response", ResponseError, MAX_ENTRIES, "", "", 0)


def parse_length(header: bytes) -> int:
    """The request size announced in the first 4 bytes (signed big-endian, as `htonl`).

    0 is the client's trust probe; a negative value is refused by upstream.

    Raises:
        ValueError: header is not exactly 4 bytes.
    """
    if len(header) != 4:
        raise ValueError(f"length header must be 4 bytes, got {len(header)}")
    value: int = struct.unpack(">i", header)[0]
    return value


@dataclass(frozen=True)
class Request:
    """A request that passed `inspect_request`: what routing, caching and logging need, and
    everything `encode_request` forwards (files and directory entries)."""

    version: str  # client protocol version: first word of `version`, "1.0" when absent
    release: str  # target kernel release, from `sysinfo`
    arch: str  # target arch as the client normalised it (x86_64, arm64, ...)
    argv: tuple[str, ...]  # argv1..argvN (utf-8, surrogateescape)
    files: tuple[tuple[str, bytes], ...]  # every file entry (no directories), sorted by name
    dirs: tuple[str, ...] = ()  # every directory entry ("script/", ...), sorted

    @property
    def privilege(self) -> str:
        """"stapusr", "stapsys" or "stapdev": the first `--privilege=X`/`--unprivileged` before
        a `--` element; stapdev when there is none or X is unknown (assume the most).

        A plain scan, not stap's getopt: advisory (routing, logs), never a signing decision.
        """
        for arg in _options(self.argv):
            if arg == "--unprivileged":
                return "stapusr"
            if arg.startswith("--privilege="):
                value = arg.removeprefix("--privilege=")
                return value if value in PRIVILEGES else DEFAULT_PRIVILEGE
        return DEFAULT_PRIVILEGE

    @property
    def guru(self) -> bool:
        """Whether `-g`/`--guru-mode` is among the options (before a `--` element)."""
        return any(arg in ("-g", "--guru-mode") for arg in _options(self.argv))


@dataclass(frozen=True)
class Response:
    """A backend response that passed `inspect_response` (or one the farm made)."""

    dirs: tuple[str, ...] = ()  # every directory entry ("stap000000/", ...), sorted
    files: tuple[tuple[str, bytes], ...] = ()  # every file entry, sorted by name

    @property
    def rc(self) -> int | None:
        """The `rc` file as a number; None when absent or not a decimal number."""
        for name, content in self.files:
            if name == "rc":
                return _parse_rc(content)
        return None


def _options(argv: Iterable[str]) -> Iterable[str]:
    """The argv elements before the first `--` (script arguments follow it)."""
    for arg in argv:
        if arg == "--":
            return
        yield arg


# --------------------------------------------------------------------------- requests


def inspect_request(data: bytes, max_uncompressed: int) -> Request:
    """Check a request zip as the client builds it (§3.3) and read it into a `Request`.

    Refuses archives that are not zips or that the strict reader refuses (see
    farm/endpoint/zipheaders.py and zipread.py), more than MAX_ENTRIES entries, unsafe,
    duplicate or symlink entries, a total size outside 1..max_uncompressed (declared or
    actual), a missing or malformed `sysinfo`, a protocol version that is unknown or < 1.6,
    or an argument longer than MAX_ARG bytes.

    Raises:
        RequestError: the request is refused; the message says why, in one line.
    """
    dirs, contents = read_archive(data, max_uncompressed, _REQUEST)
    return _request(contents, dirs)


def _request(contents: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Request:
    """The Request of a checked archive's files and directories.

    Raises:
        RequestError: bad `version` or `sysinfo`.
    """
    version = _version(contents.get("version"))
    release, arch = _sysinfo(contents.get("sysinfo"))
    argv: list[str] = []
    while (arg := contents.get(f"argv{len(argv) + 1}")) is not None:
        if len(arg) > MAX_ARG:
            raise RequestError(f"request argument {len(argv) + 1} is {len(arg)} bytes, more "
                               f"than the {MAX_ARG} bytes Linux passes in one argument "
                               "(MAX_ARG_STRLEN), so the server could not run stap; put the "
                               "script in a file (stap FILE) instead of -e")
        argv.append(arg.decode("utf-8", errors="surrogateescape"))
    return Request(version=version, release=release, arch=arch, argv=tuple(argv),
                   files=tuple(sorted(contents.items())), dirs=tuple(sorted(dirs)))


def _version(data: bytes | None) -> str:
    """The client protocol version: first word of `version`, "1.0" when there is none.

    Raises:
        RequestError: not dotted numeric, or older than 1.6.
    """
    if data is None:
        version = DEFAULT_VERSION
    else:
        words = data.decode("utf-8", errors="replace").split(maxsplit=1)
        version = words[0] if words else ""
        if not _VERSION_RE.fullmatch(version):
            raise RequestError(f"unknown protocol version {show(version)}; use a stap client "
                               "of version 1.6 or later")
    if tuple(int(c) for c in version.split(".")) < MIN_CLIENT_VERSION:
        raise RequestError(f"client protocol version {version} is older than 1.6, which this "
                           "farm does not support; upgrade systemtap on the client")
    return version


def _sysinfo(data: bytes | None) -> tuple[str, str]:
    """(release, arch) of `sysinfo: <release> <arch>`.

    Raises:
        RequestError: missing, or not exactly those three words with a valid release and arch.
    """
    if data is None:
        raise RequestError("request has no valid sysinfo (no 'sysinfo' entry); use a stap "
                           "client (stap --use-server)")
    text = data.decode("utf-8", errors="replace")
    words = text.split()
    if (len(words) != 3 or words[0] != "sysinfo:" or not _RELEASE_RE.fullmatch(words[1])
            or not _ARCH_RE.fullmatch(words[2])):
        raise RequestError(f"request has no valid sysinfo (expected 'sysinfo: <release> "
                           f"<arch>', got {show(text)}); check stap's -r and -a")
    return words[1], words[2]


def encode_request(request: Request) -> bytes:
    """The zip the farm forwards for request: written afresh from request.dirs and
    request.files alone (never the client's bytes), deterministically (see `encode`).

    inspect_request(encode_request(r), limit) == r for every r inspect_request returned.

    Raises:
        ValueError: an entry name that inspect_request would refuse (a hand-made Request).
    """
    return encode(request.dirs, request.files)


# --------------------------------------------------------------------------- cache


def request_digest(request: Request) -> bytes:
    """The sha256 of everything `encode_request` forwards: every directory entry and every
    (name, content) of request.files. Each part is length-prefixed (so ("ab", "c") and
    ("a", "bc") differ) and each section counted, in name order (the zip's order does not
    matter). Computed once per request, so that its content need not be kept."""
    digest = hashlib.sha256(_KEY_TAG)
    dirs = sorted(request.dirs)
    digest.update(struct.pack(">Q", len(dirs)))
    for name in dirs:
        digest.update(_framed(name.encode("utf-8", errors="surrogateescape")))
    files = sorted(request.files)
    digest.update(struct.pack(">Q", len(files)))
    for name, content in files:
        digest.update(_framed(name.encode("utf-8", errors="surrogateescape")))
        digest.update(_framed(content))
    return digest.digest()


def key_of(digest: bytes, identity: str) -> str:
    """Hex sha256 naming the module the request of DIGEST builds on the server identified
    by IDENTITY."""
    key = hashlib.sha256(_KEY_TAG)
    key.update(_framed(identity.encode("utf-8", errors="surrogateescape")))
    key.update(_framed(digest))
    return key.hexdigest()


def cache_key(request: Request, identity: str) -> str:
    """Hex sha256 naming the module a request builds on the server identified by identity:
    `key_of(request_digest(request), identity)`."""
    return key_of(request_digest(request), identity)


def _framed(data: bytes) -> bytes:
    """data prefixed by its length (8 bytes, big-endian)."""
    return struct.pack(">Q", len(data)) + data


# --------------------------------------------------------------------------- responses


def inspect_response(data: bytes, max_size: int) -> Response:
    """Check a backend's response zip with the strict reader and read it into a `Response`.

    The same rules as requests (names, entries, methods, extra fields, headers, data), at
    most max_size bytes uncompressed (declared and actual); no rules about its layout.

    Raises:
        ResponseError: the response is refused; one line.
    """
    dirs, contents = read_archive(data, max_size, _RESPONSE)
    return Response(dirs=dirs, files=tuple(sorted(contents.items())))


def encode_response(response: Response) -> bytes:
    """The zip the farm caches and sends for response: written afresh from response.dirs and
    response.files, as `encode_request` (nothing added, nothing dropped).

    Raises:
        ValueError: an entry name that inspect_response would refuse.
    """
    return encode(response.dirs, response.files)


def replace_signatures(response: Response, sign: Callable[[bytes], bytes]) -> Response:
    """response with the content of every `X.ko.sgn` whose `X.ko` is in it replaced by
    sign(<content of X.ko>), and every `.ko.sgn` without its `X.ko` dropped: no signature
    the backend made reaches a client."""
    contents = dict(response.files)
    files = tuple((name, sign(contents[name.removesuffix(".sgn")])
                   if name.endswith(".ko.sgn") else content)
                  for name, content in response.files
                  if not name.endswith(".ko.sgn") or name.removesuffix(".sgn") in contents)
    return Response(dirs=response.dirs, files=files)


def error_response(message: str, server_version: str) -> bytes:
    """A response zip the real client accepts and prints: rc 1, "Server: <message>" on stderr.

    Entries: version, rc, stdout (empty), stderr (each line of message prefixed "Server: ")
    and the empty `stap000000/` directory the client's `stap??????` glob requires.

    Raises:
        ValueError: server_version is not dotted numeric (clients assert on it, §3.5).
    """
    if not _VERSION_RE.fullmatch(server_version):
        raise ValueError(f"server version must be dotted numeric, got {server_version!r}")
    lines = message.splitlines() or [""]
    stderr = "".join(f"Server: {line}\n" for line in lines)
    files = (("rc", b"1"), ("stderr", stderr.encode("utf-8")), ("stdout", b""),
             ("version", server_version.encode("utf-8")))
    return encode_response(Response(dirs=(RESPONSE_TMPDIR,), files=files))


def response_rc(data: bytes) -> int | None:
    """The `rc` a response zip carries; None when absent, not a number, or when the strict
    reader refuses the zip (every entry's headers are checked; only `rc` is decompressed)."""
    try:
        found = entries(data, _RESPONSE) if data else []
        for entry in found:
            if entry.name == "rc":
                if entry.file_size > _RC_MAX:
                    return None
                content = read_contents(data, [entry], _RC_MAX, _RESPONSE)["rc"]
                return _parse_rc(content)
    except ResponseError:
        return None
    return None


def _parse_rc(raw: bytes) -> int | None:
    """A decimal `rc` (surrounding whitespace allowed); None for anything else."""
    if len(raw) > _RC_MAX:
        return None
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if _RC_RE.fullmatch(text) else None
