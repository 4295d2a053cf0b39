"""`stap-server compose` without --lab: the configured servers (CONFIG_PATH/*.conf) as a
compose farm, each server service what `stap-server start` would run for it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from farm.core import labels
from farm.core.arch import X86_64
from farm.core.spec import Strategy
from farm.engine.specs import LOG, config_from_json
from farm.manual.cli import main
from farm.manual.compose_farm import farm_documents
from farm.manual.compose_lab import FILES


def _farm(tmp_path: Path, confs: dict[str, str]) -> tuple[dict[str, str], Path]:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    for name, text in confs.items():
        (conf_d / name).write_text(text)
    gfile = tmp_path / "global"
    gfile.write_text(f"CONFIG_PATH={conf_d}\nSTAT_PATH={tmp_path}/run\n"
                     f"LOG_FILE={tmp_path}/log\nSTATE_DIR={tmp_path}/state\n")
    return {"STAPFARM_CONFIG_FILE": str(gfile), "HOME": str(tmp_path)}, gfile


def _compose(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(["compose", *argv], environ=env, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_configured_servers_become_services(tmp_path: Path) -> None:
    env, _ = _farm(tmp_path, {
        "build.conf": "ARCH=x86_64\nRELEASE=6.12.9-amd64\nNICKNAME=build\nPORT=7001\n",
        "arm.conf": "ARCH=arm64\nRELEASE=6.12.9-arm64\nPORT=7002\nSTRATEGY=cross\n"})
    rc, out, err = _compose(env)
    assert rc == 0, err
    doc = yaml.safe_load(out)
    servers = {n: s for n, s in doc["services"].items()
               if s["labels"].get(labels.KIND) == "server"}
    assert sorted(servers) == ["arm64-7002", "build"]
    build = servers["build"]
    assert build["command"][:4] == ["-a", "x86_64", "-r", "6.12.9-amd64"]
    assert "--port" in build["command"] and "7001" in build["command"]
    assert build["ports"][0]["published"] == build["ports"][0]["target"] == 7001  # ints: a stack needs them
    cfg = config_from_json(build["labels"][labels.CONFIG])
    assert (cfg.arch, cfg.releases, cfg.port, cfg.nickname, cfg.log) == (
        "x86_64", ("6.12.9-amd64",), 7001, "build", LOG)
    assert cfg.source.endswith("build.conf")
    arm = servers["arm64-7002"]
    assert "CROSS_COMPILE=aarch64-linux-gnu-" in arm["command"]
    assert arm["labels"][labels.STRATEGY] == Strategy.CROSS.value
    # the same hardening as the lab farm's servers
    for svc in servers.values():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert svc["ipc"] == "none" and svc["security_opt"] == ["no-new-privileges"]
    assert {"init", "advertiser", "endpoint", "endpoint-broker"} <= set(doc["services"])
    assert "kernels-amd64" in doc["volumes"] and "kernels-arm64" not in doc["volumes"]


def test_files_are_written_with_their_override(tmp_path: Path) -> None:
    env, _ = _farm(tmp_path, {"a.conf": "ARCH=x86_64\nRELEASE=6.12.9-amd64\nPORT=7001\n"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = _compose(env, "-o", str(out_dir))
    assert rc == 0, err
    override = yaml.safe_load((out_dir / FILES[1]).read_text().replace("!reset", ""))
    assert override["services"]["x86_64-7001"]["depends_on"] == {
        "init": {"condition": "service_completed_successfully"}}


@pytest.mark.parametrize("conf,expected", [
    ("ARCH=x86_64\nRELEASE=/usr/src/linux\nPORT=7001\n", "is a build tree on this host"),
    ("ARCH=x86_64\nRELEASE=6.12.9-amd64\n", "has no port"),
    ("ARCH=x86_64\nRELEASE=6.12.9-amd64\nPORT=7001\nINCLUDE=/srv/tapsets\n",
     "-I/-R name directories on this host"),
])
def test_what_a_compose_farm_cannot_run_is_one_line_naming_the_file(
        tmp_path: Path, conf: str, expected: str) -> None:
    env, _ = _farm(tmp_path, {"bad.conf": conf})
    rc, out, err = _compose(env)
    assert rc != 0 and out == ""
    assert err.startswith("stap-server: ") and "bad.conf" in err and expected in err, err
    assert "Traceback" not in err


def test_names_stay_unique() -> None:
    from farm.core.spec import ServerConfig
    from farm.manual.compose_lab import lab_global
    cfgs = [ServerConfig(arch="x86_64", releases=("6.12.9-amd64",), user="stap-server",
                         nickname="n", port=p, source=f"{p}.conf") for p in (7001, 7002)]
    base, _ = farm_documents(list(cfgs), lab_global(), X86_64)
    assert {"n", "n-2"} <= set(base["services"])


def test_lab_reads_no_configuration(tmp_path: Path) -> None:
    env, gfile = _farm(tmp_path, {})
    rc, _, err = _compose(env, "--lab", "-c", str(gfile))
    assert rc == 2 and "--lab reads no configuration" in err
