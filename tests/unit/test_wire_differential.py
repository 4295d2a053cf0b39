"""The strict zip reader of farm/wire.py against parser differentials, and the re-encoding.

A security review found that the endpoint validated and keyed Python's reading of a request
zip but forwarded the client's bytes, which Info-ZIP `unzip` (the backend's and the client's
reader) reads differently: (a) a deflate stream that goes on past the declared size (Python
stops at file_size, unzip writes everything, the CRC forged to match), (b) an Info-ZIP Unicode
Path extra field (0x7075) that renames an entry for unzip only. Here both are built by hand,
byte by byte, with every other ambiguity the strict reader refuses, and the properties of the
fix: what is keyed is exactly what `encode_request` writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import stat
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.endpoint import wire, zipheaders
from farm.endpoint.wire import Request, RequestError, Response, ResponseError

LIMIT = 64 << 20
V = b"sysinfo: 6.12.48+tst13-amd64 x86_64"  # what Python's zipfile reads
S = b" EVIL"  # what unzip reads on top of it
BASE: dict[str, bytes] = {
    "version": b"5.1",
    "argv1": b"script/tmp/x/hello.stp",
    "argv2": b"-p4",
    "locale": b"LANG=C.UTF-8\n",
    "script/tmp/x/hello.stp": b'probe begin { println("hello"); exit() }\n',
}


# --------------------------------------------------------------------------- raw zips


def deflate(data: bytes, level: int = 6) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def forge_crc(data: bytes, target: int) -> bytes:
    """4 bytes that, appended to data, make its CRC-32 equal target (CRC-32 is linear)."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    by_top = {t >> 24: i for i, t in enumerate(table)}
    reg = target ^ 0xFFFFFFFF
    indices = [0] * 4
    for i in range(3, -1, -1):  # backwards from the target: the top byte names the index
        j = by_top[reg >> 24]
        indices[i] = j
        reg = ((reg ^ table[j]) << 8) & 0xFFFFFFFF
    reg = zlib.crc32(data) ^ 0xFFFFFFFF
    out = bytearray()
    for j in indices:  # forwards from data's register: the byte that selects index j
        out.append((reg ^ j) & 0xFF)
        reg = (reg >> 8) ^ table[j]
    assert zlib.crc32(data + bytes(out)) == target
    return bytes(out)


@dataclass
class Raw:
    """One entry of a hand-made zip; None fields are computed from content."""

    name: bytes
    content: bytes = b""
    method: int = 8
    data: bytes | None = None  # the bytes after the local header
    crc: int | None = None
    compress_size: int | None = None
    file_size: int | None = None
    flags: int = 0
    made_by: int = 0x031E  # Unix, 3.0 (as Info-ZIP zip)
    needed: int = 20
    external: int = (stat.S_IFREG | 0o644) << 16
    local_extra: bytes = b""
    central_extra: bytes = b""
    local_name: bytes | None = None
    local_method: int | None = None
    local_flags: int | None = None
    local_sizes: tuple[int, int, int] | None = None  # (crc, compressed, uncompressed)
    offset: int | None = None  # header offset written in the central record

    def payload(self) -> bytes:
        if self.data is not None:
            return self.data
        return deflate(self.content) if self.method == 8 else self.content


def raw_zip(entries: list[Raw], *, comment: bytes = b"", prefix: bytes = b"") -> bytes:
    out = bytearray(prefix)
    central = bytearray()
    for e in entries:
        payload = e.payload()
        crc = zlib.crc32(e.content) if e.crc is None else e.crc
        csize = len(payload) if e.compress_size is None else e.compress_size
        usize = len(e.content) if e.file_size is None else e.file_size
        offset = len(out)
        lname = e.name if e.local_name is None else e.local_name
        lcrc, lcsize, lusize = e.local_sizes or (crc, csize, usize)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", e.needed,
                           e.flags if e.local_flags is None else e.local_flags,
                           e.method if e.local_method is None else e.local_method, 0, 0x21,
                           lcrc, lcsize, lusize, len(lname), len(e.local_extra))
        out += lname + e.local_extra + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", e.made_by, e.needed, e.flags,
                               e.method, 0, 0x21, crc, csize, usize, len(e.name),
                               len(e.central_extra), 0, 0, 0, e.external,
                               offset if e.offset is None else e.offset)
        central += e.name + e.central_extra
    cd_offset = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                       len(central), cd_offset, len(comment)) + comment
    return bytes(out)


def base_entries() -> list[Raw]:
    return [Raw(name.encode(), content) for name, content in BASE.items()]


def request_with(*extra: Raw, sysinfo: Raw | None = None) -> bytes:
    """BASE plus sysinfo (V, unless given) plus the extra entries."""
    return raw_zip(base_entries() + [sysinfo or Raw(b"sysinfo", V)] + list(extra))


def refused(data: bytes, *, limit: int = LIMIT) -> str:
    with pytest.raises(RequestError) as e:
        wire.inspect_request(data, limit)
    message = str(e.value)
    assert message and "\n" not in message
    return message


def unicode_path(name: bytes, new: bytes) -> bytes:
    """An Info-ZIP Unicode Path extra field (0x7075) naming an entry new for unzip."""
    body = struct.pack("<BL", 1, zlib.crc32(name)) + new
    return struct.pack("<2H", 0x7075, len(body)) + body


