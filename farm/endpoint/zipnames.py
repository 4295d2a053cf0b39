"""Zip entry names: which are safe to extract, which clash, and how to quote them.

Pure and shared: the strict reader (farm/endpoint/zipheaders.py) refuses what these
functions flag, and the writer (farm/endpoint/zipwrite.py) refuses to write it, so that
whatever the farm encodes it would also accept.
"""

from __future__ import annotations

import bisect

SHOW_MAX = 60  # characters of client data quoted in a message
UNIX = 3  # "version made by" host: names are raw bytes for unzip, not an OEM code page


def show(text: str) -> str:
    """Client-supplied text quoted for a one-line message: shortened, escapes visible."""
    if len(text) > SHOW_MAX:
        text = text[:SHOW_MAX] + "..."
    return repr(text)


def file_dir_clash(names: set[str]) -> str | None:
    """The first file name that another name uses as a directory, or None."""
    ordered = sorted(names)
    for name in ordered:
        if name.endswith("/"):
            continue
        i = bisect.bisect_left(ordered, name + "/")  # names under name/ sort right there
        if i < len(ordered) and ordered[i].startswith(name + "/"):
            return name
    return None


def unsafe_name(name: str) -> str:
    """Why an entry name is unsafe to extract, or "" when it is fine."""
    if not name:
        return "empty name"
    if "\0" in name:
        return "NUL in name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        return "'..' component"
    if "." in parts or "" in parts:
        return "empty or '.' component"
    return ""
