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
        ...
        wire.response_rc(response)                       # the rc a response zip carries

`inspect_request` never extracts anything to disk and never decompresses more than the limit
(zip headers may lie); every problem is a `RequestError` whose text is one line meant for the
user. `error_response` builds a response the real client (stap 5.1) unpacks and prints (§3.4).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import lzma
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

MAX_ENTRIES = 20000  # entries in one request zip
MIN_CLIENT_VERSION = (1, 6)  # older clients use the pre-1.6 layout (no locale, uprobes.ko)
DEFAULT_VERSION = "1.0"  # upstream's client version when the request has no `version`
PRIVILEGES = ("stapusr", "stapsys", "stapdev")
DEFAULT_PRIVILEGE = "stapdev"
RESPONSE_TMPDIR = "stap000000/"  # the one `stap??????` entry the client requires

_CHUNK = 1 << 16
_RC_MAX = 64  # bytes of a response's `rc` worth reading
_SHOW_MAX = 60  # characters of client data quoted in a message
_RELEASE_RE = re.compile(r"[a-zA-Z0-9_.+-]+")
_ARCH_RE = re.compile(r"[a-z0-9_]+")
_VERSION_RE = re.compile(r"\d{1,6}(\.\d{1,6})*")
_RC_RE = re.compile(r"-?\d{1,10}")
_KEY_TAG = b"stapfarm-wire-cache-key-v1\0"
# What zipfile raises on malformed archives besides BadZipFile (truncated or corrupt data,
# undecodable names, unsupported methods or encryption, broken zip64 fields).
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
    struct.error, NotImplementedError, RuntimeError, KeyError, IndexError, OverflowError,
)


class RequestError(Exception):
    """A request the farm refuses; str(e) is the one line the client sees after "Server: "."""


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
    """A request that passed `inspect_request`: what routing, caching and logging need."""

    version: str  # client protocol version: first word of `version`, "1.0" when absent
    release: str  # target kernel release, from `sysinfo`
    arch: str  # target arch as the client normalised it (x86_64, arm64, ...)
    argv: tuple[str, ...]  # argv1..argvN (utf-8, surrogateescape)
    files: tuple[tuple[str, bytes], ...]  # every file entry (no directories), sorted by name

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


def _options(argv: Iterable[str]) -> Iterable[str]:
    """The argv elements before the first `--` (script arguments follow it)."""
    for arg in argv:
        if arg == "--":
            return
        yield arg


# --------------------------------------------------------------------------- inspection


def inspect_request(data: bytes, max_uncompressed: int) -> Request:
    """Check a request zip as the client builds it (§3.3) and read it into a `Request`.

    Refuses archives that are not zips, have more than MAX_ENTRIES entries, unsafe, duplicate
    or symlink entries, a total size outside 1..max_uncompressed (declared or actual), bad
    data, a missing or malformed `sysinfo`, or a protocol version that is unknown or < 1.6.

    Raises:
        RequestError: the request is refused; the message says why, in one line.
    """
    if not data:
        raise RequestError("request is not a zip archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            _check_entries(infos)
            _check_declared_size(infos, max_uncompressed)
            contents = _read_files(archive, infos, max_uncompressed)
    except RequestError:
        raise
    except _ZIP_ERRORS as e:
        raise RequestError(_zip_problem(e)) from e
    return _request(contents)


def _zip_problem(error: BaseException) -> str:
    if isinstance(error, zipfile.BadZipFile) and "not a zip file" in str(error):
        return "request is not a zip archive"
    detail = " ".join(str(error).split())[:_SHOW_MAX] or type(error).__name__
    return f"request is not a readable zip archive ({detail})"


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    """Count, names and types of the entries.

    Raises:
        RequestError: too many entries, or an unsafe, symlink or duplicate entry.
    """
    if len(infos) > MAX_ENTRIES:
        raise RequestError(f"request has {len(infos)} zip entries, more than this farm's limit "
                           f"of {MAX_ENTRIES}; send fewer files (tapset -I directories count)")
    seen: set[str] = set()
    for info in infos:
        name = info.orig_filename
        problem = _unsafe_name(name)
        if problem:
            raise RequestError(f"request entry {_show(name)} is unsafe ({problem})")
        if info.flag_bits & 0x1:
            raise RequestError(f"request entry {_show(name)} is encrypted, which this farm "
                               "refuses")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise RequestError(f"request entry {_show(name)} is a symbolic link, which this "
                               "farm refuses")
        if name in seen:
            raise RequestError(f"request entry {_show(name)} appears more than once")
        seen.add(name)
    _check_file_dir_clash(seen)


def _unsafe_name(name: str) -> str:
    """Why an entry name is unsafe to extract, or "" when it is fine."""
    if not name:
        return "empty name"
    if "\0" in name:
        return "NUL in name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        return "'..' component"
    if "." in parts or "" in parts:
        return "empty or '.' component"
    return ""


def _check_file_dir_clash(names: set[str]) -> None:
    """Refuse a file entry that another entry uses as a directory ("a" and "a/b" or "a/").

    Raises:
        RequestError: some file name is also a directory.
    """
    ordered = sorted(names)
    for name in ordered:
        if name.endswith("/"):
            continue
        i = bisect.bisect_left(ordered, name + "/")  # names under name/ sort right there
        if i < len(ordered) and ordered[i].startswith(name + "/"):
            raise RequestError(f"request entry {_show(name)} is both a file and a directory")


def _check_declared_size(infos: list[zipfile.ZipInfo], limit: int) -> None:
    """The sum of the declared sizes, as upstream's `unzip -Zt` check (§2.5 step 4).

    Raises:
        RequestError: the total is 0 or above limit.
    """
    _check_total(sum(info.file_size for info in infos), limit)


def _check_total(total: int, limit: int) -> None:
    """Raises:
        RequestError: total outside 1..limit.
    """
    if total < 1:
        raise RequestError("request is empty (0 bytes uncompressed)")
    if total > limit:
        raise RequestError(f"request of {total} bytes uncompressed exceeds this farm's limit "
                           f"of {limit} bytes (MAXREQSIZE); make the request smaller")


def _read_files(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo],
                limit: int) -> dict[str, bytes]:
    """The content of every file entry, decompressing at most limit + 1 bytes in all.

    Raises:
        RequestError: the actual total exceeds limit (lying headers), or bad data.
    """
    contents: dict[str, bytes] = {}
    budget = limit
    for info in infos:
        if info.is_dir():
            continue
        data = _read_bounded(archive, info, budget)
        budget -= len(data)
        if budget < 0:
            raise RequestError(f"request of more than {limit} bytes uncompressed exceeds this "
                               f"farm's limit of {limit} bytes (MAXREQSIZE); make the request "
                               "smaller")
        contents[info.orig_filename] = data
    return contents


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """An entry's content, or its first budget + 1 bytes when it is longer than budget.

    Raises:
        RequestError: CRC mismatch or corrupt data in the entry.
    """
    chunks: list[bytes] = []
    left = budget + 1
    try:
        with archive.open(info) as stream:
            while left > 0:
                chunk = stream.read(min(_CHUNK, left))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
    except _ZIP_ERRORS as e:
        detail = " ".join(str(e).split())[:_SHOW_MAX] or type(e).__name__
        raise RequestError(f"request entry {_show(info.orig_filename)} is corrupt ({detail}); "
                           "send the request again") from e
    return b"".join(chunks)


