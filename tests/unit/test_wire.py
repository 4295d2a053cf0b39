"""The farm endpoint's wire format (farm/wire.py): request checks, cache keys, response zips.

Requests are built as the stap client builds them (stap-protocol.md §3.3): top-level version,
sysinfo, locale, argv1..N, plus script/ and tapset/ trees with their directory entries.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import shutil
import stat
import struct
import subprocess
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.endpoint import wire, zipheaders, zipread
from farm.endpoint.wire import Request, RequestError

LIMIT = 64 << 20  # upstream's default MAXREQSIZE-like bound used in these tests
SCRIPT = b'probe begin { println("hello"); exit() }\n'
TAPSET = b"function tap_hello() { return 1 }\n"
ARGV = ("script/tmp/x/hello.stp", "-I", "tapset/tmp/x/tapdir", "-v", "-p4",
        "-DMAXACTION=1000", "--", "world")
HELLO: dict[str, bytes] = {
    "version": b"5.1",
    "sysinfo": b"sysinfo: 6.12.48+tst13-amd64 x86_64",
    "locale": b"LANG=en_US.UTF-8\nLC_ALL=C.UTF-8\n",
    **{f"argv{i}": a.encode() for i, a in enumerate(ARGV, start=1)},
    "script/tmp/x/hello.stp": SCRIPT,
    "tapset/tmp/x/tapdir/hello.stp": TAPSET,
}


def _dirs(names: list[str]) -> list[str]:
    """Every directory entry `zip -r` writes for these file names."""
    out: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        out.update("/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    return sorted(out)


def client_zip(files: dict[str, bytes], *, dirs: bool = True,
               order: list[str] | None = None) -> bytes:
    """A request zip as `zip -qr ../client.zip *` makes it (file names in glob order)."""
    names = order if order is not None else sorted(files)
    entries: list[tuple[str, bytes | None]] = [(n, files[n]) for n in names]
    if dirs:
        entries += [(d, None) for d in _dirs(list(files))]
        if order is None:
            entries.sort(key=lambda e: e[0])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries:
            info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
            if content is None:
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                info.CRC = info.compress_size = 0
                archive.mkdir(info)
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def refused(data: bytes, *, limit: int = LIMIT) -> str:
    with pytest.raises(RequestError) as e:
        wire.inspect_request(data, limit)
    message = str(e.value)
    assert "\n" not in message and message
    return message


def with_files(**changes: bytes | None) -> dict[str, bytes]:
    files = dict(HELLO)
    for name, content in changes.items():
        if content is None:
            files.pop(name, None)
        else:
            files[name] = content
    return files


def headers(data: bytes, name: str) -> tuple[int, int]:
    """Offsets of an entry's local and central headers (entries without extra fields)."""
    first = data.index(name.encode())
    second = data.index(name.encode(), first + 1)
    local, central = first - 30, second - 46
    assert data[local:local + 4] == b"PK\x03\x04" and data[central:central + 4] == b"PK\x01\x02"
    return local, central