def test_hand_made_zips_are_valid() -> None:
    """The builder itself makes zips both Python and the strict reader accept."""
    data = request_with()
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    request = wire.inspect_request(data, LIMIT)
    assert dict(request.files) == {**BASE, "sysinfo": V} and request.dirs == ()
    assert request.release == "6.12.48+tst13-amd64"


# --------------------------------------------------------------------------- attack (a)


def longer_stream(*, forge: bool = True) -> Raw:
    """sysinfo declaring V (size and CRC) whose deflate stream inflates to V + S + 4 bytes."""
    tail = S + (forge_crc(V + S, zlib.crc32(V)) if forge else b"")
    return Raw(b"sysinfo", V, data=deflate(V + tail))


@pytest.mark.parametrize("forge", [True, False])
def test_attack_a_deflate_stream_longer_than_declared_is_refused(forge: bool) -> None:
    data = request_with(sysinfo=longer_stream(forge=forge))
    if forge:  # the attack as reproduced: Python's zipfile reads V and is happy with the CRC
        assert zipfile.ZipFile(io.BytesIO(data)).read("sysinfo") == V
        assert zlib.crc32(zlib.decompress(longer_stream().payload(), -15)) == zlib.crc32(V)
    message = refused(data)
    assert message.startswith("request entry 'sysinfo' is corrupt")
    assert "inflates to more than its declared 35 bytes" in message


def test_attack_a_with_the_extra_output_in_a_second_block_is_refused() -> None:
    """V in one (non-final) block, S in a final one: output stops at file_size exactly."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = compressor.compress(V) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream += compressor.compress(S) + compressor.flush()
    assert zlib.decompress(stream, -15) == V + S
    message = refused(request_with(sysinfo=Raw(b"sysinfo", V, data=stream)))
    assert "'sysinfo' is corrupt" in message and "more than its declared" in message


def test_deflate_stream_ending_early_is_refused() -> None:
    """Declared V + S, the stream holds V only (and its CRC says V + S)."""
    entry = Raw(b"sysinfo", V + S, data=deflate(V))
    message = refused(request_with(sysinfo=entry))
    assert "'sysinfo' is corrupt" in message and "35 of its declared 40 bytes" in message


def test_trailing_garbage_inside_compress_size_is_refused() -> None:
    entry = Raw(b"sysinfo", V, data=deflate(V) + b"JUNK")
    message = refused(request_with(sysinfo=entry))
    assert "'sysinfo' is corrupt (4 bytes follow the end of its deflate data)" in message


def test_deflate_stream_not_ending_within_compress_size_is_refused() -> None:
    """The final block's end lies past compress_size (unzip would read on, or fail)."""
    stream = deflate(V, level=0)  # stored blocks: cutting 1 byte loses only the end
    entry = Raw(b"sysinfo", V, data=stream[:-1])
    message = refused(request_with(sysinfo=entry))
    assert "'sysinfo' is corrupt" in message and "does not end within" in message


def test_stream_after_a_sync_flush_without_a_final_block_is_refused() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = compressor.compress(V) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert zlib.decompressobj(-15).decompress(stream) == V  # V, but no final block
    message = refused(request_with(sysinfo=Raw(b"sysinfo", V, data=stream)))
    assert "does not end within" in message


def test_corrupt_deflate_data_is_refused() -> None:
    entry = Raw(b"sysinfo", V, data=b"\xff" * 20)
    message = refused(request_with(sysinfo=entry))
    assert "'sysinfo' is corrupt (bad deflate data" in message


def test_crc_mismatch_is_refused() -> None:
    message = refused(request_with(sysinfo=Raw(b"sysinfo", V, crc=zlib.crc32(V) ^ 1)))
    assert "'sysinfo' is corrupt (CRC-32" in message


@pytest.mark.parametrize("compress_size", [len(V) - 1, len(V) + 1])
def test_stored_entry_with_compress_size_other_than_file_size_is_refused(
        compress_size: int) -> None:
    entry = Raw(b"sysinfo", V, method=0, data=(V + S)[:compress_size],
                compress_size=compress_size)
    message = refused(request_with(sysinfo=entry))
    assert f"'sysinfo' is corrupt (stored as {compress_size} bytes but declared as 35" in message


def test_stored_and_deflated_entries_are_accepted() -> None:
    data = request_with(Raw(b"tapset/a", b"stored", method=0), Raw(b"tapset/b", b""),
                        Raw(b"tapset/c", b"", method=0), Raw(b"tapset/d/", b"", method=0))
    request = wire.inspect_request(data, LIMIT)
    assert dict(request.files)["tapset/a"] == b"stored" and dict(request.files)["tapset/b"] == b""
    assert request.dirs == ("tapset/d/",)


def test_directory_with_content_is_refused() -> None:
    message = refused(request_with(Raw(b"tapset/d/", b"data")))
    assert message == "request entry 'tapset/d/' is a directory with 4 bytes of content"


# --------------------------------------------------------------------------- attack (b)


@pytest.mark.parametrize("local, central", [(True, True), (False, True), (True, False)])
def test_attack_b_unicode_path_extra_field_is_refused(local: bool, central: bool) -> None:
    extra = unicode_path(b"sysinfo", b"evilname")
    entry = Raw(b"sysinfo", V, local_extra=extra if local else b"",
                central_extra=extra if central else b"")
    data = request_with(sysinfo=entry)
    assert zipfile.ZipFile(io.BytesIO(data)).read("sysinfo") == V  # Python sees "sysinfo"
    message = refused(data)
    where = "central" if central else "local"
    assert message == ("request entry 'sysinfo' has an Info-ZIP Unicode Path extra field "
                       f"(0x7075) in its {where} header, which renames it for unzip; this "
                       "farm refuses it")


