"""The Debian mirror reader: dpkg's version order, Packages indexes, Depends, .deb streams,
and InRelease files verified by gpgv with a throwaway key."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.core.errors import MirrorError
from farm.core.spec import GlobalConfig
from farm.kernels import debian
from farm.kernels.debian import (
    Mirror,
    Package,
    compare_versions,
    depends_names,
    iter_data_members,
    parse_packages,
)


def sign(n: int) -> int:
    return (n > 0) - (n < 0)


# --------------------------------------------------------------------------- versions

# Each list is in strictly ascending dpkg order (Debian Policy 5.6.12 and dpkg's test suite).
ASCENDING = [
    ["1.0~~", "1.0~~a", "1.0~", "1.0", "1.0a"],  # the policy's tilde example
    ["9.9.1~rc1", "9.9.1", "9.9.1+test1", "9.9.1+test2", "9.9.2", "9.9.10"],
    ["1.0-1~bpo1", "1.0-1", "1.0-1+b1", "1.0-2", "1.0-9", "1.0-10"],
    ["1.0a", "1.0+", "1.0.", "1.0.1"],  # letters sort before non-letters
    ["2.0", "10.0", "1:0.1", "1:9.9", "2:0~0"],  # epochs outweigh everything
    ["1.0-rc-1", "1.0-rc-2", "1.0.1-rc-1"],  # upstream with hyphens: the last one splits
    ["0.9", "1.0~beta1", "1.0~beta2", "1.0~rc1", "1.0"],
]

EQUAL = [("1.0", "1.0"), ("0:1.0", "1.0"), ("1.01", "1.1"), ("1.0", "1.0-0"),
         ("9.9.1+test1-1", "9.9.1+test1-01"), ("1:2.3-4", "01:2.3-4")]


@pytest.mark.parametrize("chain", ASCENDING, ids=lambda c: " < ".join(c))
def test_ascending_orders(chain: list[str]) -> None:
    for i, a in enumerate(chain):
        for b in chain[i + 1:]:
            assert compare_versions(a, b) < 0, (a, b)
            assert compare_versions(b, a) > 0, (b, a)


@pytest.mark.parametrize("a, b", EQUAL)
def test_equal_versions(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0
    assert compare_versions(b, a) == 0


_part = st.text(alphabet="0123456789abz.+~", min_size=1, max_size=6)
_upstream = st.builds(lambda d, rest: d + rest, st.sampled_from("0123456789"),
                      st.text(alphabet="0123456789abz.+~", max_size=8))
_version = st.builds(
    lambda epoch, up, rev: (f"{epoch}:" if epoch is not None else "") + up
    + (f"-{rev}" if rev else ""),
    st.one_of(st.none(), st.integers(0, 3)), _upstream,
    st.one_of(st.none(), _part.filter(lambda s: s[0].isalnum())))


@given(_version, _version)
def test_antisymmetric(a: str, b: str) -> None:
    assert sign(compare_versions(a, b)) == -sign(compare_versions(b, a))
    assert compare_versions(a, a) == 0


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg to compare with")
@settings(max_examples=150, deadline=None)
@given(_version, _version)
def test_agrees_with_dpkg(a: str, b: str) -> None:
    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b],
                              capture_output=True, check=False).returncode == 0

    ours = sign(compare_versions(a, b))
    assert (ours < 0, ours == 0, ours > 0) == (dpkg("lt"), dpkg("eq"), dpkg("gt")), (a, b)


# --------------------------------------------------------------------------- Packages

INDEX = """\
Package: linux-headers-9.9.1+test1-amd64
Source: linux
Version: 9.9.1-1
Architecture: amd64
Depends: linux-headers-9.9.1+test1-common (= 9.9.1-1), linux-kbuild-9.9.1+test1 (= 9.9.1-1)
Description: Header files for Linux 9.9.1+test1-amd64
 This package provides the architecture-specific kernel header files
 Filename: not/a/field.deb
Filename: pool/main/l/linux/linux-headers-9.9.1+test1-amd64_9.9.1-1_amd64.deb
Size: 1234567
SHA256: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff

Package: linux-headers-9.9.1+test1-common
Version: 9.9.1-1
Architecture: all
Filename: pool/main/l/linux/linux-headers-9.9.1+test1-common_9.9.1-1_all.deb
Size: 42

Package: no-filename
Version: 1.0

