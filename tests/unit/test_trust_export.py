"""`stap-server trust --export` (farm/trust.py): the host name is written into file names and
into a script users run as root, so only a DNS name gets through (issue 15, finding 9)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from farm.core.errors import FarmError
from farm.trust import store as trust
from tests.support.endpoint_fakes import der, make_identity


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> trust.ServerCert:
    pem, _ = make_identity(tmp_path_factory.mktemp("cert"))
    return trust.ServerCert(der=der(pem), serial=0xCC23FD50, servers=("x",))


@pytest.mark.parametrize("host", ["farmhost", "farm-01.lab.example", "a", "x" * 63])
def test_dns_names_are_exported(host: str, tmp_path: Path, cert: trust.ServerCert) -> None:
    written = trust.export([cert], tmp_path / "out", host)
    assert {p.parent for p in written} == {tmp_path / "out"}
    script = (tmp_path / "out" / trust.SCRIPT).read_text()
    assert f"on {host}:" in script
    assert subprocess.run(["sh", "-n", str(tmp_path / "out" / trust.SCRIPT)],
                          check=False).returncode == 0


@pytest.mark.parametrize("host", [
    "../../etc/cron.d/x", "a/b", "host\nrm -rf /", 'h"; touch /tmp/p; "', "$(id)", "`id`",
    "-rf", "", "x" * 64, "a..b", "host name", "h\x00",
])
def test_anything_else_is_refused_before_a_file_is_written(host: str, tmp_path: Path,
                                                          cert: trust.ServerCert) -> None:
    with pytest.raises(FarmError, match="is not a DNS name"):
        trust.export([cert], tmp_path / "out", host)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*"))
