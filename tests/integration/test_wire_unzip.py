"""What the real Info-ZIP `unzip` makes of the zips farm/wire.py writes, and of the attacks.

The backend's stap-serverd unpacks forwarded requests with `unzip`, the stap client unpacks
responses with `unzip -qd server server.zip` (stap-protocol.md §3.3-§3.4). So for every
request `encode_request` writes, `unzip -q -d DIR` must give exactly the request's files
(byte-equal, mode 0644) and directories (0755), nothing else; likewise for responses. And the
two differentials the security review reproduced are shown to be real with this unzip (so the
unit tests that refuse them test something), then refused.

Needs /usr/bin/unzip (Debian package `unzip`) and, for client-made requests, `zip`: a missing
program fails these tests, it never skips them. No Docker.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.endpoint import wire
from farm.endpoint.wire import Request, RequestError, Response

LIMIT = 64 << 20
SCRIPT = b'probe begin { println("hello"); exit() }\n'
TAPSET = b"function tap_hello() { return 1 }\n"
ARGV = ("script/tmp/x/hello.stp", "-I", "tapset/tmp/x/tapdir", "-v", "-p4",
        "-DMAXACTION=1000", "--", "world")
CLIENT: dict[str, bytes] = {  # a request as the stap client lays it out (§3.3)
    "version": b"5.1",
    "sysinfo": b"sysinfo: 6.12.48+tst13-amd64 x86_64",
    "locale": b"LANG=en_US.UTF-8\nLC_ALL=C.UTF-8\n",
    "mok_fingerprints": b"missing\n",
    **{f"argv{i}": a.encode() for i, a in enumerate(ARGV, start=1)},
    "script/tmp/x/hello.stp": SCRIPT,
    "tapset/tmp/x/tapdir/hello.stp": TAPSET,
    "tapset/tmp/x/tapdir/sub/more.stp": TAPSET * 3,
    "tapset/tmp/x/tapdir/empty.stp": b"",
}
CLIENT_EMPTY_DIRS = ("tapset/tmp/x/tapdir/nothing/",)  # an empty directory under -I


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"Info-ZIP {program} is required for these tests and is not installed "
                    f"(apt-get install {program})", pytrace=False)
    return path


@pytest.fixture(scope="module")
def unzip() -> str:
    return _require("unzip")


@pytest.fixture(scope="module")
def zip_program() -> str:
    return _require("zip")


def extract(unzip: str, data: bytes, where: Path, *, locale: str = "C.UTF-8") -> Path:
    """`unzip -q -d OUT` of data, as stap-serverd (requests) or the client (-qd) does."""
    where.mkdir(parents=True, exist_ok=True)
    archive = where / "archive.zip"
    archive.write_bytes(data)
    out = where / "out"
    env = {**os.environ, "LC_ALL": locale, "LANG": locale}
    done = subprocess.run([unzip, "-q", "-d", str(out), str(archive)], capture_output=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout == b"" and done.stderr == b""
    return out


def tree(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """({file: content}, {directory + "/"}) under root, names as raw UTF-8 (bytes paths);
    asserts there is nothing else (no symlinks, devices, FIFOs) and the farm's modes."""
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    base = os.fsencode(root)
    for current, subdirs, names in os.walk(base):
        for name in subdirs + names:
            path = os.path.join(current, name)
            relative = os.path.relpath(path, base).decode("utf-8")
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                dirs.add(relative + "/")
                assert stat.S_IMODE(mode) == 0o755, (relative, oct(mode))
            else:
                assert stat.S_ISREG(mode), (relative, oct(mode))
                assert stat.S_IMODE(mode) == 0o644, (relative, oct(mode))
                with open(path, "rb") as f:
                    files[relative] = f.read()
    return files, dirs