def test_unicode_path_that_does_not_rename_is_refused_too() -> None:
    extra = unicode_path(b"tapset/x", b"tapset/x")
    assert "(0x7075)" in refused(request_with(Raw(b"tapset/x", b"x", central_extra=extra)))


def test_unicode_comment_extra_field_is_refused() -> None:
    body = struct.pack("<BL", 1, 0) + b"comment"
    extra = struct.pack("<2H", 0x6375, len(body)) + body
    message = refused(request_with(Raw(b"tapset/x", b"x", central_extra=extra)))
    assert "Info-ZIP Unicode Comment extra field (0x6375)" in message


def test_other_extra_fields_are_accepted_and_dropped_by_encode() -> None:
    """Info-ZIP zip's own fields (UT 0x5455, ux 0x7875) are harmless, and not forwarded."""
    ut = struct.pack("<2HBL", 0x5455, 5, 3, 0x6B0F7CE2)
    ux = struct.pack("<2HBBLBL", 0x7875, 11, 1, 4, 0, 4, 0)
    entry = Raw(b"tapset/x", b"x", local_extra=ut + ux, central_extra=ut + ux)
    request = wire.inspect_request(request_with(entry), LIMIT)
    infos = zipfile.ZipFile(io.BytesIO(wire.encode_request(request))).infolist()
    assert all(info.extra == b"" for info in infos)


@pytest.mark.parametrize("extra", [b"\x55", b"\x55\x54\x05", b"\x55\x54\x05\x00\x03",
                                   struct.pack("<2H", 0x5455, 1) + b"\x00" * 2,
                                   struct.pack("<2H", 0x5455, 0) * 2])
def test_malformed_extra_field_is_refused(extra: bytes) -> None:
    message = refused(request_with(Raw(b"tapset/x", b"x", central_extra=extra)))
    assert message == "request entry 'tapset/x' has a malformed central extra field"


# --------------------------------------------------------------------------- methods, flags


@pytest.mark.parametrize("method, label", [
    (12, "bzip2"), (14, "lzma"), (99, "AES encryption"), (9, "deflate64"), (1, "shrink"),
    (93, "zstd"), (7, "unknown"),
])
def test_unknown_compression_method_is_refused(method: int, label: str) -> None:
    entry = Raw(b"script/tmp/x/hello.stp", b"x", method=method, data=b"x")
    message = refused(raw_zip([entry, Raw(b"sysinfo", V)]))
    assert message == (f"request entry 'script/tmp/x/hello.stp' uses compression method "
                       f"{method} ({label}), which this farm refuses (only stored and deflate)")


def test_python_bzip2_and_lzma_zips_are_refused() -> None:
    for compression in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
            archive.writestr("sysinfo", V)
        assert f"compression method {compression}" in refused(buffer.getvalue())


@pytest.mark.parametrize("flags, what", [
    (0x0001, "is encrypted"), (0x0040, "is encrypted"), (0x2000, "is encrypted"),
    (0x0020, "uses zip flags 0x0020"), (0x0010, "uses zip flags 0x0010"),
    (0x1000, "uses zip flags 0x1000"),
])
def test_unsupported_flags_are_refused(flags: int, what: str) -> None:
    message = refused(request_with(Raw(b"tapset/x", b"x", flags=flags)))
    assert message.startswith(f"request entry 'tapset/x' {what}")


def test_version_needed_above_4_5_is_refused() -> None:
    message = refused(request_with(Raw(b"tapset/x", b"x", needed=63)))
    assert "needs zip version 6.3 to extract" in message


def test_data_descriptor_entries_are_accepted() -> None:
    """zipfile writing to a pipe: bit 3, zero CRC and sizes in the local header."""
    data = request_with(Raw(b"tapset/x", b"hello", flags=0x08, local_sizes=(0, 0, 0)))
    assert dict(wire.inspect_request(data, LIMIT).files)["tapset/x"] == b"hello"


# --------------------------------------------------------------------------- local headers


def test_local_name_differing_from_the_central_name_is_refused() -> None:
    entry = Raw(b"sysinfo", V, local_name=b"sysinfX")
    assert refused(request_with(sysinfo=entry)) == (
        "request entry 'sysinfo' is named 'sysinfX' in its local header")


def test_local_method_differing_from_the_central_method_is_refused() -> None:
    entry = Raw(b"sysinfo", V, method=0, local_method=8)
    assert refused(request_with(sysinfo=entry)) == (
        "request entry 'sysinfo' has compression method 8 in its local header but 0 in the "
        "central directory")


def test_local_flags_differing_from_the_central_flags_are_refused() -> None:
    entry = Raw(b"sysinfo", V, local_flags=0x0800)
    assert "has flags 0x0800 in its local header but 0x0000" in refused(
        request_with(sysinfo=entry))


