"""The zip writer: the same bytes for the same entries, readable by the strict reader.

Pure (in memory). The endpoint never forwards or sends bytes it was given: it writes every
request and response afresh with `encode` from the entries it checked
(farm/endpoint/wire.py), so what was checked is exactly what is sent. Names are held to the
reader's rules (farm/endpoint/zipnames.py), so whatever `encode` writes the reader accepts.
"""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Iterable, Sequence

from farm.endpoint.zipnames import UNIX, file_dir_clash, unsafe_name

_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # every entry encode writes
_FILE_ATTR = (stat.S_IFREG | 0o644) << 16
_DIR_ATTR = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: MS-DOS directory


def encode(dirs: Iterable[str], files: Iterable[tuple[str, bytes]]) -> bytes:
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
            info.create_system = UNIX
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
        ValueError: see `encode`.
    """
    names: set[str] = set()
    for name, content in entries:
        problem = unsafe_name(name)
        if problem:
            raise ValueError(f"entry {name!r} is unsafe ({problem})")
        if name.endswith("/") != (content is None):
            kind = "directory" if content is None else "file"
            raise ValueError(f"{kind} entry {name!r} must {'' if content is None else 'not '}"
                             "end with '/'")
        if name in names:
            raise ValueError(f"entry {name!r} appears more than once")
        names.add(name)
    clash = file_dir_clash(names)
    if clash is not None:
        raise ValueError(f"entry {clash!r} is both a file and a directory")