def _request(contents: dict[str, bytes]) -> Request:
    """The Request of a checked archive's files.

    Raises:
        RequestError: bad `version` or `sysinfo`.
    """
    version = _version(contents.get("version"))
    release, arch = _sysinfo(contents.get("sysinfo"))
    argv: list[str] = []
    while (arg := contents.get(f"argv{len(argv) + 1}")) is not None:
        argv.append(arg.decode("utf-8", errors="surrogateescape"))
    return Request(version=version, release=release, arch=arch, argv=tuple(argv),
                   files=tuple(sorted(contents.items())))


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
            raise RequestError(f"unknown protocol version {_show(version)}; use a stap client "
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
                           f"<arch>', got {_show(text)}); check stap's -r and -a")
    return words[1], words[2]


def _show(text: str) -> str:
    """Client-supplied text quoted for a one-line message: shortened, escapes visible."""
    if len(text) > _SHOW_MAX:
        text = text[:_SHOW_MAX] + "..."
    return repr(text)


# --------------------------------------------------------------------------- cache


def cache_key(request: Request, identity: str) -> str:
    """Hex sha256 naming the module a request builds on the server identified by identity.

    Covers identity and every (name, content) of request.files, each length-prefixed (so
    ("ab", "c") and ("a", "bc") differ), in name order (the zip's order does not matter).
    """
    digest = hashlib.sha256(_KEY_TAG)
    digest.update(_framed(identity.encode("utf-8", errors="surrogateescape")))
    files = sorted(request.files)
    digest.update(struct.pack(">Q", len(files)))
    for name, content in files:
        digest.update(_framed(name.encode("utf-8", errors="surrogateescape")))
        digest.update(_framed(content))
    return digest.hexdigest()


def _framed(data: bytes) -> bytes:
    """data prefixed by its length (8 bytes, big-endian)."""
    return struct.pack(">Q", len(data)) + data


# --------------------------------------------------------------------------- responses


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
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in (("version", server_version), ("rc", "1"), ("stdout", ""),
                           ("stderr", stderr)):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, text.encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED)
        tmpdir = zipfile.ZipInfo(RESPONSE_TMPDIR, date_time=(1980, 1, 1, 0, 0, 0))
        tmpdir.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: MS-DOS directory
        tmpdir.CRC = tmpdir.compress_size = tmpdir.file_size = 0
        archive.mkdir(tmpdir)
    return buffer.getvalue()


def response_rc(data: bytes) -> int | None:
    """The `rc` a response zip carries; None when absent, not a number, or not a zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo("rc")
            if info.is_dir():
                return None
            with archive.open(info) as stream:
                raw = stream.read(_RC_MAX + 1)
    except _ZIP_ERRORS:
        return None
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if len(raw) <= _RC_MAX and _RC_RE.fullmatch(text) else None
