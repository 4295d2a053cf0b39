"""Host set-up steps that are easier in Python than in scripts/setup.sh."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from farm.core.arch import Arch
from farm.core.errors import FarmError
from farm.core.spec import GlobalConfig
from farm.kernels.debian import Mirror, iter_data_members
from farm.manual.config import load_global

PLUGIN_DIR = Path("/usr/local/lib/docker/cli-plugins")
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


def main(argv: list[str]) -> int:
    if argv == ["compose-plugin"]:
        try:
            path = install_compose_plugin(load_global([], os.environ))
        except FarmError as e:
            print(f"setup: {e}", file=sys.stderr)
            return 1
        print(f"setup: installed the compose plugin at {path}")
        return 0
    print("usage: python -m farm.manual.hostsetup compose-plugin", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
