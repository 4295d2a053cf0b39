"""Drive the farm's `stap-server` in-process against the real engine, for end-to-end tests."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.manual.cli import main
from farm.trust import tls as tlsprobe
from tests.support.client import authorize_cert, client_stap

CERT = "state/home/stap-server/.systemtap/ssl/server/stap.cert"
FARM_CERT = "state/endpoint/identity/stap.cert"  # the farm's identity: what the endpoint shows


@dataclass
class Farm:
    """A farm with private CONFIG_PATH/STAT_PATH/LOG_FILE/STATE_DIR under ROOT, and a client."""

    env: dict[str, str]
    root: Path
    client: Any  # the stap client container
    host: str  # the name the client uses for the farm
    releases: dict[str, str]

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stderr(err):
            rc = main(list(argv), environ=self.env, stdout=out, stderr=err)
        return rc, out.getvalue(), err.getvalue()

    def status(self) -> list[dict[str, Any]]:
        _, out, _ = self.run("status", "--json")
        servers: list[dict[str, Any]] = json.loads(out)["servers"]
        return servers

    def server(self, nickname: str) -> dict[str, Any]:
        return next(s for s in self.status() if s["nickname"] == nickname)

    def stap(self, server: dict[str, Any], args: list[str], files: dict[str, str] | None = None,
             host: str | None = None) -> tuple[int, str, dict[str, bytes]]:
        arch = server["config"]["arch"]
        rel = server["config"]["releases"][0]
        return client_stap(self.client, [f"--use-server={host or self.host}:{server['port']}",
                                         "-a", arch, "-r", rel, "-p4", *args], files)

    def cert(self) -> bytes:
        """The servers' certificate (the server user's database): direct connections."""
        return (self.root / CERT).read_bytes()

    def farm_cert(self) -> bytes:
        """The farm's identity (DER): what the endpoint presents and signs with."""
        return (self.root / FARM_CERT).read_bytes()

    def start_trusted(self, nickname: str, arch: str = "x86_64") -> None:
        """`start -a ARCH -r <the farm's release> -n NICKNAME` (asserted OK), then the client
        trusts the farm's certificate."""
        rel = self.releases["arm64" if arch in ("aarch64", "arm64") else arch]
        rc, out, err = self.run("start", "-a", arch, "-r", rel, "-n", nickname)
        assert rc == 0, out + err
        authorize_cert(self.client, self.cert())

    def answering_again(self, nickname: str, old_pid: int) -> dict[str, Any] | None:
        """NICKNAME's status entry once it runs with a daemon other than OLD_PID and
        completes a TLS handshake; None until then (for a deadline poll)."""
        s = self.server(nickname)
        if s["state"] != "running" or s["pid"] in (0, old_pid):
            return None
        try:
            tlsprobe.probe("127.0.0.1", s["port"], timeout=2)
        except Exception:  # noqa: BLE001 - not answering yet
            return None
        return s


def private_environ(root: Path, farm_environ: dict[str, str], extra: str = "") -> dict[str, str]:
    """FARM_ENVIRON with a global file of its own: the session's, then private
    CONFIG_PATH/STAT_PATH/LOG_FILE/STATE_DIR under ROOT, then EXTRA lines (later lines win)."""
    for sub in ("conf.d", "run", "log", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    base = Path(farm_environ["STAPFARM_CONFIG_FILE"]).read_text()
    gfile = root / "global"
    gfile.write_text(base + f"\nCONFIG_PATH={root}/conf.d\nSTAT_PATH={root}/run\n"
                     f"LOG_FILE={root}/log/stap-server.log\nSTATE_DIR={root}/state\n" + extra)
    return dict(farm_environ, STAPFARM_CONFIG_FILE=str(gfile))


def make_farm(root: Path, farm_environ: dict[str, str], client: Any, host: str,
              releases: dict[str, str], extra: str = "") -> Farm:
    """A Farm whose global file is private_environ's (EXTRA: more global lines)."""
    env = private_environ(root, farm_environ, extra)
    return Farm(env=env, root=root, client=client, host=host, releases=releases)