Package: sizeless
Version: 1:2.0~rc1-3
Architecture: amd64
Filename: pool/main/s/sizeless_2.0~rc1-3_amd64.deb
Size:
"""


def test_parse_packages() -> None:
    pkgs = list(parse_packages(INDEX, "trixie"))
    assert [p.name for p in pkgs] == ["linux-headers-9.9.1+test1-amd64",
                                      "linux-headers-9.9.1+test1-common", "sizeless"]
    h = pkgs[0]
    assert h.version == "9.9.1-1" and h.architecture == "amd64" and h.suite == "trixie"
    assert h.filename == "pool/main/l/linux/linux-headers-9.9.1+test1-amd64_9.9.1-1_amd64.deb"
    assert h.size == 1234567
    assert h.sha256 == "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
    assert h.depends.startswith("linux-headers-9.9.1+test1-common (= 9.9.1-1)")
    assert pkgs[1].architecture == "all" and pkgs[1].depends == "" and pkgs[1].sha256 == ""
    assert pkgs[2].size == 0 and pkgs[2].version == "1:2.0~rc1-3"


def test_parse_packages_empty() -> None:
    assert list(parse_packages("", "trixie")) == []
    assert list(parse_packages("\n\n\n", "trixie")) == []


@pytest.mark.parametrize("depends, names", [
    ("", []),
    ("libc6 (>= 2.38)", ["libc6"]),
    ("linux-headers-9.9.1+test1-common (= 9.9.1-1), linux-kbuild-9.9.1+test1 (= 9.9.1-1)",
     ["linux-headers-9.9.1+test1-common", "linux-kbuild-9.9.1+test1"]),
    ("gcc-99 | gcc, make", ["gcc-99", "make"]),  # first alternative of each clause
    ("python3:any (>= 3.9~), libfoo1:amd64", ["python3", "libfoo1"]),
    ("foo [amd64],bar(<<2)", ["foo", "bar"]),
    (" a ,  , b ", ["a", "b"]),
])
def test_depends_names(depends: str, names: list[str]) -> None:
    assert depends_names(depends) == names


# --------------------------------------------------------------------------- .deb streams


def _ar_member(name: str, data: bytes) -> bytes:
    header = (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n").encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def _deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ext = {"xz": "xz", "gz": "gz"}[compression]
    return (b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
            + _ar_member("control.tar.xz", b"x" * 11)
            + _ar_member(f"data.tar.{ext}", buf.getvalue()))


def _pkg(deb: bytes, sha256: str | None = None) -> Package:
    return Package(name="demo", version="9.9.1-1", architecture="amd64",
                   filename="pool/main/d/demo.deb", size=len(deb),
                   sha256=hashlib.sha256(deb).hexdigest() if sha256 is None else sha256,
                   depends="", suite="trixie")


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_iter_data_members(compression: str) -> None:
    files = {"usr/src/a.txt": b"alpha", "usr/src/odd": b"odd length!"}
    deb = _deb(files, compression)
    seen: list[tuple[int, int]] = []
    got = {info.name: data.read() for info, data in
           iter_data_members(io.BytesIO(deb), _pkg(deb), lambda d, t: seen.append((d, t)))
           if data is not None}
    assert got == {f"./{k}": v for k, v in files.items()}
    assert seen and seen[-1] == (len(deb), len(deb))


def test_iter_data_members_checks_the_checksum() -> None:
    deb = _deb({"f": b"data"})
    with pytest.raises(MirrorError, match="does not match its SHA256"):
        for _ in iter_data_members(io.BytesIO(deb), _pkg(deb, sha256="0" * 64)):
            pass


def test_iter_data_members_refuses_what_is_no_deb() -> None:
    with pytest.raises(MirrorError, match="is not a Debian package"):
        list(iter_data_members(io.BytesIO(b"<html>oops</html>"), _pkg(b"")))
    with pytest.raises(MirrorError, match="has no data.tar"):
        list(iter_data_members(io.BytesIO(b"!<arch>\n"), _pkg(b"")))


# --------------------------------------------------------------------------- InRelease
#
# A throwaway archive key signs synthetic InRelease files for real, so gpgv genuinely verifies.


@dataclass(frozen=True)
class Signer:
    """A temporary GNUPGHOME with an archive key (in `keyring`) and a stranger's key."""

    home: str
    keyring: Path

    def clearsign(self, text: str, *users: str) -> bytes:
        args = [a for u in (users or ("archive",)) for a in ("-u", f"{u}@example.invalid")]
        return subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase",
                               "", *args, "--clearsign"], input=text.encode(), env=self.env,
                              capture_output=True, check=True).stdout

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, GNUPGHOME=self.home)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signer]:
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg and gpgv are needed to sign and verify test InRelease files")
    # gpg-agent's socket lives in GNUPGHOME and its path must stay short (about 100 bytes).
    home = tempfile.mkdtemp(prefix="gpg", dir="/tmp")
    keyring = tmp_path_factory.mktemp("keyring") / "archive.gpg"
    s = Signer(home, keyring)
    try:
        for who in ("archive", "stranger"):
            subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
                            "--quick-gen-key", f"stapfarm test {who} <{who}@example.invalid>",
                            "ed25519", "sign", "never"], env=s.env, capture_output=True,
                           check=True)
        keyring.write_bytes(subprocess.run(["gpg", "--batch", "--export",
                                            "archive@example.invalid"], env=s.env,
                                           capture_output=True, check=True).stdout)
        yield s
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=s.env, capture_output=True,
                       check=False)
        shutil.rmtree(home, ignore_errors=True)


