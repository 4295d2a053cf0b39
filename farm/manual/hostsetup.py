"""Host set-up steps that are easier in Python than in scripts/setup.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from farm.core.arch import Arch
from farm.core.errors import FarmError
from farm.core.spec import GlobalConfig
from farm.kernels.debian import Mirror, iter_data_members
from farm.manual.config import load_global

PLUGIN_DIR = Path("/usr/local/lib/docker/cli-plugins")
UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "stap-server.service"
BIN_LINK = Path("/usr/local/bin/stap-server")
COMPOSE_MEMBER = "./usr/libexec/docker/cli-plugins/docker-compose"


def install_compose_plugin(gcfg: GlobalConfig, suite: str = "trixie") -> Path:
    """Install the compose v2 CLI plugin from SUITE's docker-compose package on GCFG's mirror.

    Bookworm has no compose v2; trixie's package ships a static Go binary that runs on it.

    Raises:
        FarmError: no mirror, the mirror cannot be verified, or it lacks the package.
    """
    arch = Arch.host()
    mirror = Mirror.from_config(gcfg, Path("/var/cache/stapfarm"))
    pkg = next((p for p in mirror.packages(suite, arch.debian) if p.name == "docker-compose"),
               None)
    if pkg is None:
        raise FarmError(f"{suite} on {mirror.url} has no docker-compose package")
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    target = PLUGIN_DIR / "docker-compose"
    tmp = target.with_suffix(".tmp")
    with mirror.open_deb(pkg) as raw:
        for info, data in iter_data_members(raw, pkg):
            if info.name == COMPOSE_MEMBER and data is not None:
                tmp.write_bytes(data.read())
    if not tmp.exists():
        raise FarmError(f"{pkg.filename} has no {COMPOSE_MEMBER}")
    os.chmod(tmp, 0o755)
    tmp.replace(target)
    return target


def unit_text(exe: str) -> str:
    """The systemd unit `stap-server.service` for the farm's command EXE: as upstream's, a
    unit that runs `stap-server start` (the configured servers, else the manual's default)
    at boot and `stap-server stop` at shutdown, after the Docker engine."""
    return f"""[Unit]
Description=Systemtap compile server farm (stapfarm: stap-server in Docker containers)
Requires=docker.service
After=docker.service network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={exe} start
ExecStop={exe} stop
ExecReload={exe} condrestart
# `start` may build an image or fetch a kernel tree the first time
TimeoutStartSec=900

[Install]
WantedBy=multi-user.target
"""


def install_service(exe: Path, unit_dir: Path = UNIT_DIR, bin_link: Path = BIN_LINK,
                    systemd_running: bool | None = None) -> list[str]:
    """Put EXE on PATH (a symbolic link BIN_LINK) and write UNIT_DIR/stap-server.service;
    enable it when systemd runs. Idempotent. Returns what was done, one line each.

    Raises:
        FarmError: EXE is missing, or BIN_LINK is something other than a link.
    """
    if not os.access(exe, os.X_OK):
        raise FarmError(f"{exe} is not an executable; run make setup first")
    done: list[str] = []
    if bin_link.is_symlink() or not bin_link.exists():
        if not (bin_link.is_symlink() and os.readlink(bin_link) == str(exe)):
            bin_link.parent.mkdir(parents=True, exist_ok=True)
            tmp = bin_link.with_name(bin_link.name + ".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(exe)
            tmp.replace(bin_link)
            done.append(f"{bin_link} -> {exe} (stap-server is on PATH)")
    else:
        raise FarmError(f"{bin_link} exists and is not a link to {exe}; remove it or run "
                        f"{exe} directly")
    unit = unit_dir / UNIT_NAME
    text = unit_text(str(bin_link))
    if unit.exists() and unit.read_text() == text:
        return done  # installed earlier (and said so then)
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit.write_text(text)
    done.append(f"wrote {unit}")
    if systemd_running is None:
        systemd_running = Path("/run/systemd/system").is_dir()
    if systemd_running:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", UNIT_NAME]):
            got = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if got.returncode != 0:
                raise FarmError(f"{' '.join(cmd)} failed: {got.stderr.strip()}")
        done.append(f"enabled {UNIT_NAME} (service stap-server start|stop|status)")
    else:
        done.append(f"systemd is not running on this host: {unit} is installed for when it "
                    "does; meanwhile use stap-server start|stop|status directly")
    return done


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "service":
        try:
            lines = install_service(Path(argv[1]).absolute())
        except (FarmError, OSError) as e:
            print(f"setup: {e}", file=sys.stderr)
            return 1
        for line in lines:
            print(f"setup: {line}")
        return 0
    if argv == ["compose-plugin"]:
        try:
            path = install_compose_plugin(load_global([], os.environ))
        except FarmError as e:
            print(f"setup: {e}", file=sys.stderr)
            return 1
        print(f"setup: installed the compose plugin at {path}")
        return 0
    print("usage: python -m farm.manual.hostsetup compose-plugin | service EXE",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