@pytest.mark.parametrize("change", [(0, 0, 0), (1, 2, 3), "crc", "csize", "usize"])
def test_local_crc_or_sizes_differing_from_the_central_ones_are_refused(
        change: tuple[int, int, int] | str) -> None:
    crc, csize, usize = zlib.crc32(V), len(deflate(V)), len(V)
    sizes = {"crc": (crc + 1, csize, usize), "csize": (crc, csize + 1, usize),
             "usize": (crc, csize, usize + 1)}.get(change, (0, 0, 0)) \
        if isinstance(change, str) else change
    message = refused(request_with(sysinfo=Raw(b"sysinfo", V, local_sizes=sizes)))
    assert "has a CRC or sizes in its local header that differ from the central" in message


@pytest.mark.parametrize("offset", [1, 10**6, 2**32 - 2])
def test_central_record_not_pointing_at_a_local_header_is_refused(offset: int) -> None:
    message = refused(raw_zip([Raw(b"sysinfo", V, offset=offset)]))
    assert message == f"request entry 'sysinfo' has no local header at offset {offset}"


def test_overlapping_entries_are_refused() -> None:
    """Two central records whose data overlap (one quoting the other's local header)."""
    inner = raw_zip([Raw(b"tapset/b", b"inner", method=0)])
    inner_local = inner[:inner.index(b"PK\x01\x02")]
    outer = Raw(b"tapset/a", inner_local, method=0)
    data = bytearray(raw_zip([outer, Raw(b"sysinfo", V)]))
    # add a central record for tapset/b pointing inside tapset/a's data
    b_offset = 30 + len(b"tapset/a")
    zf = zipfile.ZipFile(io.BytesIO(bytes(data)))
    assert zf.read("tapset/a") == inner_local
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 20, 0, 0, 0, 0x21,
                          zlib.crc32(b"inner"), 5, 5, 8, 0, 0, 0, 0,
                          (stat.S_IFREG | 0o644) << 16, b_offset) + b"tapset/b"
    eocd_at = len(data) - 22
    count, cd_size, cd_offset = struct.unpack_from("<H2L", data, eocd_at + 10)
    data[eocd_at:eocd_at] = central
    struct.pack_into("<4s4H2LH", data, len(data) - 22, b"PK\x05\x06", 0, 0, count + 1,
                     count + 1, cd_size + len(central), cd_offset, 0)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).read("tapset/b") == b"inner"
    message = refused(bytes(data))
    assert message == "request entry 'tapset/a' overlaps entry 'tapset/b' in the archive"


# --------------------------------------------------------------------------- names


def test_non_ascii_name_from_unix_without_the_utf8_flag_is_read_as_utf8() -> None:
    """What Info-ZIP zip 3.0 writes for a non-ASCII path, and what unzip writes back."""
    name = "script/tmp/jos\u00e9/x.stp"
    request = wire.inspect_request(request_with(Raw(name.encode(), b"x")), LIMIT)
    assert name in dict(request.files)
    infos = zipfile.ZipFile(io.BytesIO(wire.encode_request(request))).infolist()
    assert {i.filename: i.flag_bits & 0x800 for i in infos}[name] == 0x800


def test_non_ascii_name_flagged_utf8_is_accepted() -> None:
    name = "tapset/\u00fcber/\u6f22\u5b57"
    entry = Raw(name.encode(), b"x", flags=0x800, made_by=0x0014)
    assert name in dict(wire.inspect_request(request_with(entry), LIMIT).files)


def test_non_ascii_name_from_a_non_unix_host_without_the_flag_is_refused() -> None:
    """unzip converts such a name from an OEM code page, Python from cp437: ambiguous."""
    entry = Raw("tapset/caf\u00e9".encode(), b"x", made_by=0x0014)  # MS-DOS host
    message = refused(request_with(entry))
    assert message == ("request entry 'tapset/caf\u00e9' has a non-ASCII name in an unknown "
                       "character set (not flagged UTF-8, not from a Unix host)")


@pytest.mark.parametrize("flags", [0, 0x800])
def test_name_that_is_not_utf8_is_refused(flags: int) -> None:
    message = refused(request_with(Raw(b"tapset/caf\xe9", b"x", flags=flags)))
    assert message == "request entry 'tapset/caf\\\\xe9' has a name that is not valid UTF-8"


def test_symlink_and_unsafe_names_are_still_refused() -> None:
    link = Raw(b"tapset/l", b"/etc/passwd", external=(stat.S_IFLNK | 0o777) << 16)
    assert "symbolic link" in refused(request_with(link))
    assert "'..' component" in refused(request_with(Raw(b"tapset/../../x", b"x")))
    assert "appears more than once" in refused(request_with(Raw(b"sysinfo", V)))


# --------------------------------------------------------------------------- end records


def end_record(count: int, cd_size: int, cd_offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset,
                       len(comment)) + comment


def zip64_end(count: int, cd_size: int, cd_offset: int, record_at: int, *,
              short: tuple[int, int, int] = (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
              rest: int = 44, extensible: bytes = b"") -> bytes:
    """A zip64 end record at record_at, its locator, and the end record (saturated)."""
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", rest, 0x031E, 45, 0, 0, count, count,
                         cd_size, cd_offset) + extensible
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
    short_count, short_size, short_offset = short
    return record + locator + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, short_count,
                                          short_count, short_size, short_offset, 0)


def split(data: bytes) -> tuple[bytes, int, int, int]:
    """(everything before the end record, entries, central directory size, its offset)."""
    eocd = data.rindex(b"PK\x05\x06")
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<4s4H2LH", data, eocd)
    return data[:eocd], count, cd_size, cd_offset