PATH = "main/binary-amd64/Packages.xz"


def _release_text(entries: dict[str, bytes], *, suite: str = "trixie",
                  valid_until: str | None = None) -> str:
    lines = ["Origin: Test", "Suite: stable", f"Codename: {suite}",
             "Date: Sat, 21 Nov 2026 09:15:44 UTC"]
    if valid_until is not None:
        lines.append(f"Valid-Until: {valid_until}")
    lines.append("SHA256:")
    lines += [f" {hashlib.sha256(d).hexdigest()} {len(d)} {p}" for p, d in entries.items()]
    lines.append(f" {'1' * 64} 10 main/binary-arm64/Packages.xz")
    return "\n".join(lines) + "\nAcquire-By-Hash: yes\n"


def _mirror_tree(root: Path, signer: Signer, index: str = "", *, inrelease: bytes | None = None,
                 **release: str) -> bytes:
    """A file:// mirror serving INDEX as trixie's amd64 Packages.xz; returns the .xz bytes."""
    raw = lzma.compress(index.encode())
    dists = root / "dists" / "trixie"
    (dists / "main" / "binary-amd64").mkdir(parents=True, exist_ok=True)
    (dists / PATH).write_bytes(raw)
    if inrelease is None:
        inrelease = signer.clearsign(_release_text({PATH: raw}, **release))
    (dists / "InRelease").write_bytes(inrelease)
    return raw


def _mirror(tmp_path: Path, signer: Signer, **kw: bool) -> Mirror:
    return Mirror(f"file://{tmp_path / 'm'}", tmp_path / "cache",
                  keyrings=(str(signer.keyring),), **kw)


EVIL = INDEX.replace("linux-headers-9.9.1+test1-amd64", "linux-headers-6.6.6-evil-amd64")


def _appended(signed: bytes, evil: bytes) -> bytes:
    return signed + f"SHA256:\n {hashlib.sha256(evil).hexdigest()} {len(evil)} {PATH}\n".encode()


