"""The Debian mirror reader: dpkg's version order, Packages indexes, Depends, .deb streams."""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm import debian
from farm.debian import (
    Mirror,
    Package,
    compare_versions,
    depends_names,
    iter_data_members,
    parse_packages,
)
from farm.errors import MirrorError


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


# --------------------------------------------------------------------------- Mirror


def _mirror_tree(root: Path, index: str, *, corrupt: bool = False) -> None:
    raw = lzma.compress(index.encode())
    path = "main/binary-amd64/Packages.xz"
    digest = hashlib.sha256(raw if not corrupt else b"other").hexdigest()
    dists = root / "dists" / "trixie"
    (dists / "main" / "binary-amd64").mkdir(parents=True)
    (dists / path).write_bytes(raw)
    (dists / "InRelease").write_text(
        "Origin: Test\nSuite: trixie\nSHA256:\n"
        f" {digest} {len(raw)} {path}\n"
        f" {'1' * 64} 10 main/binary-arm64/Packages.xz\n"
        "Acquire-By-Hash: yes\n")


def test_mirror_reads_an_index_by_its_inrelease_checksum(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "KEYRINGS", ())  # the synthetic InRelease is unsigned
    _mirror_tree(tmp_path / "m", INDEX)
    mirror = Mirror(f"file://{tmp_path / 'm'}/", tmp_path / "cache")
    assert mirror.url == f"file://{tmp_path / 'm'}"
    names = [p.name for p in mirror.packages("trixie", "amd64")]
    assert "linux-headers-9.9.1+test1-amd64" in names
    cached = list((tmp_path / "cache").glob("Packages-*"))
    assert len(cached) == 1
    # cached by digest: the index itself is not fetched again
    (tmp_path / "m" / "dists" / "trixie" / "main" / "binary-amd64" / "Packages.xz").unlink()
    assert [p.name for p in mirror.packages("trixie", "amd64")] == names


def test_mirror_refuses_an_index_that_does_not_match(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "KEYRINGS", ())
    _mirror_tree(tmp_path / "m", INDEX, corrupt=True)
    mirror = Mirror(f"file://{tmp_path / 'm'}", tmp_path / "cache")
    with pytest.raises(MirrorError, match="does not match its InRelease checksum"):
        mirror.packages("trixie", "amd64")
    assert not list((tmp_path / "cache").glob("Packages-*"))


def test_mirror_errors_name_what_is_missing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "KEYRINGS", ())
    _mirror_tree(tmp_path / "m", INDEX)
    mirror = Mirror(f"file://{tmp_path / 'm'}", tmp_path / "cache")
    with pytest.raises(MirrorError, match="has no main/binary-riscv64/Packages.xz"):
        mirror.packages("trixie", "riscv64")
    with pytest.raises(MirrorError, match="cannot fetch .*/dists/nosuch/InRelease") as info:
        mirror.packages("nosuch", "amd64")
    assert info.value.hint and "DEBIAN_MIRROR" in info.value.hint