def test_a_million_entries_are_refused_from_the_end_record_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A zip64 end record declaring 1,000,000 entries: refused before any record is parsed
    (the central directory parser is never called) and with nothing allocated per entry."""
    def never(*args: object) -> None:
        raise AssertionError("the central directory was parsed")

    monkeypatch.setattr(zipheaders, "_central_directory", never)
    data = zip64_end(1_000_000, 46 * 1_000_000, 0, 0)
    tracemalloc.start()
    try:
        message = refused(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == ("request has 1000000 zip entries, more than this farm's limit of 20000; "
                       "send fewer files (tapset -I directories count)")
    assert peak < 1 << 20


def test_65535_entries_without_zip64_are_refused_from_the_end_record_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipheaders, "_central_directory", None)  # calling it would be a TypeError
    assert "request has 65535 zip entries" in refused(end_record(0xFFFF, 0, 0))


def test_response_entry_count_is_bounded_too() -> None:
    with pytest.raises(ResponseError, match="response has 1000000 zip entries"):
        wire.inspect_response(zip64_end(1_000_000, 0, 0, 0), LIMIT)


def test_zip64_end_record_is_honoured() -> None:
    plain = request_with()
    body, count, cd_size, cd_offset = split(plain)
    data = body + zip64_end(count, cd_size, cd_offset, len(body))
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == zipfile.ZipFile(
        io.BytesIO(plain)).namelist()
    assert wire.inspect_request(data, LIMIT) == wire.inspect_request(plain, LIMIT)
    # 32-bit fields may also hold the real values (only the saturated ones are replaced)
    real = zip64_end(count, cd_size, cd_offset, len(body), short=(count, cd_size, cd_offset))
    assert wire.inspect_request(body + real, LIMIT) == wire.inspect_request(plain, LIMIT)


def test_zip64_end_record_contradicting_the_end_record_is_refused() -> None:
    body, count, cd_size, cd_offset = split(request_with())
    for short in ((count - 1, cd_size, cd_offset), (count, cd_size + 1, cd_offset),
                  (count, cd_size, cd_offset - 1)):
        message = refused(body + zip64_end(count, cd_size, cd_offset, len(body), short=short))
        assert message == ("request is not a readable zip archive (zip64 end record "
                           "contradicts the end record)")


def test_zip64_end_record_with_extensible_data_or_misplaced_is_refused() -> None:
    body, count, cd_size, cd_offset = split(request_with())
    extended = zip64_end(count, cd_size, cd_offset, len(body), rest=48, extensible=b"\0" * 4)
    assert "extensible data" in refused(body + extended)
    misplaced = zip64_end(count, cd_size, cd_offset, len(body) - 1)
    assert "zip64 end record is not where its locator says" in refused(body + misplaced)


@pytest.mark.parametrize("cd_size, cd_offset", [
    (0, 0), (100, 0), (10**6, 0), (2**32 - 1, 2**32 - 1), ("-1", None), ("+1", None),
])
def test_impossible_central_directory_size_or_offset_is_refused(
        cd_size: int | str, cd_offset: int | None) -> None:
    body, count, real_size, real_offset = split(request_with())
    if isinstance(cd_size, str):  # shift both: the directory no longer ends at the record
        delta = int(cd_size)
        cd_size, cd_offset = real_size, real_offset + delta
    assert cd_offset is not None
    message = refused(body + end_record(count, cd_size, cd_offset))
    assert message == ("request is not a readable zip archive (central directory size or "
                       "offset is impossible)")


def test_data_before_the_archive_is_refused() -> None:
    """Prepended data (a self-extractor stub) shifts every offset: Python and unzip adjust
    them by guessing; the strict reader refuses instead."""
    body, count, cd_size, cd_offset = split(request_with())
    assert "impossible" in refused(b"MZ" + body + end_record(count, cd_size, cd_offset))


def test_central_directory_size_not_matching_its_records_is_refused() -> None:
    body, count, cd_size, cd_offset = split(request_with())
    message = refused(body + b"\0" * 46 + end_record(count, cd_size + 46, cd_offset))
    assert message == ("request is not a readable zip archive (central directory size does "
                       "not match its records)")


def test_archive_comment_is_accepted_only_when_it_ends_the_archive() -> None:
    body, count, cd_size, cd_offset = split(request_with())
    good = body + end_record(count, cd_size, cd_offset, b"a comment")
    assert wire.inspect_request(good, LIMIT).release
    assert "end record does not end the archive" in refused(good + b"x")
    assert "end record does not end the archive" in refused(good[:-1])


def test_several_disks_are_refused() -> None:
    body, count, cd_size, cd_offset = split(request_with())
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 1, 0, count, count, cd_size, cd_offset, 0)
    assert "spans several disks" in refused(body + eocd)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count - 1, count, cd_size, cd_offset, 0)
    assert "spans several disks" in refused(body + eocd)


def test_zip64_local_header_with_one_size_saturated_is_refused() -> None:
    """Found by fuzzing against unzip: it takes the unsaturated size from the header (and
    warns), where taking both from the zip64 field would read another size."""
    zip64 = struct.pack("<2HQQ", 1, 16, len(V), len(V))
    crc = zlib.crc32(V)
    both = Raw(b"sysinfo", V, method=0, local_extra=zip64,
               local_sizes=(crc, 0xFFFFFFFF, 0xFFFFFFFF))
    assert wire.inspect_request(request_with(sysinfo=both), LIMIT).release
    for sizes in ((crc, 0xFFFFFFFF, 0x2FFFFFFF), (crc, 0x8BFFFFFF, 0xFFFFFFFF)):
        half = dataclasses.replace(both, local_sizes=sizes)
        assert refused(request_with(sysinfo=half)) == (
            "request entry 'sysinfo' has a malformed zip64 local header (one size saturated, "
            "the other not)")


def test_saturated_central_size_without_zip64_field_is_refused() -> None:
    local = (zlib.crc32(V), len(V), len(V))
    entry = Raw(b"sysinfo", V, method=0, file_size=0xFFFFFFFF, local_sizes=local)
    assert refused(request_with(sysinfo=entry)) == (
        "request entry 'sysinfo' has a malformed zip64 central extra field")
    short = struct.pack("<2HL", 1, 4, len(V))
    entry = dataclasses.replace(entry, central_extra=short)
    assert "malformed zip64 central extra field" in refused(request_with(sysinfo=entry))
    good = struct.pack("<2HQ", 1, 8, len(V))
    entry = dataclasses.replace(entry, central_extra=good)
    assert dict(wire.inspect_request(request_with(sysinfo=entry), LIMIT).files)["sysinfo"] == V


def test_zip64_entries_written_by_python_are_accepted() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in {**BASE, "sysinfo": V}.items():
            with archive.open(name, "w", force_zip64=True) as stream:
                stream.write(content)
    request = wire.inspect_request(buffer.getvalue(), LIMIT)
    assert dict(request.files) == {**BASE, "sysinfo": V}


# --------------------------------------------------------------------------- encode_request


def client_request() -> Request:
    return wire.inspect_request(raw_zip(
        [Raw(b"script/", method=0), Raw(b"script/tmp/", method=0),
         Raw(b"script/tmp/x/", method=0), Raw(b"tapset/", method=0),
         Raw(b"tapset/empty/", method=0)] + base_entries() + [Raw(b"sysinfo", V)]), LIMIT)


def test_encode_request_round_trips_and_is_deterministic() -> None:
    request = client_request()
    data = wire.encode_request(request)
    assert wire.inspect_request(data, LIMIT) == request
    assert wire.encode_request(request) == data
    assert wire.encode_request(dataclasses.replace(request, files=request.files[::-1],
                                                   dirs=request.dirs[::-1])) == data


def test_encode_request_writes_the_fixed_layout() -> None:
    request = client_request()
    data = wire.encode_request(request)
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = archive.infolist()
    assert [i.filename for i in infos] == sorted([*request.dirs, *dict(request.files)])
    assert archive.comment == b""
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.extra == b"" and info.comment == b"" and info.create_system == 3
        assert info.flag_bits == 0
        if info.is_dir():
            assert info.compress_type == zipfile.ZIP_STORED and info.file_size == 0
            assert info.external_attr == (stat.S_IFDIR | 0o755) << 16 | 0x10
        else:
            assert info.compress_type == zipfile.ZIP_DEFLATED
            assert info.external_attr == (stat.S_IFREG | 0o644) << 16
    assert dict(request.files) == {n: archive.read(n) for n in archive.namelist()
                                   if not n.endswith("/")}


def test_encode_request_forwards_what_was_keyed_not_the_clients_bytes() -> None:
    """The fix: whatever a client sends, the forwarded zip is a function of the key's input."""
    for data in (request_with(), request_with(Raw(b"tapset/x", b"x", local_extra=struct.pack(
            "<2HBL", 0x5455, 5, 3, 1)))):
        request = wire.inspect_request(data, LIMIT)
        forwarded = wire.encode_request(request)
        assert forwarded != data
        again = wire.inspect_request(forwarded, LIMIT)
        assert wire.cache_key(again, "id") == wire.cache_key(request, "id")


