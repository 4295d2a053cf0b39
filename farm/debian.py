"""Read a Debian mirror: verified Release files, Packages indexes, and .deb members by stream."""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from farm.errors import MirrorError

KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.gpg",)
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Package:
    """One stanza of a Packages index (the fields the farm uses)."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: str
    suite: str


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: bytes = resp.read()
            return data
    except (urllib.error.URLError, OSError) as e:
        raise MirrorError(f"cannot fetch {url}: {e}",
                          hint="check DEBIAN_MIRROR in the global configuration") from e


class Mirror:
    """A Debian mirror, its indexes cached on disk by content hash."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        self.url = url.rstrip("/")
        self.cache_dir = cache_dir

    def _release(self, suite: str) -> dict[str, tuple[str, int]]:
        """Path → (sha256, size) from the suite's InRelease, signature checked with gpgv."""
        data = _fetch(f"{self.url}/dists/{suite}/InRelease")
        keyring = next((k for k in KEYRINGS if os.path.exists(k)), None)
        if keyring and shutil.which("gpgv"):
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                proc = subprocess.run(["gpgv", "--keyring", keyring, f.name], check=False,
                                      capture_output=True, text=True)
            if proc.returncode != 0:
                raise MirrorError(
                    f"the signature of {self.url}/dists/{suite}/InRelease does not verify "
                    f"against {keyring}",
                    hint="update debian-archive-keyring or use another DEBIAN_MIRROR")
        text = data.decode("utf-8", "replace")
        entries: dict[str, tuple[str, int]] = {}
        in_sha = False
        for line in text.splitlines():
            if line.startswith("SHA256:"):
                in_sha = True
                continue
            if in_sha:
                if not line.startswith(" "):
                    in_sha = False
                    continue
                digest, size, path = line.split()
                entries[path] = (digest, int(size))
        if not entries:
            raise MirrorError(f"{self.url}/dists/{suite}/InRelease lists no SHA256 entries")
        return entries

    def packages(self, suite: str, debarch: str, component: str = "main") -> list[Package]:
        """Every package of SUITE/COMPONENT for DEBARCH (arch:all included, as indexed)."""
        path = f"{component}/binary-{debarch}/Packages.xz"
        release = self._release(suite)
        if path not in release:
            raise MirrorError(f"{suite} on {self.url} has no {path}",
                              hint=f"is '{suite}' a suite that carries {debarch}?")
        digest, _size = release[path]
        cached = self.cache_dir / f"Packages-{digest}"
        if not cached.exists():
            raw = _fetch(f"{self.url}/dists/{suite}/{path}", timeout=300)
            if hashlib.sha256(raw).hexdigest() != digest:
                raise MirrorError(f"{self.url}/dists/{suite}/{path} does not match its "
                                  "InRelease checksum (mirror in the middle of an update?)")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for old in self.cache_dir.glob("Packages-*"):
                if old.stat().st_mtime < _week_ago():
                    old.unlink(missing_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_bytes(lzma.decompress(raw))
            tmp.replace(cached)
        return list(parse_packages(cached.read_text("utf-8", "replace"), suite))

    def open_deb(self, pkg: Package) -> IO[bytes]:
        """A streaming response for PKG's .deb."""
        url = f"{self.url}/{pkg.filename}"
        try:
            return urllib.request.urlopen(url, timeout=120)  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError) as e:
            raise MirrorError(f"cannot download {url}: {e}") from e


def _week_ago() -> float:
    import time

    return time.time() - 7 * 86400


def parse_packages(text: str, suite: str) -> Iterator[Package]:
    """Parse a Packages index."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "Filename" not in fields:
            continue
        yield Package(name=fields["Package"], version=fields.get("Version", ""),
                      architecture=fields.get("Architecture", ""), filename=fields["Filename"],
                      size=int(fields.get("Size", "0") or 0), sha256=fields.get("SHA256", ""),
                      depends=fields.get("Depends", ""), suite=suite)


def depends_names(depends: str) -> list[str]:
    """Package names of a Depends field (first alternative of each clause)."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


class _HashingReader:
    """File-like wrapper that hashes and counts what is read, reporting progress."""

    def __init__(self, raw: IO[bytes], total: int, progress: Progress | None) -> None:
        self.raw, self.total, self.progress = raw, total, progress
        self.sha = hashlib.sha256()
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.done += len(data)
        if self.progress:
            self.progress(self.done, self.total)
        return data


def iter_data_members(raw: IO[bytes], pkg: Package,
                      progress: Progress | None = None) -> Iterator[tuple[tarfile.TarInfo,
                                                                         IO[bytes] | None]]:
    """Stream the data.tar members of PKG's .deb from RAW, then check its SHA256.

    Raises:
        MirrorError: not a .deb, or the download does not match the index's checksum.
    """
    reader = _HashingReader(raw, pkg.size, progress)
    if reader.read(8) != b"!<arch>\n":
        raise MirrorError(f"{pkg.filename} is not a Debian package")
    while True:
        header = reader.read(60)
        if len(header) < 60:
            raise MirrorError(f"{pkg.filename} has no data.tar member")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            break
        reader.read(size + (size & 1))
    mode = {"data.tar.xz": "r|xz", "data.tar.gz": "r|gz", "data.tar": "r|",
            "data.tar.zst": ""}.get(name, "")
    if not mode:
        raise MirrorError(f"{pkg.filename}: unsupported member {name}")
    with tarfile.open(fileobj=_Limited(reader, size), mode=mode) as tar:  # type: ignore[call-overload]
        for info in tar:
            yield info, tar.extractfile(info) if info.isfile() else None
    while reader.read(1 << 20):
        pass
    if pkg.sha256 and reader.sha.hexdigest() != pkg.sha256:
        raise MirrorError(f"{pkg.filename} does not match its SHA256 in the index")


class _Limited:
    def __init__(self, raw: _HashingReader, size: int) -> None:
        self.raw, self.left = raw, size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.raw.read(n)
        self.left -= len(data)
        return data


_VERSION_PART = re.compile(r"(\d+|\D+)")


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    """dpkg's verrevcmp for an upstream version or revision."""
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        first_diff = 0
        while (ia < len(a) and not a[ia].isdigit()) or (ib < len(b) and not b[ib].isdigit()):
            ac = _order(a[ia]) if ia < len(a) and not a[ia].isdigit() else 0
            bc = _order(b[ib]) if ib < len(b) and not b[ib].isdigit() else 0
            if ac != bc:
                return ac - bc
            ia += 1
            ib += 1
        while ia < len(a) and a[ia] == "0":
            ia += 1
        while ib < len(b) and b[ib] == "0":
            ib += 1
        while ia < len(a) and a[ia].isdigit() and ib < len(b) and b[ib].isdigit():
            if not first_diff:
                first_diff = ord(a[ia]) - ord(b[ib])
            ia += 1
            ib += 1
        if ia < len(a) and a[ia].isdigit():
            return 1
        if ib < len(b) and b[ib].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def compare_versions(a: str, b: str) -> int:
    """Compare Debian versions as `dpkg --compare-versions` does (<0, 0, >0)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch = 0
        if ":" in v:
            e, v = v.split(":", 1)
            epoch = int(e) if e.isdigit() else 0
        upstream, _, rev = v.rpartition("-") if "-" in v else (v, "", "")
        return epoch, upstream, rev

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return ea - eb
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)
