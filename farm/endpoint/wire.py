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
same way before it is cached or sent. The reader is strict besides, so that Python and
Info-ZIP `unzip` could only ever read an accepted zip the same way: it reads the end records
itself (refusing more than MAX_ENTRIES entries before looking at any), parses every central
and local header itself, and refuses methods other than stored and deflate, encryption,
extra fields that rename entries for unzip (0x7075, 0x6375), local headers that disagree with
the central directory, overlapping entries, and entry data that does not end exactly where
its headers say (a deflate stream must end at the declared size and CRC, within the declared
compressed size).

`inspect_request` never extracts anything to disk and never decompresses more than the limit
(zip headers may lie); every problem is a `RequestError` whose text is one line meant for the
user. `error_response` builds a response the real client (stap 5.1) unpacks and prints (§3.4).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

MAX_ENTRIES = 20000  # entries in one request (or response) zip
MIN_CLIENT_VERSION = (1, 6)  # older clients use the pre-1.6 layout (no locale, uprobes.ko)
DEFAULT_VERSION = "1.0"  # upstream's client version when the request has no `version`
PRIVILEGES = ("stapusr", "stapsys", "stapdev")
DEFAULT_PRIVILEGE = "stapdev"
RESPONSE_TMPDIR = "stap000000/"  # the one `stap??????` entry the client requires

_RC_MAX = 64  # bytes of a response's `rc` worth reading
_SHOW_MAX = 60  # characters of client data quoted in a message
_RELEASE_RE = re.compile(r"[a-zA-Z0-9_.+-]+")
_ARCH_RE = re.compile(r"[a-z0-9_]+")
_VERSION_RE = re.compile(r"\d{1,6}(\.\d{1,6})*")
_RC_RE = re.compile(r"-?\d{1,10}")
_KEY_TAG = b"stapfarm-wire-cache-key-v2\0"

# Zip structures (APPNOTE.TXT 4.3): signatures and fixed parts, little-endian.
_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_EOCD64_SIG = b"PK\x06\x06"
_LOCATOR_SIG = b"PK\x06\x07"
# sig, version needed, flags, method, time, date, crc, compressed, uncompressed, name, extra
_LOCAL = struct.Struct("<4s5H3L2H")
# sig, made by, needed, flags, method, time, date, crc, compressed, uncompressed, name len,
# extra len, comment len, disk, internal attributes, external attributes, local header offset
_CENTRAL = struct.Struct("<4s6H3L5H2L")
# sig, this disk, central directory disk, entries here, entries, cd size, cd offset, comment
_EOCD = struct.Struct("<4s4H2LH")
# sig, disk of the zip64 end record, its offset, number of disks
_LOCATOR = struct.Struct("<4sLQL")
# sig, size of the rest, made by, needed, this disk, cd disk, entries here, entries, cd size,
# cd offset
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_REST = _EOCD64.size - 12  # "size of the rest" of a record without extensible data
_EOCD_SEARCH = _EOCD.size + 0xFFFF  # the end record and the longest archive comment
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF

_STORED = 0
_DEFLATED = 8
_METHOD_NAMES = {1: "shrink", 2: "reduce", 3: "reduce", 4: "reduce", 5: "reduce",
                 6: "implode", 9: "deflate64", 10: "PKWARE implode", 12: "bzip2", 14: "lzma",
                 18: "IBM TERSE", 19: "IBM LZ77", 20: "zstd", 93: "zstd", 94: "mp3",
                 95: "xz", 96: "jpeg", 97: "wavpack", 98: "ppmd", 99: "AES encryption"}
_ENCRYPTED_FLAGS = 0x0001 | 0x0040 | 0x2000  # encrypted, strong encryption, masked headers
_FLAG_DESCRIPTOR = 0x0008  # CRC and sizes follow the data (the central directory has them)
_FLAG_UTF8 = 0x0800  # the name is UTF-8
_KNOWN_FLAGS = 0x0002 | 0x0004 | _FLAG_DESCRIPTOR | _FLAG_UTF8  # bits 1-2: deflate level
_MAX_NEEDED = 45  # version needed to extract: 4.5 (zip64); unzip 6.0 refuses above 4.6
_UNIX = 3  # "version made by" host: names are raw bytes for unzip, not an OEM code page
_ZIP64_EXTRA = 0x0001
# Extra fields that make unzip name (or describe) an entry differently from its header.
_RENAMING_EXTRAS = {0x7075: "Info-ZIP Unicode Path", 0x6375: "Info-ZIP Unicode Comment"}

