"""ServerConfig → container arguments: the pure translation, checked by equality."""

from __future__ import annotations

from docker.types import Mount

from farm.core import labels
from farm.core.arch import ARM64, X86_64
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.core.strategy import resolve
from farm.engine.specs import (
    HOME,
    LOG,
    SSL,
    Placement,
    config_from_json,
    config_to_json,
    daemon_args,
    server_spec,
)

G = GlobalConfig(config_path="/c", stat_path="/s", log_file="/l", state_dir="/st",
                 memory_limit="2g", pids_limit=512, tmpfs_size="1g")
WHERE = Placement(image="stapfarm/server:x86_64", kernels_volume="stapfarm-kernels-amd64",
                  uid=155, gid=155, home_dir="/st/home/stap-server", log_file="/l",
                  port=5001, hostname="farmhost", prefix="stapfarm")


def cfg(**kw: object) -> ServerConfig:
    base: dict[str, object] = {"arch": "arm64", "releases": ("9.9.1+test1-arm64",),
                               "user": "stap-server", "log": "/l",
                               "max_request_size": 1000, "max_compressed_request": 100}
    base.update(kw)
    return ServerConfig(**base)  # type: ignore[arg-type]


def test_cross_daemon_args_add_cross_compile_and_keep_upstream_order() -> None:
    plan = resolve(Strategy.AUTO, ARM64, X86_64)
    c = cfg(build=("'V=1 W=2'",), include=("/taps",), define=("FOO=1",), runtime="/rt",
            max_threads=4, ssl="/certs")
    assert daemon_args(c, plan, 5001) == [
        "-a", "arm64", "-r", "9.9.1+test1-arm64", "-B", "'V=1 W=2'",
        "-B", "CROSS_COMPILE=aarch64-linux-gnu-", "-I", "/taps", "-D", "FOO=1", "-R", "/rt",
        f"--log={LOG}", "--port", "5001", "--ssl", SSL, "--max-threads", "4",
        "--max-request-size", "1000", "--max-compressed-request", "100"]


def test_native_has_no_cross_compile_and_an_explicit_one_is_kept() -> None:
    native = resolve(Strategy.AUTO, X86_64, X86_64)
    assert "-B" not in daemon_args(cfg(arch="x86_64"), native, 1)
    cross = resolve(Strategy.CROSS, ARM64, X86_64)
    args = daemon_args(cfg(build=("CROSS_COMPILE=my-",)), cross, 1)
    assert args.count("-B") == 1 and "CROSS_COMPILE=my-" in args


def test_container_spec_is_locked_down_and_labelled() -> None:
    plan = resolve(Strategy.AUTO, ARM64, X86_64)
    c = cfg(include=("/taps",), releases=("9.9.1+test1-arm64", "/src/linux"))
    spec = server_spec(c, plan, WHERE, G)
    assert spec["image"] == "stapfarm/server:x86_64"
    assert spec["platform"] == "linux/amd64"
    assert spec["user"] == "155:155"
    assert spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"]
    assert spec["security_opt"] == ["no-new-privileges"]
    assert spec["mem_limit"] == "2g" and spec["pids_limit"] == 512
    assert spec["tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=1g,mode=1777"}
    assert spec["ports"] == {"5001/tcp": ("0.0.0.0", 5001)}
    assert spec["hostname"] == "farmhost"
    assert spec["environment"]["HOME"] == HOME
    assert spec["mounts"] == [
        Mount("/srv/stapfarm/kernels", "stapfarm-kernels-amd64", type="volume",
              read_only=True),
        Mount(HOME, "/st/home/stap-server", type="bind"),
        Mount(LOG, "/l", type="bind"),
        Mount("/src/linux", "/src/linux", type="bind", read_only=True),
        Mount("/taps", "/taps", type="bind", read_only=True),
    ]
    lab = spec["labels"]
    assert lab[labels.OWNER] == "stapfarm" and lab[labels.KIND] == "server"
    assert lab[labels.STRATEGY] == "cross" and lab[labels.PORT] == "5001"
    assert config_from_json(lab[labels.CONFIG]) == c
    assert spec["name"].startswith("stapfarm-aarch64-")


def test_emulated_runs_the_target_image_platform() -> None:
    plan = resolve(Strategy.EMULATED, ARM64, X86_64)
    spec = server_spec(cfg(), plan, WHERE, G)
    assert spec["platform"] == "linux/arm64"
    assert "CROSS_COMPILE=aarch64-linux-gnu-" not in spec["command"]


def test_spec_hash_changes_with_the_spec_only() -> None:
    plan = resolve(Strategy.AUTO, ARM64, X86_64)
    a = server_spec(cfg(), plan, WHERE, G)
    b = server_spec(cfg(nickname="other"), plan, WHERE, G)
    c = server_spec(cfg(define=("X=1",)), plan, WHERE, G)
    assert a["labels"][labels.SPEC_HASH] == \
        b["labels"][labels.SPEC_HASH]
    assert a["labels"][labels.SPEC_HASH] != c["labels"][labels.SPEC_HASH]


def test_config_json_round_trips_every_field() -> None:
    c = cfg(build=("a",), include=("/i",), define=("D",), runtime="/r", nickname="n",
            port=7, ssl="/s", max_threads=3, strategy=Strategy.EMULATED, source="/x.conf")
    assert config_from_json(config_to_json(c)) == c


def test_cpu_limit_defaults_to_two_cpus_and_zero_means_none() -> None:
    from dataclasses import replace

    plan = resolve(Strategy.AUTO, X86_64, X86_64)
    assert server_spec(cfg(arch="x86_64"), plan, WHERE, G)["nano_cpus"] == 2_000_000_000
    assert "nano_cpus" not in server_spec(cfg(arch="x86_64"), plan, WHERE,
                                             replace(G, cpus=0.0))
    spec = server_spec(cfg(arch="x86_64"), plan, WHERE, replace(G, cpus=1.5))
    assert spec["nano_cpus"] == 1_500_000_000


def test_ipc_is_off_and_health_is_checked_over_tls() -> None:
    plan = resolve(Strategy.AUTO, X86_64, X86_64)
    spec = server_spec(cfg(arch="x86_64"), plan, WHERE, G)
    assert spec["ipc_mode"] == "none"
    test = spec["healthcheck"]["Test"]
    assert test[0] == "CMD" and "openssl s_client" in test[-1] and "127.0.0.1:5001" in test[-1]
