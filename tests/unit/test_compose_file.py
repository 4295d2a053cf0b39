"""compose.yaml and compose.override.yaml: generated from the farm's container specs
(farm/manual/compose_lab.py through farm/engine/compose.py), checked in, and equal to
what `stap-server start` runs."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from docker.types import Mount

from farm.core import labels
from farm.core.spec import ServerConfig, Strategy
from farm.engine.compose import (
    ComposeError,
    IntVar,
    Reset,
    StrVar,
    dump,
    json_with_vars,
    script,
    service,
)
from farm.engine.specs import config_from_json
from farm.manual.cli import main
from farm.manual.compose_lab import FILES, TARGETS, lab_files, lab_global, target_spec

REPO = Path(__file__).resolve().parents[2]
REGENERATE = "python -m farm compose --lab -o . --force"
ENV = {"STAPFARM_RELEASE_X86_64": "6.12.1-amd64", "STAPFARM_RELEASE_ARM64": "6.12.1-arm64"}
_VAR = re.compile(r"\$\{(\w+):([-?])([^}]*)\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution of `${NAME:-DEFAULT}` / `${NAME:?MESSAGE}` (no `$$` here)."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        assert m.group(2) == "-", f"{m.group(1)} is required"
        return m.group(3)
    return _VAR.sub(one, text)


def checked_in() -> dict[str, Any]:
    return yaml.safe_load((REPO / FILES[0]).read_text())


@pytest.mark.parametrize("name", FILES)
def test_the_checked_in_files_are_the_generators_output(name: str) -> None:
    assert (REPO / name).read_text() == lab_files(build=True)[name], \
        f"{name} differs from what the specs generate: run `{REGENERATE}` (never edit it by hand)"


@pytest.mark.parametrize("t", TARGETS, ids=lambda t: t.name)
def test_each_server_service_is_what_server_spec_gives(t: Any) -> None:
    svc = checked_in()["services"][t.name]
    spec = target_spec(t, lab_global())
    for key in ("user", "hostname", "read_only", "cap_drop", "security_opt", "environment"):
        assert svc[key] == spec[key], key
    assert svc["command"] == [str(a) for a in spec["command"]]
    assert svc["ipc"] == spec["ipc_mode"] == "none"
    assert svc["restart"] == spec["restart_policy"]["Name"]
    mounts = [{"type": m["Type"], "source": m["Source"], "target": m["Target"],
               **({"read_only": True} if m["ReadOnly"] else {})} for m in spec["mounts"]]
    assert [v for v in svc["volumes"] if v["type"] != "tmpfs"] == mounts
    assert [v for v in svc["volumes"] if v["type"] == "tmpfs"] == [
        {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": 1 << 30}}]
    limits = svc["deploy"]["resources"]["limits"]
    assert limits == {"memory": spec["mem_limit"], "cpus": "${STAPFARM_CPUS:-2}",
                      "pids": spec["pids_limit"]}
    assert isinstance(limits["pids"], int)  # a literal: stack deploy needs one
    assert spec["nano_cpus"] == 2 * 10**9
    assert svc["healthcheck"]["test"] == spec["healthcheck"]["Test"]
    assert {k: v for k, v in svc["labels"].items() if k != labels.CONFIG} == \
        {k: str(v) for k, v in spec["labels"].items() if k != labels.CONFIG}
    assert svc["deploy"]["placement"]["constraints"] == [
        f"node.platform.arch == {'aarch64' if spec['platform'] == 'linux/arm64' else 'x86_64'}"]


@pytest.mark.parametrize("t", TARGETS, ids=lambda t: t.name)
def test_the_config_label_is_the_servers_configuration(t: Any) -> None:
    text = interpolate(checked_in()["services"][t.name]["labels"][labels.CONFIG],
                       {**ENV, "STAPFARM_AARCH64_PORT": "5999"})
    cfg = config_from_json(text)
    release = ENV["STAPFARM_RELEASE_X86_64" if t.arch.stap == "x86_64" else
                  "STAPFARM_RELEASE_ARM64"]
    assert cfg == ServerConfig(
        arch=t.arch.stap, releases=(release,), user="stap-server", nickname=t.nickname,
        log="/var/log/stapfarm/server.log", port=5101 if t.name == "x86_64" else 5999,
        max_request_size=64 << 20, max_compressed_request=16 << 20, strategy=t.strategy,
        source="compose.yaml")
    assert cfg.strategy is (Strategy.CROSS if t.name == "aarch64" else Strategy.NATIVE)


def test_the_header_names_every_variable_and_scripts_escape_the_shells_dollars() -> None:
    text = (REPO / FILES[0]).read_text()
    header = text.split("\nversion:", 1)[0]
    used = set(_VAR.findall(text.split("\nversion:", 1)[1]))
    assert {name for name, _, _ in used} - set(re.findall(r"STAPFARM_\w+", header)) == set()
    init = checked_in()["services"]["init"]["command"][0]
    assert "$$SERVER_UID" in init and not re.search(r"(?<!\$)\$(?!\$)", init)


def test_compose_only_keys_stay_in_the_override() -> None:
    base = (REPO / FILES[0]).read_text()
    for word in ("depends_on", "profiles", "network_mode", "!reset", "container_name"):
        assert word not in base.split("\nversion:", 1)[1], word
    override = yaml.safe_load((REPO / FILES[1]).read_text().replace("!reset", ""))
    assert override["services"]["advertiser"]["network_mode"] == "host"
    assert override["services"]["aarch64-native"]["profiles"] == ["arm64"]


def test_an_untranslatable_key_raises_instead_of_being_dropped() -> None:
    with pytest.raises(ComposeError, match="devices"):
        service({"image": "x", "devices": ["/dev/kvm"]})
    with pytest.raises(ComposeError, match="uid=1"):
        service({"image": "x", "tmpfs": {"/tmp": "rw,size=1m,uid=1"}})
    with pytest.raises(ComposeError, match="127.0.0.1"):
        service({"image": "x", "ports": {"5000/tcp": ("127.0.0.1", 5000)}})
    with pytest.raises(ComposeError, match="literal"):
        service({"image": "x", "pids_limit": IntVar("PIDS", 5)})
    with pytest.raises(ComposeError, match="BindOptions"):
        service({"image": "x", "mounts": [Mount("/a", "/b", type="bind", propagation="rshared")]})
    with pytest.raises(ComposeError, match="CPUS"):
        service({"image": "x", "nano_cpus": 10**9}, cpus=StrVar("CPUS", "2"))


def test_a_translated_service() -> None:
    svc, over = service({"image": "i", "name": "n", "network_mode": "host",
                         "mounts": [Mount("/t", "v", type="volume", read_only=True)],
                         "tmpfs": {"/run": "rw,noexec,nosuid,nodev,size=16m,mode=0700"},
                         "restart_policy": {"Name": "unless-stopped"}, "mem_limit": "1g",
                         "platform": "linux/arm64"})
    assert svc == {"image": "i", "networks": ["hostnet"], "restart": "unless-stopped",
                   "volumes": [{"type": "volume", "source": "v", "target": "/t",
                                "read_only": True},
                               {"type": "tmpfs", "target": "/run",
                                "tmpfs": {"size": 16 << 20, "mode": 0o700}}],
                   "deploy": {"resources": {"limits": {"memory": "1g"}},
                              "placement": {"constraints": ["node.platform.arch == aarch64"]}}}
    assert over["network_mode"] == "host" and isinstance(over["networks"], Reset)


def test_variables_and_the_yaml_they_make() -> None:
    port = IntVar("P", 5101)
    assert port == 5101 and f"{port}/tcp" == "${P:-5101}/tcp" and str(port) == "${P:-5101}"
    assert json_with_vars({"port": port, "r": [StrVar("R", required="set R")]}) == \
        '{"port": ${P:-5101}, "r": ["${R:?set R}"]}'
    text = dump({"a": port, "s": script('echo "$HOME"\nexit 0\n'), "n": Reset([])}, "# h\n")
    assert text == '# h\na: ${P:-5101}\ns: |\n  echo "$$HOME"\n  exit 0\nn: !reset []\n'


def test_the_compose_action(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["compose", "--lab"], environ={}, stdout=out, stderr=err) == 0
    assert out.getvalue() == (REPO / FILES[0]).read_text()
    assert main(["compose", "--lab", "-o", str(tmp_path)], environ={}, stdout=out,
                stderr=err) == 0
    assert (tmp_path / FILES[1]).read_text() == (REPO / FILES[1]).read_text()
    err = io.StringIO()
    assert main(["compose", "--lab", "-o", str(tmp_path)], environ={}, stdout=out,
                stderr=err) == 1
    assert err.getvalue().count("\n") == 1 and "--force" in err.getvalue()
    assert main(["compose", "--lab", "-o", str(tmp_path), "--force"], environ={},
                stdout=out, stderr=err) == 0
    assert main(["compose", "--lab", "--force"], environ={}, stdout=out, stderr=err) == 2


def test_the_stack_document_parses_as_json_once_set() -> None:
    labels_ = checked_in()["services"]["aarch64"]["labels"]
    assert json.loads(interpolate(labels_[labels.CONFIG], ENV))["port"] == 5102
