"""[service] stap-server: the command on PATH and the systemd unit (farm/manual/hostsetup.py).

The unit is checked by systemd's own parser (`systemd-analyze verify`) and its commands are
run as systemd would run them, from another directory."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farm.core.errors import FarmError
from farm.manual.hostsetup import UNIT_NAME, install_service, unit_text


def _exe(tmp_path: Path) -> Path:
    """The venv's stap-server (what make setup links)."""
    exe = Path(sys.executable).with_name("stap-server")
    if not exe.exists():
        pytest.skip("stap-server is not installed in this environment")
    return exe


def test_install_links_the_command_and_writes_the_unit_once(tmp_path: Path) -> None:
    exe = _exe(tmp_path)
    link, units = tmp_path / "bin" / "stap-server", tmp_path / "units"
    first = install_service(exe, units, link, systemd_running=False)
    assert os.readlink(link) == str(exe)
    assert (units / UNIT_NAME).read_text() == unit_text(str(link))
    assert any("systemd is not running" in line for line in first)
    assert install_service(exe, units, link, systemd_running=False) == []  # said once


def test_install_refuses_to_replace_a_file_that_is_not_its_link(tmp_path: Path) -> None:
    exe = _exe(tmp_path)
    link = tmp_path / "stap-server"
    link.write_text("#!/bin/sh\n")
    with pytest.raises(FarmError, match="is not a link"):
        install_service(exe, tmp_path / "units", link, systemd_running=False)


def test_unit_runs_start_and_stop_after_docker() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(unit_text("/usr/local/bin/stap-server"))
    assert unit["Service"]["ExecStart"] == "/usr/local/bin/stap-server start"
    assert unit["Service"]["ExecStop"] == "/usr/local/bin/stap-server stop"
    assert "docker.service" in unit["Unit"]["After"].split()
    assert unit["Unit"]["Requires"] == "docker.service"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    exe = _exe(tmp_path)
    unit = tmp_path / UNIT_NAME
    unit.write_text(unit_text(str(exe)))
    got = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, check=False)
    # docker.service may be absent where the test runs; anything else is the unit's fault
    problems = [line for line in got.stderr.splitlines()
                if line.strip() and "docker.service" not in line]
    assert problems == [], got.stderr


def test_the_units_commands_work_from_another_directory(tmp_path: Path) -> None:
    exe = _exe(tmp_path)
    got = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False,
                         cwd="/")
    assert got.returncode == 0 and "Usage: stap-server" in got.stdout, got.stderr