_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # every entry encode_* writes
_FILE_ATTR = (stat.S_IFREG | 0o644) << 16
_DIR_ATTR = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: MS-DOS directory


class RequestError(Exception):
    """A request the farm refuses; str(e) is the one line the client sees after "Server: "."""


class ResponseError(Exception):
    """A backend response the farm refuses to cache or pass on; str(e) is one line."""


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


# --------------------------------------------------------------------------- strict reader


@dataclass(frozen=True)
class _Kind:
    """What is being read, for messages: a request (RequestError) or a response."""

    what: str
    error: type[Exception]
    entries_hint: str  # appended to "too many entries"
    size_hint: str  # appended to "exceeds this farm's limit of N bytes"
    min_total: int  # fewest uncompressed bytes accepted


_REQUEST = _Kind("request", RequestError, "; send fewer files (tapset -I directories count)",
                 " (MAXREQSIZE); make the request smaller", 1)
_RESPONSE = _Kind("response", ResponseError, "", "", 0)


@dataclass(frozen=True)
class _Entry:
    """One entry as its central directory record and local header agree to describe it."""

    name: str
    method: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int  # local header
    data_start: int  # compressed data: data_start .. data_start + compress_size

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")


@dataclass(frozen=True)
class _Central:
    """A central directory record, checked on its own."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int


def _unreadable(kind: _Kind, detail: str) -> Exception:
    return kind.error(f"{kind.what} is not a readable zip archive ({detail})")


def _bad_entry(kind: _Kind, name: str, problem: str) -> Exception:
    return kind.error(f"{kind.what} entry {_show(name)} {problem}")


def _entries(data: bytes, kind: _Kind) -> list[_Entry]:
    """Every entry of the zip, in central directory order, each checked as the module
    docstring says.

    Reads the end records first and refuses more than MAX_ENTRIES entries before parsing
    any; then every central record, then every local header. Reads no entry data.

    Raises:
        kind.error: the archive or some entry is refused; one line.
    """
    count, cd_offset, cd_size = _directory_bounds(data, kind)
    centrals = _central_directory(data, kind, count, cd_offset, cd_size)
    entries = [_local_header(data, kind, central, cd_offset) for central in centrals]
    spans = sorted((e.header_offset, e.data_start + e.compress_size, e.name) for e in entries)
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise _bad_entry(kind, name, f"overlaps entry {_show(other)} in the archive")
    return entries


def _directory_bounds(data: bytes, kind: _Kind) -> tuple[int, int, int]:
    """(entry count, central directory offset, central directory size) from the end record
    (the last `PK\\x05\\x06` in the final 65,557 bytes) and, when there is one, the zip64 end
    record. The central directory must end exactly where the end record(s) begin.

    Raises:
        kind.error: no end record, more than MAX_ENTRIES entries, several disks, or a
            central directory size or offset that cannot be.
    """
    pos = data.rfind(_EOCD_SIG, max(0, len(data) - _EOCD_SEARCH))
    if pos < 0 or pos + _EOCD.size > len(data):
        raise kind.error(f"{kind.what} is not a zip archive")
    _, disk, cd_disk, here, count, cd_size, cd_offset, comment = _EOCD.unpack_from(data, pos)
    if pos + _EOCD.size + comment != len(data):
        raise _unreadable(kind, "end record does not end the archive")
    cd_end = pos  # where the central directory must end
    locator = pos - _LOCATOR.size
    if locator >= 0 and data.startswith(_LOCATOR_SIG, locator):
        _, record_disk, record, disks = _LOCATOR.unpack_from(data, locator)
        if record_disk != 0 or disks > 1:
            raise _unreadable(kind, "archive spans several disks")
        if record + _EOCD64.size > locator or not data.startswith(_EOCD64_SIG, record):
            raise _unreadable(kind, "zip64 end record is not where its locator says")
        (_, rest, _, _, disk64, cd_disk64, here64, count64, cd_size64,
         cd_offset64) = _EOCD64.unpack_from(data, record)
        if record + 12 + rest != locator:
            raise _unreadable(kind, "zip64 end record is not where its locator says")
        if rest != _EOCD64_REST:  # Python's zipfile would misplace the central directory
            raise _unreadable(kind, "zip64 end record has extensible data")
        for short, long, full in ((disk, disk64, _U16), (cd_disk, cd_disk64, _U16),
                                  (here, here64, _U16), (count, count64, _U16),
                                  (cd_size, cd_size64, _U32), (cd_offset, cd_offset64, _U32)):
            if short not in (full, long):
                raise _unreadable(kind, "zip64 end record contradicts the end record")
        disk, cd_disk, here, count = disk64, cd_disk64, here64, count64
        cd_size, cd_offset, cd_end = cd_size64, cd_offset64, record
    if count > MAX_ENTRIES:
        raise kind.error(f"{kind.what} has {count} zip entries, more than this farm's limit "
                         f"of {MAX_ENTRIES}{kind.entries_hint}")
    if disk != 0 or cd_disk != 0 or here != count:
        raise _unreadable(kind, "archive spans several disks")
    if cd_offset + cd_size != cd_end or cd_size < count * _CENTRAL.size:
        raise _unreadable(kind, "central directory size or offset is impossible")
    return count, cd_offset, cd_size


def _central_directory(data: bytes, kind: _Kind, count: int, cd_offset: int,
                       cd_size: int) -> list[_Central]:
    """The count records of the central directory, which they must fill exactly; names,
    flags, methods and extra fields checked.

    Raises:
        kind.error: a malformed record, or an entry refused on its record alone.
    """
    end = cd_offset + cd_size
    pos = cd_offset
    records: list[_Central] = []
    seen: set[str] = set()
    for _ in range(count):
        if pos + _CENTRAL.size > end:
            raise _unreadable(kind, "central directory is truncated")
        (sig, made_by, needed, flags, method, _, _, crc, compress_size, file_size, name_len,
         extra_len, comment_len, disk, _, external, offset) = _CENTRAL.unpack_from(data, pos)
        if sig != _CENTRAL_SIG:
            raise _unreadable(kind, "bad central directory record")
        name_at = pos + _CENTRAL.size
        extra_at = name_at + name_len
        pos = extra_at + extra_len + comment_len
        if pos > end:
            raise _unreadable(kind, "central directory is truncated")
        raw_name = data[name_at:extra_at]
        name = _decode_name(raw_name, flags, made_by >> 8, kind)
        problem = _unsafe_name(name)
        if problem:
            raise kind.error(f"{kind.what} entry {_show(name)} is unsafe ({problem})")
        if flags & _ENCRYPTED_FLAGS:
            raise _bad_entry(kind, name, "is encrypted, which this farm refuses")
        if stat.S_ISLNK(external >> 16):
            raise _bad_entry(kind, name, "is a symbolic link, which this farm refuses")
        if name in seen:
            raise _bad_entry(kind, name, "appears more than once")
        seen.add(name)
        _check_flags_method_version(kind, name, flags, method, needed)
        extras = _extra_fields(kind, name, data[extra_at:extra_at + extra_len], "central")
        sizes = _zip64_sizes(kind, name, extras, (file_size, compress_size, offset),
                             "central")
        file_size, compress_size, offset = sizes
        if disk != 0:
            raise _unreadable(kind, "archive spans several disks")
        if name.endswith("/") and file_size != 0:
            raise _bad_entry(kind, name, f"is a directory with {file_size} bytes of content")
        records.append(_Central(name, raw_name, flags, method, crc, compress_size, file_size,
                                offset))
    if pos != end:
        raise _unreadable(kind, "central directory size does not match its records")
    _check_file_dir_clash(seen, kind)
    return records


def _decode_name(raw: bytes, flags: int, host: int, kind: _Kind) -> str:
    """An entry name as unzip writes it on Linux: UTF-8 when flagged so; raw bytes otherwise
    (which must be ASCII, or UTF-8 from a Unix host: unzip converts other hosts' names from
    an OEM code page, Python's zipfile from cp437).

    Raises:
        kind.error: the name is neither.
    """
    if raw.isascii():
        return raw.decode("ascii")
    shown = _show(raw.decode("utf-8", errors="backslashreplace"))
    if not flags & _FLAG_UTF8 and host != _UNIX:
        raise kind.error(f"{kind.what} entry {shown} has a non-ASCII name in an unknown "
                         "character set (not flagged UTF-8, not from a Unix host)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise kind.error(f"{kind.what} entry {shown} has a name that is not valid "
                         "UTF-8") from None


def _check_flags_method_version(kind: _Kind, name: str, flags: int, method: int,
                                needed: int) -> None:
    """Raises:
        kind.error: unknown flags, a method other than stored or deflate, or a version
            needed to extract that unzip 6.0 may not have.
    """
    if flags & ~_KNOWN_FLAGS & _U16:
        raise _bad_entry(kind, name, f"uses zip flags 0x{flags:04x}, which this farm does "
                                     "not support")
    if method not in (_STORED, _DEFLATED):
        label = _METHOD_NAMES.get(method, "unknown")
        raise _bad_entry(kind, name, f"uses compression method {method} ({label}), which "
                                     "this farm refuses (only stored and deflate)")
    if needed & 0xFF > _MAX_NEEDED:
        version = needed & 0xFF
        raise _bad_entry(kind, name, f"needs zip version {version // 10}.{version % 10} to "
                                     "extract, more than this farm accepts (4.5)")


def _extra_fields(kind: _Kind, name: str, extra: bytes, where: str) -> dict[int, bytes]:
    """An extra field's records {id: data}; they must tile it exactly, each id once.

    Raises:
        kind.error: malformed, repeated ids, or a record that renames the entry for unzip.
    """
    records: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _bad_entry(kind, name, f"has a malformed {where} extra field")
        ident, size = struct.unpack_from("<2H", extra, pos)
        if pos + 4 + size > len(extra) or ident in records:
            raise _bad_entry(kind, name, f"has a malformed {where} extra field")
        if ident in _RENAMING_EXTRAS:
            raise _bad_entry(kind, name, f"has an {_RENAMING_EXTRAS[ident]} extra field "
                                         f"(0x{ident:04x}) in its {where} header, which "
                                         "renames it for unzip; this farm refuses it")
        records[ident] = extra[pos + 4:pos + 4 + size]
        pos += 4 + size
    return records


def _zip64_sizes(kind: _Kind, name: str, extras: dict[int, bytes], values: tuple[int, ...],
                 where: str) -> tuple[int, ...]:
    """values with each saturated one (0xFFFFFFFF) replaced from the zip64 extra field, which
    holds them in order (uncompressed, compressed, offset), 8 bytes each.

    Raises:
        kind.error: a saturated value the zip64 extra field does not hold.
    """
    if _U32 not in values:
        return values
    zip64 = extras.get(_ZIP64_EXTRA, b"")
    out: list[int] = []
    pos = 0
    for value in values:
        if value == _U32:
            if pos + 8 > len(zip64):
                raise _bad_entry(kind, name, f"has a malformed zip64 {where} extra field")
            value = struct.unpack_from("<Q", zip64, pos)[0]
            pos += 8
        out.append(value)
    return tuple(out)


def _local_header(data: bytes, kind: _Kind, central: _Central, cd_offset: int) -> _Entry:
    """The entry as its local header confirms it: same name, method, flags, CRC and sizes,
    no renaming extra field, data within the archive before the central directory.

    Raises:
        kind.error: no local header there, or one that differs from the central record.
    """
    name, offset = central.name, central.header_offset
    if offset + _LOCAL.size > cd_offset or not data.startswith(_LOCAL_SIG, offset):
        raise _bad_entry(kind, name, f"has no local header at offset {offset}")
    (_, needed, flags, method, _, _, crc, compress_size, file_size, name_len,
     extra_len) = _LOCAL.unpack_from(data, offset)
    name_at = offset + _LOCAL.size
    extra_at = name_at + name_len
    data_start = extra_at + extra_len
    if data_start > cd_offset:
        raise _bad_entry(kind, name, "has a local header that runs into the central directory")
    if data[name_at:extra_at] != central.raw_name:
        shown = data[name_at:extra_at].decode("utf-8", errors="backslashreplace")
        raise _bad_entry(kind, name, f"is named {_show(shown)} in its local header")
    if method != central.method:
        raise _bad_entry(kind, name, f"has compression method {method} in its local header "
                                     f"but {central.method} in the central directory")
    if (flags ^ central.flags) & (_ENCRYPTED_FLAGS | _FLAG_DESCRIPTOR | _FLAG_UTF8):
        raise _bad_entry(kind, name, f"has flags 0x{flags:04x} in its local header but "
                                     f"0x{central.flags:04x} in the central directory")
    _check_flags_method_version(kind, name, flags, method, needed)
    extras = _extra_fields(kind, name, data[extra_at:data_start], "local")
    if _U32 in (compress_size, file_size):  # zip64: the local extra holds both sizes
        if compress_size != file_size:  # unzip would take the other one from the header
            raise _bad_entry(kind, name, "has a malformed zip64 local header (one size "
                                         "saturated, the other not)")
        file_size, compress_size = _zip64_sizes(kind, name, extras, (_U32, _U32), "local")
    local = (crc, compress_size, file_size)
    declared = (central.crc, central.compress_size, central.file_size)
    if local != declared and not (flags & _FLAG_DESCRIPTOR and local == (0, 0, 0)):
        raise _bad_entry(kind, name, "has a CRC or sizes in its local header that differ from "
                                     "the central directory's")
    if data_start + central.compress_size > cd_offset:
        raise _bad_entry(kind, name, "has data that runs into the central directory")
    return _Entry(name, method, central.crc, central.compress_size, central.file_size,
                  offset, data_start)


def _check_file_dir_clash(names: set[str], kind: _Kind = _REQUEST) -> None:
    """Refuse a file entry that another entry uses as a directory ("a" and "a/b" or "a/").

    Raises:
        kind.error: some file name is also a directory.
    """
    clash = _file_dir_clash(names)
    if clash is not None:
        raise _bad_entry(kind, clash, "is both a file and a directory")


def _file_dir_clash(names: set[str]) -> str | None:
    """The first file name that another name uses as a directory, or None."""
    ordered = sorted(names)
    for name in ordered:
        if name.endswith("/"):
            continue
        i = bisect.bisect_left(ordered, name + "/")  # names under name/ sort right there
        if i < len(ordered) and ordered[i].startswith(name + "/"):
            return name
    return None


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


def _check_total(total: int, limit: int, kind: _Kind = _REQUEST) -> None:
    """The sum of the declared sizes, as upstream's `unzip -Zt` check (§2.5 step 4).

    Raises:
        kind.error: total outside kind.min_total..limit.
    """
    if total < kind.min_total:
        raise kind.error(f"{kind.what} is empty (0 bytes uncompressed)")
    if total > limit:
        raise kind.error(f"{kind.what} of {total} bytes uncompressed exceeds this farm's "
                         f"limit of {limit} bytes{kind.size_hint}")


def _read_contents(data: bytes, entries: Sequence[_Entry], limit: int,
                   kind: _Kind = _REQUEST) -> dict[str, bytes]:
    """The content of every entry (directories: b""), decompressing at most limit + 1 bytes
    in all whatever the headers say.

    Raises:
        kind.error: the actual total exceeds limit, or some entry's data is not exactly what
            its headers declare.
    """
    view = memoryview(data)
    contents: dict[str, bytes] = {}
    budget = limit
    for entry in entries:
        content = _read_entry(view, entry, budget, kind)
        budget -= len(content)
        if budget < 0:
            raise kind.error(f"{kind.what} of more than {limit} bytes uncompressed exceeds "
                             f"this farm's limit of {limit} bytes{kind.size_hint}")
        contents[entry.name] = content
    return contents


def _read_entry(view: memoryview, entry: _Entry, budget: int, kind: _Kind) -> bytes:
    """An entry's content, checked to be exactly what its headers declare; or its first
    budget + 1 bytes when it is longer than budget (the caller refuses it).

    Raises:
        kind.error: the data is corrupt, longer or shorter than declared, does not end
            where the compressed size says, or has another CRC.
    """
    compressed = view[entry.data_start:entry.data_start + entry.compress_size]
    name = entry.name
    if entry.method == _STORED:
        if entry.compress_size != entry.file_size:
            raise _bad_entry(kind, name, f"is corrupt (stored as {entry.compress_size} bytes "
                                         f"but declared as {entry.file_size} bytes)")
        if entry.file_size > budget:
            return bytes(compressed[:budget + 1])
        content = bytes(compressed)
    else:
        cap = min(entry.file_size, budget)
        try:
            content, ended, left = _inflate(compressed, cap)
        except zlib.error as e:
            detail = " ".join(str(e).split())[:_SHOW_MAX]
            raise _bad_entry(kind, name, f"is corrupt (bad deflate data: {detail})") from e
        if len(content) > cap:
            if cap < entry.file_size:
                return content
            raise _bad_entry(kind, name, "is corrupt (its deflate data inflates to more than "
                                         f"its declared {entry.file_size} bytes)")
        if not ended:
            raise _bad_entry(kind, name, "is corrupt (its deflate data does not end within "
                                         f"its {entry.compress_size} compressed bytes)")
        if left:
            raise _bad_entry(kind, name, f"is corrupt ({left} bytes follow the end of its "
                                         "deflate data)")
        if len(content) != entry.file_size:
            raise _bad_entry(kind, name, f"is corrupt (its deflate data inflates to "
                                         f"{len(content)} of its declared {entry.file_size} "
                                         "bytes)")
    crc = zlib.crc32(content)
    if crc != entry.crc:
        raise _bad_entry(kind, name, f"is corrupt (CRC-32 0x{crc:08x}, declared "
                                     f"0x{entry.crc:08x})")
    return content


def _inflate(compressed: bytes | memoryview, limit: int) -> tuple[bytes, bool, int]:
    """(output, whether the deflate stream ended, compressed bytes not consumed): raw
    deflate, at most limit + 1 bytes of output whatever the input.

    Raises:
        zlib.error: the data is not deflate.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    output = inflater.decompress(compressed, limit + 1)
    left = len(inflater.unused_data) + len(inflater.unconsumed_tail)
    return output, inflater.eof, left


def _read_archive(data: bytes, limit: int,
                  kind: _Kind) -> tuple[tuple[str, ...], dict[str, bytes]]:
    """(sorted directory names, {file name: content}) of a zip the strict reader accepts.

    Raises:
        kind.error: refused; one line.
    """
    if not data:
        raise kind.error(f"{kind.what} is not a zip archive")
    entries = _entries(data, kind)
    _check_total(sum(entry.file_size for entry in entries), limit, kind)
    contents = _read_contents(data, entries, limit, kind)
    dirs = tuple(sorted(e.name for e in entries if e.is_dir))
    files = {e.name: contents[e.name] for e in entries if not e.is_dir}
    return dirs, files


# --------------------------------------------------------------------------- requests


def inspect_request(data: bytes, max_uncompressed: int) -> Request:
    """Check a request zip as the client builds it (§3.3) and read it into a `Request`.

    Refuses archives that are not zips or that the strict reader refuses (see the module
    docstring), more than MAX_ENTRIES entries, unsafe, duplicate or symlink entries, a total
    size outside 1..max_uncompressed (declared or actual), a missing or malformed `sysinfo`,
    or a protocol version that is unknown or < 1.6.

    Raises:
        RequestError: the request is refused; the message says why, in one line.
    """
    dirs, contents = _read_archive(data, max_uncompressed, _REQUEST)
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


def encode_request(request: Request) -> bytes:
    """The zip the farm forwards for request: written afresh from request.dirs and
    request.files alone (never the client's bytes), deterministically (see `_encode`).

    inspect_request(encode_request(r), limit) == r for every r inspect_request returned.

    Raises:
        ValueError: an entry name that inspect_request would refuse (a hand-made Request).
    """
    return _encode(request.dirs, request.files)


# --------------------------------------------------------------------------- cache


def cache_key(request: Request, identity: str) -> str:
    """Hex sha256 naming the module a request builds on the server identified by identity.

    Covers identity, every directory entry and every (name, content) of request.files:
    everything `encode_request` forwards. Each part is length-prefixed (so ("ab", "c") and
    ("a", "bc") differ) and each section counted, in name order (the zip's order does not
    matter).
    """
    digest = hashlib.sha256(_KEY_TAG)
    digest.update(_framed(identity.encode("utf-8", errors="surrogateescape")))
    dirs = sorted(request.dirs)
    digest.update(struct.pack(">Q", len(dirs)))
    for name in dirs:
        digest.update(_framed(name.encode("utf-8", errors="surrogateescape")))
    files = sorted(request.files)
    digest.update(struct.pack(">Q", len(files)))
    for name, content in files:
        digest.update(_framed(name.encode("utf-8", errors="surrogateescape")))
        digest.update(_framed(content))
    return digest.hexdigest()


def _framed(data: bytes) -> bytes:
    """data prefixed by its length (8 bytes, big-endian)."""
    return struct.pack(">Q", len(data)) + data


# --------------------------------------------------------------------------- writer


def _encode(dirs: Iterable[str], files: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip of exactly these directories and files, the same bytes for the same input:
    entries in name order, files deflated (default level), directories stored, all dated
    1980-01-01 00:00:00, mode 0644 (files) or 0755 + the MS-DOS directory bit (directories),
    made on Unix, no extra fields, no comments; non-ASCII names UTF-8 (flagged).

    Raises:
        ValueError: an unsafe or duplicate name, a directory name without the trailing "/",
            a file name with one, or a file that is also a directory.
    """
    entries: list[tuple[str, bytes | None]] = [(name, None) for name in dirs]
    entries += [(name, content) for name, content in files]
    entries.sort(key=lambda entry: entry[0])
    _check_layout(entries)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries:
            info = zipfile.ZipInfo(name, date_time=_DATE_TIME)
            info.create_system = _UNIX
            if content is None:
                info.external_attr = _DIR_ATTR
                info.CRC = info.compress_size = info.file_size = 0
                archive.mkdir(info)
            else:
                info.external_attr = _FILE_ATTR
                archive.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _check_layout(entries: Sequence[tuple[str, bytes | None]]) -> None:
    """Raises:
        ValueError: see `_encode`.
    """
    names: set[str] = set()
    for name, content in entries:
        problem = _unsafe_name(name)
        if problem:
            raise ValueError(f"entry {name!r} is unsafe ({problem})")
        if name.endswith("/") != (content is None):
            kind = "directory" if content is None else "file"
            raise ValueError(f"{kind} entry {name!r} must {'' if content is None else 'not '}"
                             "end with '/'")
        if name in names:
            raise ValueError(f"entry {name!r} appears more than once")
        names.add(name)
    clash = _file_dir_clash(names)
    if clash is not None:
        raise ValueError(f"entry {clash!r} is both a file and a directory")


# --------------------------------------------------------------------------- responses


def inspect_response(data: bytes, max_size: int) -> Response:
    """Check a backend's response zip with the strict reader and read it into a `Response`.

    The same rules as requests (names, entries, methods, extra fields, headers, data), at
    most max_size bytes uncompressed (declared and actual); no rules about its layout.

    Raises:
        ResponseError: the response is refused; one line.
    """
    dirs, contents = _read_archive(data, max_size, _RESPONSE)
    return Response(dirs=dirs, files=tuple(sorted(contents.items())))


def encode_response(response: Response) -> bytes:
    """The zip the farm caches and sends for response: written afresh from response.dirs and
    response.files, as `encode_request` (nothing added, nothing dropped).

    Raises:
        ValueError: an entry name that inspect_response would refuse.
    """
    return _encode(response.dirs, response.files)


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
        entries = _entries(data, _RESPONSE) if data else []
        for entry in entries:
            if entry.name == "rc":
                if entry.file_size > _RC_MAX:
                    return None
                content = _read_contents(data, [entry], _RC_MAX, _RESPONSE)["rc"]
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
