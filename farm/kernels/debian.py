"""Read a Debian mirror: verified InRelease files, Packages indexes, and .deb members by stream.

Control data is parsed with python-debian (`debian.deb822`) and versions are ordered by its
`Version` (dpkg's algorithm). An InRelease is trusted only as gpgv outputs it: the file must be
exactly one clearsigned message, gpgv must find a good signature from the archive keyring, and
only the text gpgv verified and wrote out (`--output`) is parsed, so nothing outside the
signature can reach the checksums. Its `Valid-Until` is honoured unless APT_ALLOW_EXPIRED=yes.
Parsed Packages indexes are cached in CACHE_DIR as `Packages-<sha256 of the .xz>.json`.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import lzma
import os
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass
from datetime import UTC
from pathlib import Path
from typing import IO

from debian.deb822 import Packages, PkgRelation, Release
from debian.debian_support import version_compare

from farm.core.errors import MirrorError
from farm.core.spec import GlobalConfig
from farm.kernels import mirror as host_mirror

# debian-archive-keyring: `.pgp` since trixie, `.gpg` before (and as a link on trixie).
KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.pgp",
            "/usr/share/keyrings/debian-archive-keyring.gpg")
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_CACHE_FORMAT = 1
_WEEK = 7 * 86400


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
    """A Debian mirror, its indexes checked against a gpgv-verified InRelease and cached."""

    def __init__(self, url: str, cache_dir: Path, *, allow_expired: bool = False,
                 keyrings: Sequence[str] = KEYRINGS) -> None:
        self.url = url.rstrip("/")
        self.cache_dir = cache_dir
        self.allow_expired = allow_expired
        self.keyrings = tuple(keyrings)
        self._parsed: dict[tuple[str, str], list[Package]] = {}

    @classmethod
    def from_config(cls, gcfg: GlobalConfig, cache_dir: Path) -> Mirror:
        """The farm's mirror: DEBIAN_MIRROR as configuration resolved it, APT_ALLOW_EXPIRED."""
        return cls(gcfg.debian_mirror, cache_dir, allow_expired=gcfg.apt_allow_expired)

    def _base(self) -> str:
        if not self.url:
            raise MirrorError("no Debian mirror: DEBIAN_MIRROR is not set and the host's apt "
                              "sources name none", hint=host_mirror.HINT)
        return self.url

    def _keyrings(self, what: str) -> list[str]:
        found = [k for k in self.keyrings if os.path.isfile(k)]
        if not found:
            raise MirrorError(
                f"no keyring to verify {what}: looked at {', '.join(self.keyrings) or 'none'}",
                hint="install debian-archive-keyring (apt-get install debian-archive-keyring),"
                     " or put the mirror's keyring at one of those paths")
        return found

    def _release(self, suite: str) -> dict[str, tuple[str, int]]:
        """Path → (sha256, size) from the suite's InRelease, as gpgv verified it.

        Raises:
            MirrorError: unreadable, unsigned, badly signed, for another suite, or expired.
        """
        what = f"{self._base()}/dists/{suite}/InRelease"
        data = _fetch(what)
        release = Release(verified_text(data, self._keyrings(what), what).splitlines())
        names = {release.get("Suite", ""), release.get("Codename", "")}
        if suite not in names:
            raise MirrorError(f"{what} is signed for {release.get('Codename', '?')} "
                              f"({release.get('Suite', '?')}), not {suite}",
                              hint="the mirror serves the wrong file; use another DEBIAN_MIRROR")
        if not self.allow_expired:
            check_valid_until(release.get("Valid-Until", ""), what, time.time())
        entries = {e["name"]: (e["sha256"], int(e["size"])) for e in release.get("SHA256", [])}
        if not entries:
            raise MirrorError(f"{what} lists no SHA256 entries")
        return entries

    def packages(self, suite: str, debarch: str, component: str = "main") -> list[Package]:
        """Every package of SUITE/COMPONENT for DEBARCH (arch:all included, as indexed).

        Raises:
            MirrorError: the mirror cannot be read or verified, or lacks the index.
        """
        path = f"{component}/binary-{debarch}/Packages.xz"
        release = self._release(suite)
        if path not in release:
            raise MirrorError(f"{suite} on {self.url} has no {path}",
                              hint=f"is '{suite}' a suite that carries {debarch}?")
        digest, _size = release[path]
        if (digest, suite) not in self._parsed:
            self._parsed[(digest, suite)] = self._load_index(suite, path, digest)
        return list(self._parsed[(digest, suite)])

    def _load_index(self, suite: str, path: str, digest: str) -> list[Package]:
        cached = self.cache_dir / f"Packages-{digest}.json"
        try:
            doc = json.loads(cached.read_text("utf-8"))
            if doc["format"] == _CACHE_FORMAT:
                with contextlib.suppress(OSError):
                    os.utime(cached)  # in use: not a week-old leftover
                return [Package(name, version, arch, filename, int(size), sha256, depends, suite)
                        for name, version, arch, filename, size, sha256, depends
                        in doc["packages"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or from another version: fetch and parse again
        url = f"{self.url}/dists/{suite}/{path}"
        raw = _fetch(url, timeout=300)
        if hashlib.sha256(raw).hexdigest() != digest:
            raise MirrorError(f"{url} does not match its InRelease checksum "
                              "(mirror in the middle of an update?)")
        try:
            text = lzma.decompress(raw).decode("utf-8")
        except (lzma.LZMAError, UnicodeDecodeError) as e:
            raise MirrorError(f"{url} is not an xz-compressed UTF-8 index: {e}") from e
        pkgs = list(parse_packages(text, suite))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for old in self.cache_dir.glob("Packages-*"):
            try:
                if old.stat().st_mtime < time.time() - _WEEK:
                    old.unlink()
            except OSError:
                continue  # another farm process removed it first
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _CACHE_FORMAT,
                                   "packages": [astuple(p)[:7] for p in pkgs]}), "utf-8")
        tmp.replace(cached)
        return pkgs

    def open_deb(self, pkg: Package) -> IO[bytes]:
        """A streaming response for PKG's .deb."""
        url = f"{self._base()}/{pkg.filename}"
        try:
            return urllib.request.urlopen(url, timeout=120)  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError) as e:
            raise MirrorError(f"cannot download {url}: {e}") from e


