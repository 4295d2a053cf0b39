"""Writing to the user's terminal: `stap-server: ...` lines, and streams that show what they
cannot encode as `\\xNN` instead of raising."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO, cast

from farm.manual.render import PROG


def report(err: TextIO, text: str) -> None:
    """Write TEXT to ERR as `stap-server: ...` lines, one per line of TEXT."""
    err.writelines(f"{PROG}: {line}\n" for line in text.splitlines() or [""])


class Printable:
    """A text stream that escapes what it cannot encode instead of raising.

    Command-line values and file names are bytes decoded with surrogateescape, so a value
    echoed in an error or a `Starting` line need not be UTF-8 (`-n $'\\xff'`); its bytes
    are shown as `\\xff`.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        encoding = getattr(self._stream, "encoding", None) or "utf-8"
        try:
            text.encode("utf-8")  # sys.stderr would print a surrogate as \udcff: show \xff
        except UnicodeEncodeError:
            return self._stream.write(_escaped(text, encoding))
        try:
            return self._stream.write(text)
        except UnicodeEncodeError:  # a terminal that is not UTF-8
            return self._stream.write(_escaped(text, encoding))

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno...: the stream's own
        return getattr(self._stream, name)


def printable(stream: TextIO) -> TextIO:
    """STREAM as a `Printable` (once)."""
    # Printable has TextIO's methods by delegation, which mypy cannot see
    return stream if isinstance(stream, Printable) else cast(TextIO, Printable(stream))


def _escaped(text: str, encoding: str) -> str:
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    readable = raw.decode("utf-8", "backslashreplace")
    return readable.encode(encoding, "backslashreplace").decode(encoding, "replace")