def patch_name(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace an entry name in the local and the central header (same length)."""
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


# --------------------------------------------------------------------------- length header


def test_parse_length_is_signed_big_endian() -> None:
    assert wire.parse_length(b"\x00\x00\x13\x88") == 5000
    assert wire.parse_length(b"\x00\x00\x00\x00") == 0
    assert wire.parse_length(b"\xff\xff\xff\xff") == -1
    assert wire.parse_length(b"\x80\x00\x00\x00") == -(2**31)
    for bad in (b"", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00"):
        with pytest.raises(ValueError):
            wire.parse_length(bad)


# --------------------------------------------------------------------------- round trip


def test_client_request_round_trip() -> None:
    request = wire.inspect_request(client_zip(HELLO), LIMIT)
    assert request.version == "5.1"
    assert request.release == "6.12.48+tst13-amd64" and request.arch == "x86_64"
    assert request.argv == ARGV
    assert request.files == tuple(sorted(HELLO.items()))
    assert all(not name.endswith("/") for name, _ in request.files)
    assert request.dirs == tuple(_dirs(list(HELLO)))
    assert request.privilege == "stapdev" and not request.guru


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP zip")
def test_request_zipped_by_info_zip_like_the_client(tmp_path: Path) -> None:
    client = tmp_path / "client"
    for name, content in HELLO.items():
        path = client / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    subprocess.run("cd client && zip -qr ../client.zip *", shell=True, cwd=tmp_path, check=True)
    data = (tmp_path / "client.zip").read_bytes()
    assert any(n.endswith("/") for n in zipfile.ZipFile(io.BytesIO(data)).namelist())
    request = wire.inspect_request(data, LIMIT)
    assert request.files == tuple(sorted(HELLO.items())) and request.argv == ARGV
    assert request.dirs == tuple(_dirs(list(HELLO)))


def test_version_first_word_and_sysinfo_whitespace() -> None:
    files = with_files(version=b"4.8 extra words\n", sysinfo=b"sysinfo:  6.1.0-1-arm64\tarm64\n")
    request = wire.inspect_request(client_zip(files), LIMIT)
    assert request.version == "4.8"
    assert (request.release, request.arch) == ("6.1.0-1-arm64", "arm64")


def test_argv_stops_at_first_missing_number_and_keeps_raw_bytes() -> None:
    files = with_files(argv3=None, argv2=b"-e\xffprobe begin {}")
    request = wire.inspect_request(client_zip(files), LIMIT)
    assert request.argv == (ARGV[0], "-e\udcffprobe begin {}")
    assert request.argv[1].encode("utf-8", errors="surrogateescape") == b"-e\xffprobe begin {}"
    no_argv = {k: v for k, v in HELLO.items() if not k.startswith("argv")}
    assert wire.inspect_request(client_zip(no_argv), LIMIT).argv == ()


def test_an_argument_execve_cannot_pass_is_refused_with_the_way_out() -> None:
    longest = b"-e" + b"x" * (wire.MAX_ARG - 2)
    ok = wire.inspect_request(client_zip(with_files(argv2=longest)), LIMIT)
    assert len(ok.argv[1]) == wire.MAX_ARG == 131071
    with pytest.raises(RequestError, match=r"^request argument 2 is 131072 bytes, more than "
                       r"the 131071 bytes Linux passes .*script in a file"):
        wire.inspect_request(client_zip(with_files(argv2=longest + b"x")), LIMIT)


def test_files_sorted_whatever_the_zip_order() -> None:
    names = sorted(HELLO, reverse=True)
    request = wire.inspect_request(client_zip(HELLO, order=names, dirs=False), LIMIT)
    assert [n for n, _ in request.files] == sorted(HELLO)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("data", [b"", b"hello", b"PK\x03\x04" + b"\x00" * 40, b"\x00" * 22])
def test_not_a_zip(data: bytes) -> None:
    assert "not a" in refused(data) and "zip archive" in refused(data)


def test_truncated_zip_is_refused() -> None:
    data = client_zip(HELLO)
    for cut in (10, len(data) // 2, len(data) - 1):
        refused(data[:cut])


def test_too_many_entries() -> None:
    files = dict(HELLO)
    files.update({f"tapset/t/f{i}": b"" for i in range(wire.MAX_ENTRIES)})
    message = refused(client_zip(files, dirs=False))
    assert str(wire.MAX_ENTRIES) in message and "entries" in message


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "absolute"),
    ("script/../../etc/passwd", ".."),
    ("..", ".."),
    ("script\\x.stp", "backslash"),
    ("script//x.stp", "component"),
    ("script/./x.stp", "component"),
])
def test_unsafe_names(name: str, why: str) -> None:
    message = refused(client_zip(with_files(**{name: b"x"}), dirs=False))
    assert "unsafe" in message and why in message


def test_nul_in_name() -> None:
    data = client_zip(with_files(**{"script/aXb": b"x"}), dirs=False)
    message = refused(patch_name(data, b"script/aXb", b"script/a\x00b"))
    assert "unsafe" in message and "NUL" in message


def test_empty_name() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in HELLO.items():
            archive.writestr(name, content)
        archive.writestr(zipfile.ZipInfo(""), b"x")
    assert "empty name" in refused(buffer.getvalue())


def test_symlink_entry() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in HELLO.items():
            archive.writestr(name, content)
        link = zipfile.ZipInfo("script/tmp/x/passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, b"/etc/passwd")
    message = refused(buffer.getvalue())
    assert "symbolic link" in message and "script/tmp/x/passwd" in message


def test_duplicate_entry() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns: "Duplicate name"
        for name, content in HELLO.items():
            archive.writestr(name, content)
        archive.writestr("sysinfo", b"sysinfo: 6.1.0-evil x86_64")
    assert "'sysinfo' appears more than once" in refused(buffer.getvalue())


def test_file_that_is_also_a_directory() -> None:
    files = with_files(**{"script/tmp": b"x"})
    assert "both a file and a directory" in refused(client_zip(files))


def test_encrypted_entry() -> None:
    data = bytearray(client_zip(HELLO, dirs=False))
    local, central = headers(bytes(data), "script/tmp/x/hello.stp")
    data[local + 6] |= 0x1  # general purpose flags, bit 0: encrypted
    data[central + 8] |= 0x1
    assert "encrypted" in refused(bytes(data))


def test_declared_size_over_the_limit() -> None:
    data = client_zip(HELLO)
    total = sum(len(c) for c in HELLO.values())
    assert wire.inspect_request(data, total).argv == ARGV  # exactly the limit is fine
    message = refused(data, limit=total - 1)
    assert message == (f"request of {total} bytes uncompressed exceeds this farm's limit of "
                       f"{total - 1} bytes (MAXREQSIZE); make the request smaller")


def test_empty_request() -> None:
    files = {"version": b"", "sysinfo": b""}
    assert "empty" in refused(client_zip(files))


def test_corrupt_entry_data() -> None:
    data = bytearray(client_zip({**HELLO, "script/tmp/x/hello.stp": SCRIPT * 50}, dirs=False))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("script/tmp/x/hello.stp")
    start = info.header_offset + 30 + len(info.filename)  # no extra field in these entries
    data[start + 5] ^= 0xFF
    message = refused(bytes(data))
    assert "corrupt" in message and "script/tmp/x/hello.stp" in message


def test_crc_mismatch() -> None:
    data = client_zip(HELLO, dirs=False)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("sysinfo")
    crc = struct.pack("<I", info.CRC)
    bad = struct.pack("<I", info.CRC ^ 1)
    assert data.count(crc) == 2
    assert "CRC" in refused(data.replace(crc, bad))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """One entry of 100 MB of zeros (deflated to ~100 kB), built without holding 100 MB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in HELLO.items():
            archive.writestr(name, content)
        with archive.open("script/tmp/x/bomb.stp", "w") as stream:
            zeros = bytes(1 << 20)
            for _ in range(100):
                stream.write(zeros)
    return buffer.getvalue()


def lie_about_size(data: bytes, name: str, size: int) -> bytes:
    """The zip with the entry's uncompressed size patched in both its headers."""
    local, central = headers(data, name)
    out = bytearray(data)
    out[local + 22:local + 26] = struct.pack("<I", size)
    out[central + 24:central + 28] = struct.pack("<I", size)
    return bytes(out)


def test_zip_bomb_with_honest_header_is_refused_before_decompressing(bomb: bytes) -> None:
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        message = refused(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "exceeds this farm's limit" in message and peak < 5 << 20


def test_zip_bomb_with_lying_header_is_refused_without_inflating_it(bomb: bytes) -> None:
    liar = lie_about_size(bomb, "script/tmp/x/bomb.stp", 1000)
    assert zipfile.ZipFile(io.BytesIO(liar)).getinfo("script/tmp/x/bomb.stp").file_size == 1000
    tracemalloc.start()
    try:
        message = refused(liar)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "script/tmp/x/bomb.stp" in message and peak < 20 << 20


def test_read_budget_bounds_actual_decompression() -> None:
    """Whatever the headers say, reading stops one byte past the budget."""
    data = client_zip({**HELLO, "tapset/big": bytes(1 << 20)}, dirs=False)
    entries = zipheaders.entries(data, wire._REQUEST)
    big = next(e for e in entries if e.name == "tapset/big")
    compressed = data[big.data_start:big.data_start + big.compress_size]
    assert len(zipread._inflate(compressed, 1000)[0]) == 1001
    assert len(zipread._read_entry(memoryview(data), big, 1000, wire._REQUEST)) == 1001
    small = sum(len(c) for c in HELLO.values())
    with pytest.raises(RequestError, match="exceeds this farm's limit"):
        zipread.read_contents(data, entries, small + 1000, wire._REQUEST)
    assert len(zipread.read_contents(data, entries, small + (1 << 20), wire._REQUEST)) == \
        len(HELLO) + 1


@pytest.mark.parametrize("sysinfo", [
    None, b"", b"sysinfo:", b"sysinfo: 6.1.0-1-amd64", b"sysinfo: 6.1.0-1-amd64 x86_64 extra",
    b"sysinfo 6.1.0-1-amd64 x86_64", b"sysinfo: ../../etc x86_64", b"sysinfo: /lib/x x86_64",
    b"sysinfo: 6.1.0-1-amd64 X86_64", b"sysinfo: 6.1.0-1-amd64 x86-64",
    b"sysinfo: 6.1.0;rm x86_64", b"sysinfo: 6.1.0-1-amd64 x86_64\x00",
])
def test_invalid_sysinfo(sysinfo: bytes | None) -> None:
    assert refused(client_zip(with_files(sysinfo=sysinfo))).startswith(
        "request has no valid sysinfo")


@pytest.mark.parametrize("version, message", [
    (None, "client protocol version 1.0 is older than 1.6, which this farm does not support"),
    (b"1.5.9", "client protocol version 1.5.9 is older than 1.6"),
    (b"1", "client protocol version 1 is older than 1.6"),
    (b"5.5a", "unknown protocol version '5.5a'"),
    (b"5.6-dev", "unknown protocol version '5.6-dev'"),
    (b"", "unknown protocol version ''"),
    (b"1234567.1", "unknown protocol version '1234567.1'"),
    (b".5", "unknown protocol version '.5'"),
    (b"5..1", "unknown protocol version '5..1'"),
])
def test_bad_protocol_versions(version: bytes | None, message: str) -> None:
    assert refused(client_zip(with_files(version=version))).startswith(message)


@pytest.mark.parametrize("version", [b"1.6", b"4.8", b"5.1", b"5.6\n", b"10.0", b"999999.0"])
def test_supported_protocol_versions(version: bytes) -> None:
    request = wire.inspect_request(client_zip(with_files(version=version)), LIMIT)
    assert request.version == version.decode().strip()


# --------------------------------------------------------------------------- privilege


def req(*argv: str) -> Request:
    return Request(version="5.1", release="6.1.0-1-amd64", arch="x86_64", argv=argv, files=())


@pytest.mark.parametrize("argv, privilege", [
    ((), "stapdev"),
    (("-p4", "-e", "probe begin {}"), "stapdev"),
    (("--privilege=stapusr",), "stapusr"),
    (("--privilege=stapsys", "--privilege=stapusr"), "stapsys"),
    (("--unprivileged", "--privilege=stapsys"), "stapusr"),
    (("-v", "--privilege=stapdev"), "stapdev"),
    (("--privilege=root",), "stapdev"),
    (("-p4", "--", "--privilege=stapusr"), "stapdev"),
    (("--", "--unprivileged"), "stapdev"),
    (("-e--privilege=stapusr",), "stapdev"),
])
def test_privilege(argv: tuple[str, ...], privilege: str) -> None:
    assert req(*argv).privilege == privilege


@pytest.mark.parametrize("argv, guru", [
    ((), False),
    (("-g",), True),
    (("-v", "--guru-mode"), True),
    (("--", "-g"), False),
    (("-p4", "--", "--guru-mode"), False),
    (("-e-g",), False),
])
def test_guru(argv: tuple[str, ...], guru: bool) -> None:
    assert req(*argv).guru is guru


def test_privilege_from_a_request_zip() -> None:
    files = with_files(argv4=b"--privilege=stapusr", argv5=b"-g")
    request = wire.inspect_request(client_zip(files), LIMIT)
    assert request.privilege == "stapusr" and request.guru


# --------------------------------------------------------------------------- cache key


def test_cache_key_same_request_same_key() -> None:
    a = wire.inspect_request(client_zip(HELLO), LIMIT)
    b = wire.inspect_request(client_zip(HELLO, order=sorted(HELLO, reverse=True)), LIMIT)
    c = wire.inspect_request(client_zip(HELLO, dirs=False), LIMIT)
    key = wire.cache_key(a, "server-5.6-x86_64")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == wire.cache_key(b, "server-5.6-x86_64")
    # Without directory entries the forwarded zip differs (encode_request writes exactly the
    # entries the request had), so the key does too; the files alone still decide it.
    assert c.files == a.files and c.dirs == () and a.dirs
    assert wire.cache_key(c, "server-5.6-x86_64") != key
    assert wire.cache_key(c, "server-5.6-x86_64") == wire.cache_key(
        dataclasses.replace(a, dirs=()), "server-5.6-x86_64")


def test_cache_key_changes_with_any_file_or_the_identity() -> None:
    base = wire.inspect_request(client_zip(HELLO), LIMIT)
    key = wire.cache_key(base, "id")
    assert wire.cache_key(base, "id2") != key
    keys = {key}
    for name, content in HELLO.items():
        changed = wire.inspect_request(client_zip(with_files(**{name: content + b"1"})), LIMIT)
        keys.add(wire.cache_key(changed, "id"))
    extra = wire.inspect_request(client_zip(with_files(**{"tapset/extra": b""})), LIMIT)
    keys.add(wire.cache_key(extra, "id"))
    renamed = with_files(**{"script/tmp/x/hello.stp": None, "script/tmp/x/hello2.stp": SCRIPT})
    keys.add(wire.cache_key(wire.inspect_request(client_zip(renamed), LIMIT), "id"))
    assert len(keys) == len(HELLO) + 3


def test_cache_key_framing_is_unambiguous() -> None:
    def files(*pairs: tuple[str, bytes]) -> Request:
        return Request(version="5.1", release="r", arch="x86_64", argv=(), files=pairs)

    assert (wire.cache_key(files(("ab", b"c")), "id")
            != wire.cache_key(files(("a", b"bc")), "id"))
    assert wire.cache_key(files(("a", b"")), "idx") != wire.cache_key(files(("xa", b"")), "id")
    assert (wire.cache_key(files(("a", b"1"), ("b", b"2")), "id")
            == wire.cache_key(files(("b", b"2"), ("a", b"1")), "id"))


# --------------------------------------------------------------------------- responses


def test_error_response_round_trip() -> None:
    data = wire.error_response("request is not a zip archive", "5.6")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert sorted(names) == ["rc", "stap000000/", "stderr", "stdout", "version"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist()
                   if not i.is_dir())
        assert archive.read("version") == b"5.6" and archive.read("rc") == b"1"
        assert archive.read("stdout") == b""
        assert archive.read("stderr") == b"Server: request is not a zip archive\n"
    assert wire.response_rc(data) == 1


def test_error_response_multi_line_message_and_bad_version() -> None:
    data = wire.error_response("one\ntwo", "5.1")
    assert zipfile.ZipFile(io.BytesIO(data)).read("stderr") == b"Server: one\nServer: two\n"
    for bad in ("5.6-dev", "", "5.5a"):
        with pytest.raises(ValueError):
            wire.error_response("x", bad)


@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs Info-ZIP unzip")
def test_error_response_unpacks_as_the_client_expects(tmp_path: Path) -> None:
    """`unzip -qd server server.zip`, then exactly one `server/stap??????` (§3.4)."""
    (tmp_path / "server.zip").write_bytes(wire.error_response("no kernel 6.1", "5.6"))
    subprocess.run(["unzip", "-qd", "server", "server.zip"], cwd=tmp_path, check=True)
    server = tmp_path / "server"
    assert [Path(p).name for p in glob.glob(str(server / "stap??????"))] == ["stap000000"]
    assert (server / "stap000000").is_dir()
    assert (server / "rc").read_text() == "1"
    assert (server / "stderr").read_text().startswith("Server: no kernel 6.1")


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize("data, rc", [
    (_zip({"version": b"5.6", "rc": b"0"}), 0),
    (_zip({"rc": b"1\n"}), 1),
    (_zip({"rc": b"-1"}), -1),
    (_zip({"version": b"5.6"}), None),  # upstream: unsupported release, no rc
    (_zip({"rc": b"abc"}), None),
    (_zip({"rc": b""}), None),
    (_zip({"rc": b"0" * 100}), None),
    (_zip({"rc/": b""}), None),
    (b"", None),
    (b"not a zip", None),
])
def test_response_rc(data: bytes, rc: int | None) -> None:
    assert wire.response_rc(data) == rc


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_ever_raise_request_error(data: bytes) -> None:
    try:
        wire.inspect_request(data, LIMIT)
    except RequestError as e:
        assert str(e) and "\n" not in str(e)


VALID = client_zip(HELLO)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(VALID)))
def test_corrupted_requests_only_ever_raise_request_error(
        flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for where, value in flips:
        data[where] = value
    try:
        request = wire.inspect_request(bytes(data[:cut] if cut else data), LIMIT)
    except RequestError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert request.release and request.arch


@given(st.binary(max_size=2048))
def test_response_rc_never_raises(data: bytes) -> None:
    assert wire.response_rc(data) is None or isinstance(wire.response_rc(data), int)