@pytest.mark.parametrize("dirs, files, problem", [
    (("a",), (), "must end with '/'"),
    ((), (("a/", b""),), "must not end with '/'"),
    ((), (("../a", b""),), "unsafe"),
    ((), (("/a", b""),), "unsafe"),
    ((), (("a", b""), ("a", b"x")), "more than once"),
    (("a/",), (("a/",  b""),), "must not end with '/'"),
    ((), (("a", b""), ("a/b", b"")), "both a file and a directory"),
])
def test_encode_refuses_what_the_reader_would_refuse(
        dirs: tuple[str, ...], files: tuple[tuple[str, bytes], ...], problem: str) -> None:
    request = Request(version="5.1", release="r", arch="x86_64", argv=(), files=files,
                      dirs=dirs)
    with pytest.raises(ValueError, match=problem):
        wire.encode_request(request)
    with pytest.raises(ValueError, match=problem):
        wire.encode_response(Response(dirs=dirs, files=files))


# --------------------------------------------------------------------------- cache key


def test_cache_key_covers_the_directory_entries() -> None:
    request = client_request()
    key = wire.cache_key(request, "id")
    assert wire.cache_key(dataclasses.replace(request, dirs=()), "id") != key
    fewer = dataclasses.replace(request, dirs=request.dirs[1:])
    assert wire.cache_key(fewer, "id") != key
    reordered = dataclasses.replace(request, dirs=request.dirs[::-1],
                                    files=request.files[::-1])
    assert wire.cache_key(reordered, "id") == key