# --------------------------------------------------------------------------- InRelease

_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_SIG_BEGIN = b"-----BEGIN PGP SIGNATURE-----"
_SIG_END = b"-----END PGP SIGNATURE-----"
_BAD_STATUS = {"BADSIG": "a bad signature", "EXPSIG": "an expired signature",
               "EXPKEYSIG": "a signature by an expired key",
               "REVKEYSIG": "a signature by a revoked key"}


def check_clearsigned(data: bytes, what: str) -> None:
    """Refuse DATA unless it is exactly one clearsigned message with nothing around it.

    Raises:
        MirrorError: no clearsigned message, several, or text before or after it.
    """
    lines = [line.rstrip() for line in data.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if not lines or lines.count(_BEGIN) == 0:
        raise MirrorError(f"{what} is not a clearsigned file",
                          hint="the mirror serves something else; use another DEBIAN_MIRROR")
    if (lines[0] != _BEGIN or lines[-1] != _SIG_END or lines.count(_BEGIN) != 1
            or lines.count(_SIG_BEGIN) != 1 or lines.count(_SIG_END) != 1):
        raise MirrorError(f"{what} has text outside its one signed message; refusing it",
                          hint="a proxy or mirror altered it; use another DEBIAN_MIRROR")


def signature_problem(status: str) -> str:
    """Why gpgv's STATUS (`--status-fd` lines) is not a good signature, "" when it is.

    As apt: at least one valid signature, none bad; a signature by a key the keyring lacks
    (ERRSIG with NO_PUBKEY) is ignored.
    """
    valid = False
    errors: set[str] = set()
    unknown: set[str] = set()
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        word, *args = line[len("[GNUPG:] "):].split()
        if word in _BAD_STATUS:
            return _BAD_STATUS[word]
        if word == "VALIDSIG":
            valid = True
        elif word == "ERRSIG":
            errors.add(args[0] if args else "")
        elif word == "NO_PUBKEY":
            unknown.add(args[0] if args else "")
    if errors - unknown:
        return "a signature that gpgv cannot check"
    return "" if valid else "no signature by a key of the keyring"


def verified_text(data: bytes, keyrings: Sequence[str], what: str) -> str:
    """The text of clearsigned DATA exactly as gpgv verified it against KEYRINGS.

    Raises:
        MirrorError: DATA is not one clearsigned message, gpgv is missing, or the signature
            does not verify.
    """
    check_clearsigned(data, what)
    with tempfile.TemporaryDirectory(prefix="stapfarm-gpgv-") as tmp:
        signed, out = Path(tmp, "InRelease"), Path(tmp, "verified")
        signed.write_bytes(data)
        cmd = ["gpgv", "--status-fd", "1", "--output", str(out)]
        for keyring in keyrings:
            cmd += ["--keyring", os.path.abspath(keyring)]
        try:
            # GNUPGHOME is empty: no trustedkeys of the invoking user take part.
            proc = subprocess.run(cmd + [str(signed)], capture_output=True, text=True,
                                  check=False, env=dict(os.environ, GNUPGHOME=tmp, LC_ALL="C"))
        except FileNotFoundError as e:
            raise MirrorError(f"gpgv is missing, so {what} cannot be verified",
                              hint="install it: apt-get install gpgv") from e
        problem = signature_problem(proc.stdout)
        if problem or not out.exists():
            raise MirrorError(f"the signature of {what} does not verify against "
                              f"{', '.join(keyrings)}: {problem or 'gpgv wrote nothing'}",
                              hint="update debian-archive-keyring or use another DEBIAN_MIRROR")
        try:
            return out.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise MirrorError(f"{what} is not UTF-8 text") from e


def check_valid_until(valid_until: str, what: str, now: float) -> None:
    """Refuse a Release whose VALID_UNTIL ("" for none) is before NOW (epoch seconds).

    Raises:
        MirrorError: expired, or a Valid-Until that is no date.
    """
    if not valid_until:
        return
    try:
        until = email.utils.parsedate_to_datetime(valid_until)
    except (TypeError, ValueError) as e:
        raise MirrorError(f"{what} has an unreadable Valid-Until '{valid_until}'") from e
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    if until.timestamp() < now:
        raise MirrorError(
            f"{what} expired on {valid_until} (Valid-Until); its indexes may be stale",
            hint="use an up-to-date DEBIAN_MIRROR, or set APT_ALLOW_EXPIRED=yes in "
                 "/etc/sysconfig/stap-server for a mirror snapshot")


# --------------------------------------------------------------------------- Packages

_FIELDS = ["Package", "Version", "Architecture", "Filename", "Size", "SHA256", "Depends"]


def parse_packages(text: str, suite: str) -> Iterator[Package]:
    """The stanzas of Packages index TEXT that name a package and its file."""
    for para in Packages.iter_paragraphs(text.splitlines(), fields=_FIELDS, use_apt_pkg=False):
        name, filename = para.get("Package", ""), para.get("Filename", "")
        if not name or not filename:
            continue
        size = para.get("Size", "").strip()
        yield Package(name=name, version=para.get("Version", ""),
                      architecture=para.get("Architecture", ""), filename=filename,
                      size=int(size) if size.isdigit() else 0, sha256=para.get("SHA256", ""),
                      depends=para.get("Depends", ""), suite=suite)


def depends_names(depends: str) -> list[str]:
    """Package names of a Depends field (first alternative of each clause)."""
    clauses = ",".join(c for c in depends.split(",") if c.strip())  # no empty-clause warnings
    if not clauses:
        return []
    return [alts[0]["name"] for alts in PkgRelation.parse_relations(clauses) if alts]


def compare_versions(a: str, b: str) -> int:
    """Compare Debian versions as `dpkg --compare-versions` does (<0, 0, >0).

    Raises:
        ValueError: A or B is not a Debian version.
    """
    return version_compare(a, b)


# --------------------------------------------------------------------------- .deb streams
#
# python-debian's debfile/arfile read a .deb by seeking from member to member, so they need
# the whole file on disk; a linux-image-*-dbg package is about a gigabyte. The ar format is
# a fixed 60-byte header per member, so a forward-only reader streams the HTTP response
# straight into tarfile's stream mode instead.


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

