"""The strict zip reader's first stage: from the end records to a list of checked entries.

Pure (no I/O): bytes in, `Entry` values or one error out. Strict so that Python and Info-ZIP
`unzip` could only ever read an accepted zip the same way: it reads the end records itself
(refusing more than the `Kind`'s max_entries before looking at any), parses every central and
local header itself, and refuses methods other than stored and deflate, encryption, extra
fields that rename entries for unzip (0x7075, 0x6375), unsafe or duplicate names, symbolic
links, a file that is also a directory, local headers that disagree with the central
directory, and overlapping entries. It reads no entry data: farm/endpoint/zipread.py does,
within a budget, and checks that every entry's data ends exactly where its headers say.

Every refusal is one line, raised as the error class of the `Kind` being read (the wire
protocol's request or response, farm/endpoint/wire.py), worded for the user.
"""

from __future__ import annotations

import itertools
import stat
import struct
from dataclasses import dataclass

from farm.endpoint.zipnames import UNIX, file_dir_clash, show, unsafe_name

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

STORED = 0
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
_ZIP64_EXTRA = 0x0001
# Extra fields that make unzip name (or describe) an entry differently from its header.
_RENAMING_EXTRAS = {0x7075: "Info-ZIP Unicode Path", 0x6375: "Info-ZIP Unicode Comment"}


@dataclass(frozen=True)
class Kind:
    """What is being read, for messages: its name, the error class every refusal raises,
    and the hints and bounds that differ between requests and responses."""

    what: str
    error: type[Exception]
    max_entries: int  # entries in one zip
    entries_hint: str  # appended to "too many entries"
    size_hint: str  # appended to "exceeds this farm's limit of N bytes"
    min_total: int  # fewest uncompressed bytes accepted


@dataclass(frozen=True)
class Entry:
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


def _unreadable(kind: Kind, detail: str) -> Exception:
    return kind.error(f"{kind.what} is not a readable zip archive ({detail})")


def bad_entry(kind: Kind, name: str, problem: str) -> Exception:
    """The error refusing entry name: "<what> entry '<name>' <problem>"."""
    return kind.error(f"{kind.what} entry {show(name)} {problem}")


def entries(data: bytes, kind: Kind) -> list[Entry]:
    """Every entry of the zip, in central directory order, each checked as the module
    docstring says.

    Reads the end records first and refuses more than kind.max_entries before parsing
    any; then every central record, then every local header. Reads no entry data.

    Raises:
        kind.error: the archive or some entry is refused; one line.
    """
    count, cd_offset, cd_size = _directory_bounds(data, kind)
    centrals = _central_directory(data, kind, count, cd_offset, cd_size)
    found = [_local_header(data, kind, central, cd_offset) for central in centrals]
    spans = sorted((e.header_offset, e.data_start + e.compress_size, e.name) for e in found)
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise bad_entry(kind, name, f"overlaps entry {show(other)} in the archive")
    return found