def test_cache_key_sections_are_framed() -> None:
    """A name moved from the directories to the files (or the tag changed) changes the key."""
    def key(dirs: tuple[str, ...], files: tuple[tuple[str, bytes], ...]) -> str:
        return wire.cache_key(Request(version="5.1", release="r", arch="a", argv=(),
                                      files=files, dirs=dirs), "id")

    assert key(("a/",), ()) != key((), (("a/", b""),))
    assert key(("a/", "b/"), ()) != key(("a/",), (("b/", b""),))
    assert len({key((), ()), key(("",), ()), key((), (("", b""),))}) == 3


def test_cache_key_is_version_2() -> None:
    assert wire._KEY_TAG == b"stapfarm-wire-cache-key-v2\0"


# --------------------------------------------------------------------------- responses


SERVER: dict[str, bytes] = {
    "version": b"5.6",
    "rc": b"0",
    "stdout": b"stap_0123.ko\n",
    "stderr": b"",
    "stap000000/stap_0123.ko": b"\x7fELF module" * 100,
    "stap000000/stap_0123.ko.sgn": b"backend signature",
    "stap000000/stap_0123.c": b"/* generated */",
    "stap000000/uprobes/uprobes.ko": b"\x7fELF uprobes",
    "stap000000/uprobes/uprobes.ko.sgn": b"backend uprobes signature",
    "stap000000/lonely.ko.sgn": b"no module for this one",
}
SERVER_DIRS = ("stap000000/", "stap000000/uprobes/")


def server_zip(files: dict[str, bytes] = SERVER) -> bytes:
    entries = [Raw(d.encode(), method=0) for d in SERVER_DIRS]
    return raw_zip(entries + [Raw(n.encode(), c) for n, c in files.items()])


def test_inspect_response_reads_every_entry() -> None:
    response = wire.inspect_response(server_zip(), LIMIT)
    assert response.dirs == SERVER_DIRS
    assert response.files == tuple(sorted(SERVER.items()))
    assert response.rc == 0


def test_response_rc_property() -> None:
    assert Response(files=(("rc", b" -3\n"),)).rc == -3
    assert Response(files=(("rc", b"x"),)).rc is None
    assert Response(files=(("rc", b"1" * 100),)).rc is None
    assert Response(dirs=("rc/",)).rc is None and Response().rc is None


def test_encode_response_round_trips_and_keeps_everything() -> None:
    response = wire.inspect_response(server_zip(), LIMIT)
    data = wire.encode_response(response)
    assert wire.inspect_response(data, LIMIT) == response
    assert wire.encode_response(wire.inspect_response(data, LIMIT)) == data
    assert wire.response_rc(data) == 0


def test_inspect_response_refuses_with_response_error() -> None:
    assert not issubclass(ResponseError, RequestError)
    assert not issubclass(RequestError, ResponseError)
    cases: list[tuple[bytes, str]] = [
        (b"", "response is not a zip archive"),
        (b"garbage", "response is not a zip archive"),
        (server_zip({**SERVER, "rc": b"1", "../evil": b"x"}), "response entry '../evil' is unsafe"),
        (raw_zip([Raw(b"rc", b"0", data=deflate(b"0" + b"1"))]),
         "response entry 'rc' is corrupt (its deflate data inflates to more than"),
        (raw_zip([Raw(b"rc", b"0", central_extra=unicode_path(b"rc", b"stdout"))]),
         "response entry 'rc' has an Info-ZIP Unicode Path extra field"),
        (raw_zip([Raw(b"rc", b"0", method=14, data=b"0")]),
         "response entry 'rc' uses compression method 14"),
    ]
    for data, start in cases:
        with pytest.raises(ResponseError) as e:
            wire.inspect_response(data, LIMIT)
        assert str(e.value).startswith(start) and "\n" not in str(e.value)
        assert wire.response_rc(data) is None


def test_inspect_response_size_bound() -> None:
    data = server_zip()
    total = sum(len(c) for c in SERVER.values())
    assert wire.inspect_response(data, total).rc == 0
    with pytest.raises(ResponseError) as e:
        wire.inspect_response(data, total - 1)
    assert str(e.value) == (f"response of {total} bytes uncompressed exceeds this farm's "
                            f"limit of {total - 1} bytes")
    assert wire.inspect_response(raw_zip([]), 0) == Response()


def test_response_rc_reads_rc_strictly() -> None:
    """An rc that unzip would read differently is no rc at all."""
    differential = raw_zip([Raw(b"rc", b"0", data=deflate(b"0" + b"1" + forge_crc(
        b"01", zlib.crc32(b"0"))))])
    assert zipfile.ZipFile(io.BytesIO(differential)).read("rc") == b"0"
    assert wire.response_rc(differential) is None
    renamed = raw_zip([Raw(b"rc", b"0", central_extra=unicode_path(b"rc", b"rc2")),
                       Raw(b"rc2", b"1")])
    assert wire.response_rc(renamed) is None
    assert wire.response_rc(raw_zip([Raw(b"rc", b"0"), Raw(b"x", b"1", method=12)])) is None


