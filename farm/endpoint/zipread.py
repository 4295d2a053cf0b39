"""The strict zip reader: a whole archive, its contents read within a budget.

Pure (no I/O, never extracts to disk). `read_archive` takes the entries the headers describe
(farm/endpoint/zipheaders.py) and reads their data, never decompressing more than the limit
whatever the headers say (they may lie), and refusing entry data that does not end exactly
where its headers say: a stored entry must be its declared size, a deflate stream must end
at the declared size and CRC, within the declared compressed size. Every refusal is one line,
raised as the error class of the `Kind` being read.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from farm.endpoint.zipheaders import STORED, Entry, Kind, bad_entry, entries
from farm.endpoint.zipnames import SHOW_MAX


def read_archive(data: bytes, limit: int,
                 kind: Kind) -> tuple[tuple[str, ...], dict[str, bytes]]:
    """(sorted directory names, {file name: content}) of a zip the strict reader accepts.

    Raises:
        kind.error: refused; one line.
    """
    if not data:
        raise kind.error(f"{kind.what} is not a zip archive")
    found = entries(data, kind)
    _check_total(sum(entry.file_size for entry in found), limit, kind)
    contents = read_contents(data, found, limit, kind)
    dirs = tuple(sorted(e.name for e in found if e.is_dir))
    files = {e.name: contents[e.name] for e in found if not e.is_dir}
    return dirs, files


def _check_total(total: int, limit: int, kind: Kind) -> None:
    """The sum of the declared sizes, as upstream's `unzip -Zt` check (§2.5 step 4).

    Raises:
        kind.error: total outside kind.min_total..limit.
    """
    if total < kind.min_total:
        raise kind.error(f"{kind.what} is empty (0 bytes uncompressed)")
    if total > limit:
        raise kind.error(f"{kind.what} of {total} bytes uncompressed exceeds this farm's "
                         f"limit of {limit} bytes{kind.size_hint}")


def read_contents(data: bytes, found: Sequence[Entry], limit: int,
                  kind: Kind) -> dict[str, bytes]:
    """The content of every entry found (directories: b""), decompressing at most limit + 1 bytes
    in all whatever the headers say.

    Raises:
        kind.error: the actual total exceeds limit, or some entry's data is not exactly what
            its headers declare.
    """
    view = memoryview(data)
    contents: dict[str, bytes] = {}
    budget = limit
    for entry in found:
        content = _read_entry(view, entry, budget, kind)
        budget -= len(content)
        if budget < 0:
            raise kind.error(f"{kind.what} of more than {limit} bytes uncompressed exceeds "
                             f"this farm's limit of {limit} bytes{kind.size_hint}")
        contents[entry.name] = content
    return contents


def _read_entry(view: memoryview, entry: Entry, budget: int, kind: Kind) -> bytes:
    """An entry's content, checked to be exactly what its headers declare; or its first
    budget + 1 bytes when it is longer than budget (the caller refuses it).

    Raises:
        kind.error: the data is corrupt, longer or shorter than declared, does not end
            where the compressed size says, or has another CRC.
    """
    compressed = view[entry.data_start:entry.data_start + entry.compress_size]
    name = entry.name
    if entry.method == STORED:
        if entry.compress_size != entry.file_size:
            raise bad_entry(kind, name, f"is corrupt (stored as {entry.compress_size} bytes "
                                        f"but declared as {entry.file_size} bytes)")
        if entry.file_size > budget:
            return bytes(compressed[:budget + 1])
        content = bytes(compressed)
    else:
        cap = min(entry.file_size, budget)
        try:
            content, ended, left = _inflate(compressed, cap)
        except zlib.error as e:
            detail = " ".join(str(e).split())[:SHOW_MAX]
            raise bad_entry(kind, name, f"is corrupt (bad deflate data: {detail})") from e
        if len(content) > cap:
            if cap < entry.file_size:
                return content
            raise bad_entry(kind, name, "is corrupt (its deflate data inflates to more than "
                                        f"its declared {entry.file_size} bytes)")
        if not ended:
            raise bad_entry(kind, name, "is corrupt (its deflate data does not end within "
                                        f"its {entry.compress_size} compressed bytes)")
        if left:
            raise bad_entry(kind, name, f"is corrupt ({left} bytes follow the end of its "
                                        "deflate data)")
        if len(content) != entry.file_size:
            raise bad_entry(kind, name, f"is corrupt (its deflate data inflates to "
                                        f"{len(content)} of its declared {entry.file_size} "
                                        "bytes)")
    crc = zlib.crc32(content)
    if crc != entry.crc:
        raise bad_entry(kind, name, f"is corrupt (CRC-32 0x{crc:08x}, declared "
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