def _directory_bounds(data: bytes, kind: Kind) -> tuple[int, int, int]:
    """(entry count, central directory offset, central directory size) from the end record
    (the last `PK\\x05\\x06` in the final 65,557 bytes) and, when there is one, the zip64 end
    record. The central directory must end exactly where the end record(s) begin.

    Raises:
        kind.error: no end record, more than kind.max_entries entries, several disks, or a
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
    if count > kind.max_entries:
        raise kind.error(f"{kind.what} has {count} zip entries, more than this farm's limit "
                         f"of {kind.max_entries}{kind.entries_hint}")
    if disk != 0 or cd_disk != 0 or here != count:
        raise _unreadable(kind, "archive spans several disks")
    if cd_offset + cd_size != cd_end or cd_size < count * _CENTRAL.size:
        raise _unreadable(kind, "central directory size or offset is impossible")
    return count, cd_offset, cd_size


def _central_directory(data: bytes, kind: Kind, count: int, cd_offset: int,
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
        problem = unsafe_name(name)
        if problem:
            raise kind.error(f"{kind.what} entry {show(name)} is unsafe ({problem})")
        if flags & _ENCRYPTED_FLAGS:
            raise bad_entry(kind, name, "is encrypted, which this farm refuses")
        if stat.S_ISLNK(external >> 16):
            raise bad_entry(kind, name, "is a symbolic link, which this farm refuses")
        if name in seen:
            raise bad_entry(kind, name, "appears more than once")
        seen.add(name)
        _check_flags_method_version(kind, name, flags, method, needed)
        extras = _extra_fields(kind, name, data[extra_at:extra_at + extra_len], "central")
        sizes = _zip64_sizes(kind, name, extras, (file_size, compress_size, offset),
                             "central")
        file_size, compress_size, offset = sizes
        if disk != 0:
            raise _unreadable(kind, "archive spans several disks")
        if name.endswith("/") and file_size != 0:
            raise bad_entry(kind, name, f"is a directory with {file_size} bytes of content")
        records.append(_Central(name, raw_name, flags, method, crc, compress_size, file_size,
                                offset))
    if pos != end:
        raise _unreadable(kind, "central directory size does not match its records")
    _check_file_dir_clash(seen, kind)
    return records


def _decode_name(raw: bytes, flags: int, host: int, kind: Kind) -> str:
    """An entry name as unzip writes it on Linux: UTF-8 when flagged so; raw bytes otherwise
    (which must be ASCII, or UTF-8 from a Unix host: unzip converts other hosts' names from
    an OEM code page, Python's zipfile from cp437).

    Raises:
        kind.error: the name is neither.
    """
    if raw.isascii():
        return raw.decode("ascii")
    shown = show(raw.decode("utf-8", errors="backslashreplace"))
    if not flags & _FLAG_UTF8 and host != UNIX:
        raise kind.error(f"{kind.what} entry {shown} has a non-ASCII name in an unknown "
                         "character set (not flagged UTF-8, not from a Unix host)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise kind.error(f"{kind.what} entry {shown} has a name that is not valid "
                         "UTF-8") from None


def _check_flags_method_version(kind: Kind, name: str, flags: int, method: int,
                                needed: int) -> None:
    """Raises:
        kind.error: unknown flags, a method other than stored or deflate, or a version
            needed to extract that unzip 6.0 may not have.
    """
    if flags & ~_KNOWN_FLAGS & _U16:
        raise bad_entry(kind, name, f"uses zip flags 0x{flags:04x}, which this farm does "
                                    "not support")
    if method not in (STORED, _DEFLATED):
        label = _METHOD_NAMES.get(method, "unknown")
        raise bad_entry(kind, name, f"uses compression method {method} ({label}), which "
                                    "this farm refuses (only stored and deflate)")
    if needed & 0xFF > _MAX_NEEDED:
        version = needed & 0xFF
        raise bad_entry(kind, name, f"needs zip version {version // 10}.{version % 10} to "
                                    "extract, more than this farm accepts (4.5)")


def _extra_fields(kind: Kind, name: str, extra: bytes, where: str) -> dict[int, bytes]:
    """An extra field's records {id: data}; they must tile it exactly, each id once.

    Raises:
        kind.error: malformed, repeated ids, or a record that renames the entry for unzip.
    """
    records: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise bad_entry(kind, name, f"has a malformed {where} extra field")
        ident, size = struct.unpack_from("<2H", extra, pos)
        if pos + 4 + size > len(extra) or ident in records:
            raise bad_entry(kind, name, f"has a malformed {where} extra field")
        if ident in _RENAMING_EXTRAS:
            raise bad_entry(kind, name, f"has an {_RENAMING_EXTRAS[ident]} extra field "
                                        f"(0x{ident:04x}) in its {where} header, which "
                                        "renames it for unzip; this farm refuses it")
        records[ident] = extra[pos + 4:pos + 4 + size]
        pos += 4 + size
    return records


def _zip64_sizes(kind: Kind, name: str, extras: dict[int, bytes], values: tuple[int, ...],
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
                raise bad_entry(kind, name, f"has a malformed zip64 {where} extra field")
            value = struct.unpack_from("<Q", zip64, pos)[0]
            pos += 8
        out.append(value)
    return tuple(out)


def _local_header(data: bytes, kind: Kind, central: _Central, cd_offset: int) -> Entry:
    """The entry as its local header confirms it: same name, method, flags, CRC and sizes,
    no renaming extra field, data within the archive before the central directory.

    Raises:
        kind.error: no local header there, or one that differs from the central record.
    """
    name, offset = central.name, central.header_offset
    if offset + _LOCAL.size > cd_offset or not data.startswith(_LOCAL_SIG, offset):
        raise bad_entry(kind, name, f"has no local header at offset {offset}")
    (_, needed, flags, method, _, _, crc, compress_size, file_size, name_len,
     extra_len) = _LOCAL.unpack_from(data, offset)
    name_at = offset + _LOCAL.size
    extra_at = name_at + name_len
    data_start = extra_at + extra_len
    if data_start > cd_offset:
        raise bad_entry(kind, name, "has a local header that runs into the central directory")
    if data[name_at:extra_at] != central.raw_name:
        shown = data[name_at:extra_at].decode("utf-8", errors="backslashreplace")
        raise bad_entry(kind, name, f"is named {show(shown)} in its local header")
    if method != central.method:
        raise bad_entry(kind, name, f"has compression method {method} in its local header "
                                    f"but {central.method} in the central directory")
    if (flags ^ central.flags) & (_ENCRYPTED_FLAGS | _FLAG_DESCRIPTOR | _FLAG_UTF8):
        raise bad_entry(kind, name, f"has flags 0x{flags:04x} in its local header but "
                                    f"0x{central.flags:04x} in the central directory")
    _check_flags_method_version(kind, name, flags, method, needed)
    extras = _extra_fields(kind, name, data[extra_at:data_start], "local")
    if _U32 in (compress_size, file_size):  # zip64: the local extra holds both sizes
        if compress_size != file_size:  # unzip would take the other one from the header
            raise bad_entry(kind, name, "has a malformed zip64 local header (one size "
                                        "saturated, the other not)")
        file_size, compress_size = _zip64_sizes(kind, name, extras, (_U32, _U32), "local")
    local = (crc, compress_size, file_size)
    declared = (central.crc, central.compress_size, central.file_size)
    if local != declared and not (flags & _FLAG_DESCRIPTOR and local == (0, 0, 0)):
        raise bad_entry(kind, name, "has a CRC or sizes in its local header that differ from "
                                    "the central directory's")
    if data_start + central.compress_size > cd_offset:
        raise bad_entry(kind, name, "has data that runs into the central directory")
    return Entry(name, method, central.crc, central.compress_size, central.file_size,
                 offset, data_start)


def _check_file_dir_clash(names: set[str], kind: Kind) -> None:
    """Refuse a file entry that another entry uses as a directory ("a" and "a/b" or "a/").

    Raises:
        kind.error: some file name is also a directory.
    """
    clash = file_dir_clash(names)
    if clash is not None:
        raise bad_entry(kind, clash, "is both a file and a directory")