@pytest.mark.parametrize("where", ["appended", "prepended", "second message"])
def test_unsigned_text_around_a_signed_inrelease_is_refused(tmp_path: Path, signer: Signer,
                                                            where: str) -> None:
    good = lzma.compress(INDEX.encode())
    signed = signer.clearsign(_release_text({PATH: good}))
    evil = lzma.compress(EVIL.encode())
    evil_block = f"SHA256:\n {hashlib.sha256(evil).hexdigest()} {len(evil)} {PATH}\n".encode()
    inrelease = {"appended": signed + evil_block, "prepended": evil_block + b"\n" + signed,
                 "second message": signed + signer.clearsign(evil_block.decode())}[where]
    _mirror_tree(tmp_path / "m", signer, EVIL, inrelease=inrelease)
    with pytest.raises(MirrorError, match="text outside its one signed message"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")


def test_only_the_text_gpgv_verified_is_parsed(tmp_path: Path, signer: Signer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Even without the armor check, an appended SHA256 block never reaches the checksums."""
    monkeypatch.setattr(debian, "check_clearsigned", lambda data, what: None)
    good = lzma.compress(INDEX.encode())
    signed = signer.clearsign(_release_text({PATH: good}))
    evil = lzma.compress(EVIL.encode())
    text = debian.verified_text(_appended(signed, evil), [str(signer.keyring)], "InRelease")
    assert hashlib.sha256(good).hexdigest() in text
    assert hashlib.sha256(evil).hexdigest() not in text
    _mirror_tree(tmp_path / "m", signer, EVIL, inrelease=_appended(signed, evil))
    with pytest.raises(MirrorError, match="does not match its InRelease checksum"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")


def test_a_good_inrelease_is_accepted(tmp_path: Path, signer: Signer) -> None:
    _mirror_tree(tmp_path / "m", signer, INDEX, valid_until="Sat, 01 Jan 2500 00:00:00 UTC")
    mirror = Mirror(f"file://{tmp_path / 'm'}/", tmp_path / "cache",
                    keyrings=(str(signer.keyring),))
    assert mirror.url == f"file://{tmp_path / 'm'}"
    names = [p.name for p in mirror.packages("trixie", "amd64")]
    assert names == ["linux-headers-9.9.1+test1-amd64", "linux-headers-9.9.1+test1-common",
                     "sizeless"]
    assert len(list((tmp_path / "cache").glob("Packages-*"))) == 1
    # the parsed index is cached by digest: a new Mirror does not fetch it again
    (tmp_path / "m" / "dists" / "trixie" / PATH).unlink()
    again = _mirror(tmp_path, signer).packages("trixie", "amd64")
    assert [p.name for p in again] == names and again[0].suite == "trixie"
    assert again[0] == mirror.packages("trixie", "amd64")[0]


def test_a_missing_keyring_is_refused(tmp_path: Path, signer: Signer) -> None:
    _mirror_tree(tmp_path / "m", signer, INDEX)
    missing = (str(tmp_path / "no.pgp"), str(tmp_path / "no.gpg"))
    mirror = Mirror(f"file://{tmp_path / 'm'}", tmp_path / "cache", keyrings=missing)
    with pytest.raises(MirrorError) as info:
        mirror.packages("trixie", "amd64")
    message = str(info.value)
    assert "no keyring to verify" in message and "\n" not in message
    assert all(k in message for k in missing) and "debian-archive-keyring" in message


@pytest.mark.parametrize("users, ok", [(("archive",), True), (("archive", "stranger"), True),
                                       (("stranger",), False)])
def test_signers(tmp_path: Path, signer: Signer, users: tuple[str, ...], ok: bool) -> None:
    """As apt: one good signature suffices; signatures by unknown keys are ignored."""
    raw = lzma.compress(INDEX.encode())
    _mirror_tree(tmp_path / "m", signer, INDEX,
                 inrelease=signer.clearsign(_release_text({PATH: raw}), *users))
    mirror = _mirror(tmp_path, signer)
    if ok:
        assert mirror.packages("trixie", "amd64")
    else:
        with pytest.raises(MirrorError, match="no signature by a key of the keyring"):
            mirror.packages("trixie", "amd64")


def test_a_tampered_inrelease_is_refused(tmp_path: Path, signer: Signer) -> None:
    raw = lzma.compress(INDEX.encode())
    signed = signer.clearsign(_release_text({PATH: raw}))
    _mirror_tree(tmp_path / "m", signer, INDEX,
                 inrelease=signed.replace(b"Origin: Test", b"Origin: Evil"))
    with pytest.raises(MirrorError, match="does not verify.*a bad signature"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")


def test_an_unsigned_inrelease_is_refused(tmp_path: Path, signer: Signer) -> None:
    raw = lzma.compress(INDEX.encode())
    _mirror_tree(tmp_path / "m", signer, INDEX,
                 inrelease=_release_text({PATH: raw}).encode())
    with pytest.raises(MirrorError, match="is not a clearsigned file"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")


def test_an_inrelease_of_another_suite_is_refused(tmp_path: Path, signer: Signer) -> None:
    _mirror_tree(tmp_path / "m", signer, INDEX, suite="bookworm")
    with pytest.raises(MirrorError, match="signed for bookworm .*not trixie"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")


def test_an_expired_inrelease_is_refused_unless_allowed(tmp_path: Path, signer: Signer) -> None:
    _mirror_tree(tmp_path / "m", signer, INDEX, valid_until="Sat, 01 Jan 2000 00:00:00 UTC")
    with pytest.raises(MirrorError, match="expired on Sat, 01 Jan 2000") as info:
        _mirror(tmp_path, signer).packages("trixie", "amd64")
    assert info.value.hint and "APT_ALLOW_EXPIRED=yes" in info.value.hint
    assert _mirror(tmp_path, signer, allow_expired=True).packages("trixie", "amd64")


def test_mirror_from_config_carries_apt_allow_expired(tmp_path: Path) -> None:
    g = GlobalConfig(config_path="", stat_path="", log_file="",
                     debian_mirror="http://mirror.invalid/debian", apt_allow_expired=True)
    m = Mirror.from_config(g, tmp_path)
    assert (m.url, m.allow_expired, m.cache_dir) == ("http://mirror.invalid/debian", True,
                                                     tmp_path)


@pytest.mark.parametrize("valid_until, ok", [
    ("", True), ("Sat, 01 Jan 2500 00:00:00 UTC", True), ("Thu, 01 Jan 1970 00:16:40 UTC", True),
    ("Thu, 01 Jan 1970 00:16:39 UTC", False), ("Thu, 01 Jan 1970 01:16:39 +0100", False),
    ("Sat, 01 Jan 2000 00:00:00 UTC", True)])
def test_check_valid_until(valid_until: str, ok: bool) -> None:
    if ok:
        debian.check_valid_until(valid_until, "R", 1000.0)
    else:
        with pytest.raises(MirrorError, match="R expired on"):
            debian.check_valid_until(valid_until, "R", 1000.0)
    with pytest.raises(MirrorError, match="unreadable Valid-Until"):
        debian.check_valid_until("someday", "R", 1000.0)


@pytest.mark.parametrize("status, problem", [
    ("[GNUPG:] GOODSIG K A\n[GNUPG:] VALIDSIG FPR 2026-01-01", ""),
    ("[GNUPG:] ERRSIG K2 22 8 01 0 9 FPR2\n[GNUPG:] NO_PUBKEY K2\n[GNUPG:] VALIDSIG FPR", ""),
    ("[GNUPG:] ERRSIG K2 22 8 01 0 4 FPR2\n[GNUPG:] VALIDSIG FPR", "cannot check"),
    ("[GNUPG:] BADSIG K A\n[GNUPG:] VALIDSIG FPR", "a bad signature"),
    ("[GNUPG:] EXPKEYSIG K A\n[GNUPG:] VALIDSIG FPR", "expired key"),
    ("[GNUPG:] REVKEYSIG K A\n[GNUPG:] VALIDSIG FPR", "revoked key"),
    ("[GNUPG:] NODATA 1", "no signature by a key of the keyring"),
    ("", "no signature by a key of the keyring"),
    ("VALIDSIG FPR (not a status line)", "no signature by a key of the keyring"),
])
def test_signature_problem(status: str, problem: str) -> None:
    got = debian.signature_problem(status)
    assert (problem in got) if problem else got == ""


# --------------------------------------------------------------------------- Mirror


def test_mirror_refuses_an_index_that_does_not_match(tmp_path: Path, signer: Signer) -> None:
    raw = lzma.compress(INDEX.encode())
    _mirror_tree(tmp_path / "m", signer, INDEX,
                 inrelease=signer.clearsign(_release_text({PATH: raw + b"x"})))
    with pytest.raises(MirrorError, match="does not match its InRelease checksum"):
        _mirror(tmp_path, signer).packages("trixie", "amd64")
    assert not list((tmp_path / "cache").glob("Packages-*"))


def test_mirror_errors_name_what_is_missing(tmp_path: Path, signer: Signer) -> None:
    _mirror_tree(tmp_path / "m", signer, INDEX)
    mirror = _mirror(tmp_path, signer)
    with pytest.raises(MirrorError, match="has no main/binary-riscv64/Packages.xz"):
        mirror.packages("trixie", "riscv64")
    with pytest.raises(MirrorError, match="cannot fetch .*/dists/nosuch/InRelease") as info:
        mirror.packages("nosuch", "amd64")
    assert info.value.hint and "DEBIAN_MIRROR" in info.value.hint


def test_a_mirror_without_url_says_how_to_set_one(tmp_path: Path) -> None:
    with pytest.raises(MirrorError) as info:
        Mirror("", tmp_path).packages("trixie", "amd64")
    assert str(info.value).count("\n") == 0
    assert "DEBIAN_MIRROR" in str(info.value) and "/etc/sysconfig/stap-server" in str(info.value)
