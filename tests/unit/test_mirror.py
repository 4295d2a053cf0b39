"""The default Debian mirror, read from the host's apt sources (farm/mirror.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.kernels.mirror import (
    HINT,
    AptSource,
    apt_files,
    debian_mirror,
    host_debian_mirror,
    parse_deb822,
    parse_one_line,
)
from farm.manual.config import load_global

# Host names below are reserved (.example, .invalid, RFC 2606): no package host is named.
ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb http://mirror.example/debian bookworm main contrib  # a trailing comment
deb-src http://src.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main
"""

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_one_line_sources() -> None:
    assert list(parse_one_line(ONE_LINE)) == [
        AptSource("deb", "http://mirror.example/debian", ("bookworm",), ("main", "contrib")),
        AptSource("deb-src", "http://src.example/debian", ("bookworm",), ("main",)),
        AptSource("deb", "http://mirror.example/debian-security", ("bookworm-security",),
                  ("main",)),
    ]


@pytest.mark.parametrize("line, uri", [
    ("deb [signed-by=/usr/share/keyrings/k.gpg] http://a.example/debian trixie main",
     "http://a.example/debian"),
    ("deb [ arch=amd64,arm64 signed-by=/k.gpg ] https://a.example/debian/ trixie main",
     "https://a.example/debian/"),
    ("  deb\thttp://a.example/debian trixie", "http://a.example/debian"),
    ("deb [arch=amd64 # not a comment inside brackets] http://a.example/debian trixie",
     "http://a.example/debian"),
])
def test_one_line_options_and_spacing(line: str, uri: str) -> None:
    assert [s.uri for s in parse_one_line(line)] == [uri]


@pytest.mark.parametrize("line", ["# deb http://a.example/debian trixie main", "deb",
                                  "deb http://a.example/debian", "rpm http://a.example/x y",
                                  "deb [signed-by=/k.gpg] http://a.example/debian", ""])
def test_one_line_ignores_what_is_no_source(line: str) -> None:
    assert list(parse_one_line(line)) == []


def test_deb822_sources() -> None:
    text = DEB822 + """
Types: deb deb-src
URIs: http://one.example/debian
 http://two.example/debian
Suites: trixie
Components: main

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: trixie
"""
    got = [(s.kind, s.uri, s.suites) for s in parse_deb822(text)]
    assert got == [
        ("deb", "http://mirror.example/debian", ("bookworm", "bookworm-updates")),
        ("deb", "http://mirror.example/debian-security", ("bookworm-security",)),
        ("deb", "http://one.example/debian", ("trixie",)),
        ("deb", "http://two.example/debian", ("trixie",)),
        ("deb-src", "http://one.example/debian", ("trixie",)),
        ("deb-src", "http://two.example/debian", ("trixie",)),
    ]


def _text(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


@pytest.mark.parametrize("files, mirror", [
    ([("sources.list", ONE_LINE)], "http://mirror.example/debian"),
    ([("debian.sources", DEB822)], "http://mirror.example/debian"),
    # the security archive alone is no mirror for kernel trees or images
    ([("sources.list", _text("deb http://security.example/debian-security trixie-security main",
                             "deb http://security.example/ bookworm-security main",
                             "deb http://security.example/debian-security buster/updates main"))],
     ""),
    ([("debian.sources", _text("Types: deb", "URIs: http://s.example/debian-security",
                               "Suites: trixie-security"))], ""),
    # cdrom: is not a network mirror; apt's bracket quoting keeps its label one word
    ([("sources.list", _text("deb cdrom:[Debian GNU/Linux 13.0.0 _Trixie_ - Official amd64 DVD"
                             " Binary-1 20250809-11:22]/ trixie contrib main"))], ""),
    ([("sources.list", _text("deb cdrom:[Debian 13]/ trixie main",
                             "deb http://mirror.example/debian trixie main"))],
     "http://mirror.example/debian"),
    # deb-src, comments and commented-out lines never count
    ([("sources.list", _text("#deb http://old.example/debian trixie main",
                             "deb-src http://src.example/debian trixie main"))], ""),
    # a path ending in /debian is preferred, wherever it is; else the first mirror
    ([("sources.list", "deb http://proxy.example:3142/pub trixie main\n"),
      ("debian.sources", _text("Types: deb", "URIs: http://mirror.example/debian/",
                               "Suites: trixie"))],
     "http://mirror.example/debian"),
    ([("sources.list", _text("deb http://first.example/pub/ trixie main",
                             "deb https://second.example/archive trixie main"))],
     "http://first.example/pub"),
    # the first of several /debian mirrors, in apt's file order
    ([("a.list", "deb [signed-by=/k.gpg] https://a.example/debian trixie main\n"),
      ("b.sources", _text("Types: deb", "URIs: http://b.example/debian http://c.example/debian",
                          "Suites: trixie"))], "https://a.example/debian"),
    ([("b.sources", _text("Types: deb", "URIs: http://b.example/debian http://c.example/debian",
                          "Suites: trixie"))], "http://b.example/debian"),
    ([("local.list", "deb file:/srv/mirror/debian trixie main\n")], "file:/srv/mirror/debian"),
    ([("x.list", "deb mirror+file:/etc/apt/mirrors.txt trixie main\n")], ""),
    ([], ""),
])
def test_debian_mirror(files: list[tuple[str, str]], mirror: str) -> None:
    assert debian_mirror(files) == mirror


def _apt(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "etc" / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_apt_files_in_apt_order(tmp_path: Path) -> None:
    root = _apt(tmp_path, {
        "sources.list": "deb http://list.example/pub trixie main\n",
        "sources.list.d/b.sources": "Types: deb\nURIs: http://b.example/debian\nSuites: x\n",
        "sources.list.d/a.list": "deb http://a.example/debian trixie main\n",
        "sources.list.d/c.list.disabled": "deb http://c.example/debian trixie main\n",
        "sources.list.d/d.list.save": "deb http://d.example/debian trixie main\n",
    })
    assert [name for name, _ in apt_files(root)] == ["sources.list", "a.list", "b.sources"]
    assert host_debian_mirror(root) == "http://a.example/debian"
    assert host_debian_mirror(tmp_path / "nothing") == ""


def test_load_global_takes_the_host_mirror_unless_set(tmp_path: Path) -> None:
    root = _apt(tmp_path / "root", {"sources.list.d/debian.sources": DEB822})
    env = {"STAPFARM_CONFIG_FILE": "", "HOME": str(tmp_path)}
    assert load_global([], env, euid=1000, apt_root=str(root)).debian_mirror == \
        "http://mirror.example/debian"
    conf = tmp_path / "stap-server"
    conf.write_text("DEBIAN_MIRROR=https://set.example/debian/\n")
    assert load_global([str(conf)], env, euid=1000, apt_root=str(root)).debian_mirror == \
        "https://set.example/debian"
    conf.write_text("DEBIAN_MIRROR=\n")  # empty keeps the default: the host's
    assert load_global([str(conf)], env, euid=1000, apt_root=str(root)).debian_mirror == \
        "http://mirror.example/debian"
    assert load_global([], env, euid=1000, apt_root=str(tmp_path / "none")).debian_mirror == ""


def test_hint_names_the_variable_and_file() -> None:
    assert "DEBIAN_MIRROR" in HINT and "/etc/sysconfig/stap-server" in HINT