def test_replace_signatures() -> None:
    response = wire.inspect_response(server_zip(), LIMIT)
    signed: list[bytes] = []

    def sign(module: bytes) -> bytes:
        signed.append(module)
        return b"farm signature " + hashlib.sha256(module).digest()

    replaced = wire.replace_signatures(response, sign)
    files = dict(replaced.files)
    for module in ("stap000000/stap_0123.ko", "stap000000/uprobes/uprobes.ko"):
        assert files[module + ".sgn"] == b"farm signature " + hashlib.sha256(
            SERVER[module]).digest()
    assert sorted(signed) == sorted([SERVER["stap000000/stap_0123.ko"],
                                     SERVER["stap000000/uprobes/uprobes.ko"]])
    unchanged = {n: c for n, c in SERVER.items() if not n.endswith(".ko.sgn")}
    assert {n: files[n] for n in unchanged} == unchanged
    assert "stap000000/lonely.ko.sgn" not in files  # no module of its own: dropped
    assert [n for n, _ in replaced.files] == [n for n, _ in response.files
                                              if n != "stap000000/lonely.ko.sgn"]
    assert replaced.dirs == response.dirs and replaced.rc == 0
    assert response.files == tuple(sorted(SERVER.items()))  # the original is untouched
    assert wire.replace_signatures(Response(files=(("a.ko", b"m"),)), sign) == Response(
        files=(("a.ko", b"m"),))
    # A signature without its module is the backend's own: it never reaches a client.
    stray = Response(files=(("a.ko", b"m"), ("b.ko.sgn", b"backend signature")))
    assert wire.replace_signatures(stray, sign) == Response(files=(("a.ko", b"m"),))


def test_error_response_is_what_the_strict_reader_reads() -> None:
    data = wire.error_response("no kernel", "5.6")
    response = wire.inspect_response(data, LIMIT)
    assert response.dirs == (wire.RESPONSE_TMPDIR,) and response.rc == 1
    assert dict(response.files)["stderr"] == b"Server: no kernel\n"
    assert wire.encode_response(response) == data


# --------------------------------------------------------------------------- properties


SEGMENT = st.text(alphabet="abcxyz019_-.+\u00e9\u00fc\u6f22", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))
PATH = st.lists(SEGMENT, min_size=1, max_size=4).map("/".join)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[str, ...], dict[str, bytes]]:
    """(dirs, files) with no name both a file and a directory, plus version and sysinfo."""
    files: dict[str, bytes] = {"version": b"5.1", "sysinfo": V}
    for path in draw(st.lists(PATH, max_size=12)):
        name = "t/" + path
        if all(not other.startswith(name + "/") and not name.startswith(other + "/")
               for other in files):
            files[name] = draw(st.binary(max_size=300))
    dirs: set[str] = set()
    for path in draw(st.lists(PATH, max_size=6)):
        name = "d/" + path + "/"
        if all(not name.startswith(f + "/") and f != name[:-1] for f in files):
            dirs.add(name)
    for name in list(files):  # some parents, as zip -r would write them
        parts = name.split("/")[:-1]
        listed: bool = draw(st.booleans())
        if parts and listed:
            dirs.update("/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    return tuple(sorted(dirs)), files


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_property_encode_then_inspect_round_trips(
        layout: tuple[tuple[str, ...], dict[str, bytes]]) -> None:
    dirs, files = layout
    made = Request(version="", release="", arch="", argv=(), files=tuple(sorted(files.items())),
                   dirs=dirs)
    data = wire.encode_request(made)
    request = wire.inspect_request(data, LIMIT)
    assert request.files == made.files and request.dirs == made.dirs
    assert (request.version, request.release, request.arch) == ("5.1", "6.12.48+tst13-amd64",
                                                                "x86_64")
    assert wire.encode_request(request) == data
    assert wire.inspect_request(wire.encode_request(request), LIMIT) == request
    response = Response(dirs=dirs, files=made.files)
    assert wire.inspect_response(wire.encode_response(response), LIMIT) == response


VALID = wire.encode_request(client_request())
VALID_RAW = request_with(Raw(b"tapset/x", b"stored", method=0), Raw(b"tapset/d/", method=0))


def check_mutant(data: bytes, reader: Callable[[bytes, int], object]) -> None:
    try:
        result = reader(data, LIMIT)
    except (RequestError, ResponseError) as e:
        assert str(e) and "\n" not in str(e)
        return
    if isinstance(result, Request):
        assert wire.inspect_request(wire.encode_request(result), LIMIT) == result
    else:
        assert isinstance(result, Response)
        assert wire.inspect_response(wire.encode_response(result), LIMIT) == result


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([VALID, VALID_RAW]), st.data())
def test_property_single_byte_mutations_are_refused_or_round_trip(
        original: bytes, data: st.DataObject) -> None:
    where = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255))
    mutant = bytearray(original)
    mutant[where] = value
    check_mutant(bytes(mutant), wire.inspect_request)
    check_mutant(bytes(mutant), wire.inspect_response)
    rc = wire.response_rc(bytes(mutant))
    assert rc is None or isinstance(rc, int)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([VALID, VALID_RAW]),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 64))
def test_property_several_mutations_and_cuts_are_refused_or_round_trip(
        original: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    mutant = bytearray(original)
    for where, value in flips:
        mutant[where % len(mutant)] = value
    if cut:
        mutant = mutant[:-cut]
    check_mutant(bytes(mutant), wire.inspect_request)
    check_mutant(bytes(mutant), wire.inspect_response)
