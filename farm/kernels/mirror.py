"""The Debian mirror the farm uses when DEBIAN_MIRROR is not set: the host's apt configuration.

The farm writes no package host's address of its own. `debian_mirror(files)` is pure: it takes
the texts of apt's source files (one-line `sources.list` format and deb822 `.sources`) in the
order apt reads them and returns the first `deb` URI that serves Debian's main archive.
`host_debian_mirror()` reads the real files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from debian.deb822 import Deb822

HINT = "set DEBIAN_MIRROR=<URL of a Debian mirror> in /etc/sysconfig/stap-server"
_SCHEMES = ("http://", "https://", "file:/")  # what DEBIAN_MIRROR accepts (farm/config.py)


@dataclass(frozen=True)
class AptSource:
    """One `deb` or `deb-src` source: a URI and the suites read from it."""

    kind: str  # deb, deb-src
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _words(line: str) -> list[str]:
    """Split LINE as apt does: `[...]` and `"..."` keep their spaces (options, cdrom: URIs),
    and `#` outside them starts a comment."""
    words: list[str] = []
    word = ""
    close = ""
    for ch in line:
        if close:
            word += ch
            if ch == close:
                close = ""
        elif ch == "#":
            break
        elif ch in "[\"":
            word += ch
            close = "]" if ch == "[" else "\""
        elif ch.isspace():
            if word:
                words.append(word)
            word = ""
        else:
            word += ch
    if word:
        words.append(word)
    return words


def parse_one_line(text: str) -> Iterator[AptSource]:
    """The sources of a `sources.list`-format TEXT (`deb [OPTIONS] URI SUITE [COMPONENT...]`)."""
    for raw in text.splitlines():
        words = _words(raw)
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        kind, rest = words[0], words[1:]
        if rest[0].startswith("["):  # [arch=amd64 signed-by=...]
            rest = rest[1:]
        if len(rest) >= 2:
            yield AptSource(kind, rest[0], (rest[1],), tuple(rest[2:]))


def parse_deb822(text: str) -> Iterator[AptSource]:
    """The sources of a deb822 `.sources` TEXT (`Types:`, `URIs:`, `Suites:`, `Components:`)."""
    for para in Deb822.iter_paragraphs(text.splitlines()):
        if para.get("Enabled", "yes").strip().lower() == "no":
            continue
        suites = tuple(para.get("Suites", "").split())
        components = tuple(para.get("Components", "").split())
        for kind in para.get("Types", "").split():
            for uri in para.get("URIs", "").split():
                yield AptSource(kind, uri, suites, components)


def parse_sources(name: str, text: str) -> list[AptSource]:
    """The sources of apt file NAME (deb822 when it ends in `.sources`)."""
    return list(parse_deb822(text) if name.endswith(".sources") else parse_one_line(text))


def _is_security(source: AptSource) -> bool:
    """Debian's security archive: `.../debian-security`, or only `-security` suites."""
    if source.uri.rstrip("/").endswith("-security"):
        return True
    return bool(source.suites) and all(s.endswith(("-security", "/updates"))
                                       for s in source.suites)


def debian_mirror(files: Iterable[tuple[str, str]]) -> str:
    """The first `deb` URI of FILES ((name, text), in apt's order) serving Debian's archive.

    Security archives are skipped; a URI whose path ends in `/debian` is preferred to one that
    does not. "" when none qualifies (no http(s)/file source: cdrom:, none at all).
    """
    candidates = [s.uri.rstrip("/") for name, text in files for s in parse_sources(name, text)
                  if s.kind == "deb" and s.uri.startswith(_SCHEMES) and not _is_security(s)]
    return next((u for u in candidates if u.endswith("/debian")),
                candidates[0] if candidates else "")


def apt_files(root: str | Path = "/") -> list[tuple[str, str]]:
    """(name, text) of apt's source files under ROOT, in the order apt reads them.

    `etc/apt/sources.list`, then `etc/apt/sources.list.d/*.list` and `*.sources` by name.
    Unreadable files are left out (apt would complain about them itself).
    """
    etc_apt = Path(root) / "etc" / "apt"
    listed = etc_apt / "sources.list.d"
    try:
        names = sorted(n for n in os.listdir(listed) if n.endswith((".list", ".sources")))
    except OSError:
        names = []
    out: list[tuple[str, str]] = []
    for path in [etc_apt / "sources.list"] + [listed / n for n in names]:
        try:
            out.append((path.name, path.read_text("utf-8", "replace")))
        except OSError:
            continue
    return out


def host_debian_mirror(root: str | Path = "/") -> str:
    """The Debian mirror of the host's apt configuration under ROOT, "" when it names none."""
    return debian_mirror(apt_files(root))
