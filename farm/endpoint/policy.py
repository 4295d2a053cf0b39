"""What the endpoint lets through from the network (ENDPOINT_POLICY), checked before routing.

Defence in depth, not the key's protection: the farm's key is not in any server container
(farm/endpoint/__init__.py), so no script can read it whatever this lets through. The policy
narrows what an anonymous client can make a server do:

- guru mode (`-g`, `--guru-mode`): embedded C in the script; refused unless `allow-guru`;
- absolute paths in options (`-I/etc`, `-R /x`, `-o /x`, a script file `/etc/passwd`, ...):
  a real client never sends them (it ships `-I` directories and scripts inside the request,
  as `tapset/...` and `script/...`); they make the server's stap read or write the server's
  own files; refused unless `allow-absolute-paths`.

A refusal is one line the client prints after `Server: `.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ALLOW_GURU = "allow-guru"
ALLOW_ABSOLUTE = "allow-absolute-paths"
# stap options that make the translator read or write a path at compile time (attached,
# `-I/x`, or as the next element, `-I /x`). Pass-5 options (`-c CMD`, `-o FILE`) only travel
# back to the client's staprun and stay allowed.
_PATH_SHORT = ("-I", "-R", "-r")
_PATH_LONG = ("--tmpdir", "--sysroot", "--runtime", "--sign-module")


@dataclass(frozen=True)
class Policy:
    allow_guru: bool = False
    allow_absolute_paths: bool = False

    @classmethod
    def parse(cls, words: Iterable[str]) -> Policy:
        """The policy of ENDPOINT_POLICY's words (validated by the configuration loader)."""
        w = set(words)
        return cls(allow_guru=ALLOW_GURU in w, allow_absolute_paths=ALLOW_ABSOLUTE in w)

    def refusal(self, argv: Iterable[str]) -> str:
        """Why a request with ARGV is refused ("" when it may go on)."""
        options = list(_options(argv))
        if not self.allow_guru and any(a in ("-g", "--guru-mode") or _short_flags(a, "g")
                                       for a in options):
            return ("guru mode (-g) is refused by this farm's endpoint (ENDPOINT_POLICY); "
                    "ask its operator, or compile without -g")
        if not self.allow_absolute_paths:
            bad = _absolute_path(options)
            if bad:
                shown = bad if len(bad) <= 60 else bad[:60] + "..."
                return (f"option {shown!r} names a path on the compile server, which this "
                        "farm's endpoint refuses (ENDPOINT_POLICY); send files with the "
                        "request (stap does this for -I directories and script files)")
        return ""


def _options(argv: Iterable[str]) -> Iterable[str]:
    """The argv elements before the first `--` (script arguments follow it)."""
    for arg in argv:
        if arg == "--":
            return
        yield arg


def _short_flags(arg: str, letter: str) -> bool:
    """Whether ARG is a cluster of short flags containing LETTER (`-vg`); stap's getopt
    accepts clusters of its argument-less options."""
    if not arg.startswith("-") or arg.startswith("--") or len(arg) < 3:
        return False
    flags = arg[1:]
    # Stop at the first letter that takes a value: the rest is that value (`-e...g...`).
    for c in flags:
        if c == letter:
            return True
        if c in "IRoSrcDBeaxmLlpsdx":
            return False
    return False


def _absolute_path(options: list[str]) -> str:
    """The first option element that names an absolute path ("" when none)."""
    for i, arg in enumerate(options):
        if not arg.startswith("-"):
            if arg.startswith("/"):
                return arg  # a script file named by its path on the server
            continue
        for opt in _PATH_SHORT:
            if arg == opt:
                value = options[i + 1] if i + 1 < len(options) else ""
                if value.startswith("/"):
                    return f"{arg} {value}"
            elif arg.startswith(opt) and arg[len(opt):].startswith("/"):
                return arg
        for opt in _PATH_LONG:
            if arg == opt:
                value = options[i + 1] if i + 1 < len(options) else ""
                if value.startswith("/"):
                    return f"{arg} {value}"
            elif arg.startswith(opt + "=") and arg[len(opt) + 1:].startswith("/"):
                return arg
    return ""