def parents(names: list[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        parts = name.rstrip("/").split("/")[:-1]
        out.update("/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    return out


def client_zip(zip_program: str, where: Path, files: dict[str, bytes],
               empty_dirs: tuple[str, ...] = ()) -> bytes:
    """The request as the real client makes it: `cd client && zip -qr ../client.zip *`."""
    client = where / "client"
    for name, content in files.items():
        path = client / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    for name in empty_dirs:
        (client / name).mkdir(parents=True, exist_ok=True)
    subprocess.run(f"cd client && {zip_program} -qr ../client.zip *", shell=True, cwd=where,
                   check=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    return (where / "client.zip").read_bytes()


def assert_extracts_exactly(unzip: str, request: Request, where: Path,
                            locale: str = "C.UTF-8") -> None:
    files, dirs = tree(extract(unzip, wire.encode_request(request), where, locale=locale))
    assert files == dict(request.files)
    assert dirs == set(request.dirs) | parents([*request.dirs, *dict(request.files)])


# --------------------------------------------------------------------------- requests


def test_client_made_request_re_encoded_extracts_exactly(unzip: str, zip_program: str,
                                                         tmp_path: Path) -> None:
    """The real client's layout, zipped by the real zip: the re-encoded request unzips to
    exactly the request's files and directories, and to what the client's own zip gives."""
    original = client_zip(zip_program, tmp_path / "make", CLIENT, CLIENT_EMPTY_DIRS)
    request = wire.inspect_request(original, LIMIT)
    assert request.argv == ARGV and dict(request.files) == CLIENT
    assert "tapset/tmp/x/tapdir/nothing/" in request.dirs and "script/tmp/x/" in request.dirs
    files, dirs = tree(extract(unzip, wire.encode_request(request), tmp_path / "encoded"))
    assert files == CLIENT
    assert dirs == set(request.dirs)  # zip -r wrote every directory: no implicit ones
    original_files, original_dirs = tree(extract(unzip, original, tmp_path / "original"))
    assert (original_files, original_dirs) == (files, dirs)


def test_client_made_zip64_request_re_encoded_extracts_exactly(
        unzip: str, zip_program: str, tmp_path: Path) -> None:
    """`zip -fz` forces zip64 headers (and zip64 extra fields) on every entry."""
    client = tmp_path / "client"
    for name, content in CLIENT.items():
        (client / name).parent.mkdir(parents=True, exist_ok=True)
        (client / name).write_bytes(content)
    subprocess.run(f"cd client && {zip_program} -fz -qr ../client.zip *", shell=True,
                   cwd=tmp_path, check=True)
    request = wire.inspect_request((tmp_path / "client.zip").read_bytes(), LIMIT)
    assert dict(request.files) == CLIENT
    assert_extracts_exactly(unzip, request, tmp_path / "out")


def test_request_without_directory_entries(unzip: str, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in CLIENT.items():
            archive.writestr(name, content)
    request = wire.inspect_request(buffer.getvalue(), LIMIT)
    assert request.dirs == ()
    files, dirs = tree(extract(unzip, wire.encode_request(request), tmp_path))
    assert files == CLIENT and dirs == parents(list(CLIENT))


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_non_ascii_names_extract_to_the_same_bytes(unzip: str, zip_program: str,
                                                   tmp_path: Path, locale: str) -> None:
    """A client path with non-ASCII characters (Info-ZIP zip stores it unflagged; the farm
    writes it flagged UTF-8): unzip writes the same UTF-8 bytes for both, in any locale."""
    names = {"script/tmp/jos\u00e9/h\u00e9llo.stp": SCRIPT,
             "tapset/tmp/\u6f22\u5b57/t.stp": TAPSET}
    files = {**CLIENT, "argv1": "script/tmp/jos\u00e9/h\u00e9llo.stp".encode(), **names}
    original = client_zip(zip_program, tmp_path / "make", files)
    assert all(not info.flag_bits & 0x800
               for info in zipfile.ZipFile(io.BytesIO(original)).infolist())
    request = wire.inspect_request(original, LIMIT)
    assert set(names) <= set(dict(request.files))
    encoded = tree(extract(unzip, wire.encode_request(request), tmp_path / "enc", locale=locale))
    assert encoded == tree(extract(unzip, original, tmp_path / "orig", locale=locale))
    assert encoded[0] == files


def test_binary_empty_and_many_files(unzip: str, tmp_path: Path) -> None:
    files = {**CLIENT, "tapset/bin/random": os.urandom(1 << 20),
             "tapset/bin/zeros": bytes(3 << 20), "tapset/bin/empty": b""}
    files.update({f"tapset/many/f{i:04d}.stp": b"# %d\n" % i for i in range(600)})
    dirs = tuple(sorted(parents([*files, "tapset/empty/dir/"]) | {"tapset/empty/dir/"}))
    made = Request(version="", release="", arch="", argv=(), files=tuple(sorted(files.items())),
                   dirs=dirs)
    request = wire.inspect_request(wire.encode_request(made), LIMIT)
    assert request.files == made.files and request.dirs == dirs
    files_out, dirs_out = tree(extract(unzip, wire.encode_request(request), tmp_path))
    assert files_out == files and dirs_out == set(dirs)


SEGMENT = st.text(alphabet="abz09_-.+~=,@\u00e9\u00df\u6f22", min_size=1, max_size=6).filter(
    lambda s: s not in (".", ".."))
PATH = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(PATH, st.binary(max_size=200), max_size=8),
       st.lists(PATH, max_size=3))
def test_property_random_requests_extract_exactly(files: dict[str, bytes],
                                                  empty: list[str]) -> None:
    unzip = _require("unzip")
    names = {"t/" + name: content for name, content in files.items()}
    names = {n: c for n, c in names.items() if not any(o.startswith(n + "/") for o in names)}
    names.update({"version": b"5.1", "sysinfo": b"sysinfo: 6.1.0-1-amd64 x86_64"})
    dirs = {"e/" + name + "/" for name in empty} | parents(list(names))
    made = Request(version="", release="", arch="", argv=(), files=tuple(sorted(names.items())),
                   dirs=tuple(sorted(dirs)))
    request = wire.inspect_request(wire.encode_request(made), LIMIT)
    assert request.files == made.files and request.dirs == made.dirs
    with tempfile.TemporaryDirectory() as where:
        assert_extracts_exactly(unzip, request, Path(where))


# --------------------------------------------------------------------------- responses


def test_re_encoded_response_unpacks_as_the_client_expects(unzip: str, tmp_path: Path) -> None:
    """`unzip -qd server server.zip`: exactly one `server/stap??????`, every file intact, the
    farm's signature in place of the backend's."""
    files = {"version": b"5.6", "rc": b"0", "stdout": b"stap_0123.ko\n", "stderr": b"",
             "stap000000/stap_0123.ko": os.urandom(50000),
             "stap000000/stap_0123.ko.sgn": b"backend",
             "stap000000/uprobes/uprobes.ko": b"\x7fELF",
             "stap000000/uprobes/uprobes.ko.sgn": b"backend"}
    response = Response(dirs=("stap000000/", "stap000000/uprobes/"),
                        files=tuple(sorted(files.items())))
    checked = wire.inspect_response(wire.encode_response(response), LIMIT)
    assert checked == response
    signed = wire.replace_signatures(checked, lambda module: b"farm:" + module[:4])
    out = extract(unzip, wire.encode_response(signed), tmp_path)
    assert [p.name for p in out.glob("stap??????")] == ["stap000000"]
    got, dirs = tree(out)
    assert dirs == {"stap000000/", "stap000000/uprobes/"}
    assert got == {**files, "stap000000/stap_0123.ko.sgn":
                   b"farm:" + files["stap000000/stap_0123.ko"][:4],
                   "stap000000/uprobes/uprobes.ko.sgn": b"farm:\x7fELF"}
    assert (out / "rc").read_bytes() == b"0" and wire.response_rc(
        wire.encode_response(signed)) == 0


def test_error_response_unpacks_for_the_client(unzip: str, tmp_path: Path) -> None:
    out = extract(unzip, wire.error_response("no kernel 6.1", "5.6"), tmp_path)
    assert [p.name for p in out.glob("stap??????")] == ["stap000000"]
    files, dirs = tree(out)
    assert dirs == {"stap000000/"} and files["rc"] == b"1"
    assert files["stderr"] == b"Server: no kernel 6.1\n"


# --------------------------------------------------------------------------- the attacks


def _one_entry_zip(name: bytes, payload: bytes, method: int, crc: int, file_size: int,
                   extra: bytes = b"") -> bytes:
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(payload),
                        file_size, len(name), len(extra)) + name + extra + payload
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 20, 0, method, 0, 0x21, crc,
                          len(payload), file_size, len(name), len(extra), 0, 0, 0,
                          (stat.S_IFREG | 0o644) << 16, 0) + name + extra
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _forge_crc(data: bytes, target: int) -> bytes:
    """4 bytes that, appended to data, make its CRC-32 equal target."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    by_top = {t >> 24: i for i, t in enumerate(table)}
    reg, indices = target ^ 0xFFFFFFFF, [0] * 4
    for i in range(3, -1, -1):
        indices[i] = by_top[reg >> 24]
        reg = ((reg ^ table[indices[i]]) << 8) & 0xFFFFFFFF
    reg, out = zlib.crc32(data) ^ 0xFFFFFFFF, bytearray()
    for j in indices:
        out.append((reg ^ j) & 0xFF)
        reg = (reg >> 8) ^ table[j]
    return bytes(out)


def test_attack_a_is_real_with_this_unzip_and_refused(unzip: str, tmp_path: Path) -> None:
    """unzip writes the whole stream and is happy (its CRC forged to the declared one);
    zipfile reads the declared size and is happy too; the farm refuses it."""
    shown = b"sysinfo: 6.1.0-1-amd64 x86_64"
    hidden = shown + b" EVIL"
    hidden += _forge_crc(hidden, zlib.crc32(shown))
    assert zlib.crc32(hidden) == zlib.crc32(shown)
    data = _one_entry_zip(b"sysinfo", _raw_deflate(hidden), 8, zlib.crc32(shown), len(shown))
    assert zipfile.ZipFile(io.BytesIO(data)).read("sysinfo") == shown
    files, _ = tree(extract(unzip, data, tmp_path))  # unzip exits 0, says nothing
    assert files == {"sysinfo": hidden}  # what the backend would have compiled with
    with pytest.raises(RequestError, match="'sysinfo' is corrupt .*more than its declared"):
        wire.inspect_request(data, LIMIT)


def test_attack_b_is_real_with_this_unzip_and_refused(unzip: str, tmp_path: Path) -> None:
    body = struct.pack("<BL", 1, zlib.crc32(b"sysinfo")) + b"evilname"
    extra = struct.pack("<2H", 0x7075, len(body)) + body
    content = b"sysinfo: 6.1.0-1-amd64 x86_64"
    data = _one_entry_zip(b"sysinfo", content, 0, zlib.crc32(content), len(content), extra)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["sysinfo"]
    files, _ = tree(extract(unzip, data, tmp_path))
    assert files == {"evilname": content}  # unzip renamed it
    with pytest.raises(RequestError, match=r"Unicode Path extra field \(0x7075\)"):
        wire.inspect_request(data, LIMIT)
