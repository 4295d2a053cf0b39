"""Upstream-compatible status files: `<STAT_PATH>/<pid>.stat`, one per running server.

The backend's labels are the truth about what runs; these files only let tools written for
upstream `stap-server` (which read `STAT_PATH`) keep working. Same syntax as a server
`.conf` and the exact line order upstream's `start_server` writes.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable

from farm.core.backend import RunningServer
from farm.core.errors import FarmError
from farm.core.spec import ServerConfig
from farm.manual.server_config import ServerDraft, parse_server_text

_STAT_NAME = re.compile(r"([0-9]+)\.stat")


def render(config: ServerConfig, pid: int) -> str:
    """The stat file of CONFIG running as PID (NICKNAME defaults to the PID, as upstream)."""

    def opt(n: int | None) -> str:
        return "" if n is None else str(n)

    lines = [f"ARCH={config.arch}", f"USER={config.user}"]
    lines += [f"BUILD+={b}" for b in config.build]
    lines += [f"INCLUDE+={i}" for i in config.include]
    lines += [f"DEFINE+={d}" for d in config.define]
    lines.append(f"NICKNAME={config.nickname or pid}")
    lines.append(f"RUNTIME={config.runtime}")
    lines += [f"RELEASE+={r}" for r in config.releases]
    lines += [f"LOG={config.log}", f"PORT={opt(config.port)}", f"SSL={config.ssl}",
              f"MAXTHREADS={opt(config.max_threads)}",
              f"MAXREQSIZE={opt(config.max_request_size)}",
              f"MAXCOMPRESSEDREQ={opt(config.max_compressed_request)}"]
    return "\n".join(lines) + "\n"


def parse(text: str, path: str) -> ServerDraft:
    """Read a stat file back; a NICKNAME equal to the file's PID means "no nickname".

    Raises:
        ConfigError: the file is not a valid stat file.
    """
    draft = parse_server_text(text, path)
    m = _STAT_NAME.fullmatch(os.path.basename(path))
    if m and draft.nickname == m.group(1):
        draft.nickname = None
    return draft


def write_atomic(path: str, text: str) -> None:
    """Write TEXT to PATH through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        # surrogateescape: a path from the environment is bytes, written back as they were
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_dir(stat_path: str) -> None:
    """Create STAT_PATH.

    Raises:
        FarmError: it cannot be created (upstream's `Failed to make stat directory`).
    """
    try:
        os.makedirs(stat_path, exist_ok=True)
    except OSError as e:
        raise FarmError(f"Failed to make stat directory ({stat_path}): {e.strerror or e}") from e


def sync(stat_path: str, servers: Iterable[RunningServer]) -> None:
    """Make STAT_PATH hold exactly one stat file per running server; remove the others.

    Raises:
        OSError: the directory cannot be written.
    """
    wanted = {s.pid: render(s.config, s.pid) for s in servers if s.running and s.pid > 0}
    try:
        names = os.listdir(stat_path)
    except FileNotFoundError:
        if not wanted:
            return
        os.makedirs(stat_path, exist_ok=True)
        names = []
    for name in names:
        m = _STAT_NAME.fullmatch(name)
        if m and int(m.group(1)) not in wanted:
            try:
                os.unlink(os.path.join(stat_path, name))
            except FileNotFoundError:
                pass
    for pid, text in wanted.items():
        path = os.path.join(stat_path, f"{pid}.stat")
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        write_atomic(path, text)
