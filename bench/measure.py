"""The measurements: latency per strategy, farm overhead, throughput, lifecycle, memory."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import threading
import time
from typing import Any

from bench import runs
from bench.env import PREFIX, UPSTREAM_KIND, BenchEnv, say
from farm.core import labels
from farm.core.errors import ServerError
from farm.endpoint import containers as endpoint_service
from farm.engine.docker import Engine
from farm.trust import tls as tlsprobe

HELLO = 'probe begin { println("hello"); exit() }'
TRACEPOINT = 'probe kernel.trace("sched:sched_switch") { printf("%d\\n", $next->pid); exit() }'
TAPSET_FILES = {"tapsets/greet.stp": 'function greet(who) { return "greetings, " . who }\n',
                "main.stp": "probe begin { println(greet(@1)); exit() }\n"}
# name -> (stap arguments after the server's -a/-r/-p4, files in the working directory)
SCRIPTS: dict[str, tuple[list[str], dict[str, str] | None]] = {
    "begin": (["-m", "hello", "-e", HELLO], None),
    "tracepoint": (["-m", "tp", "-e", TRACEPOINT], None),
    "tapset": (["-m", "greet", "-I", "tapsets", "main.stp", "farmer"], TAPSET_FILES),
}
# strategy -> (nickname, target machine name for -a, release key, extra start options)
STRATEGIES = {
    "native": ("native", "x86_64", "x86_64", []),
    "cross": ("cross", "aarch64", "arm64", []),
    "emulated": ("emu", "aarch64", "arm64", ["--strategy", "emulated"]),
}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def wait_for_quiet(limit: float, threshold: float = 1.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below THRESHOLD (at most LIMIT seconds)."""
    t0 = time.monotonic()
    first = os.getloadavg()
    last_note = -60.0
    while os.getloadavg()[0] >= threshold:
        waited = time.monotonic() - t0
        if waited >= limit:
            say(f"load is still {os.getloadavg()[0]:.2f} after {waited:.0f} s: measuring anyway")
            return {"before": first, "waited_seconds": round(waited, 1), "timed_out": True,
                    "at_start": os.getloadavg()}
        if waited - last_note >= 60:
            say(f"waiting for the machine to be quiet: load {os.getloadavg()[0]:.2f} >= "
                f"{threshold} (waited {waited:.0f} s of at most {limit:.0f} s)")
            last_note = waited
        time.sleep(5)
    return {"before": first, "waited_seconds": round(time.monotonic() - t0, 1),
            "timed_out": False, "at_start": os.getloadavg()}


# --------------------------------------------------------------------------- servers


def start_server(env: BenchEnv, strategy: str) -> dict[str, Any]:
    """`stap-server start` for STRATEGY's server; returns its status entry and the seconds
    until `start` returned (it prints OK only after a TLS handshake) and until our own
    handshake succeeded."""
    assert env.farm is not None
    nick, machine, relkey, extra = STRATEGIES[strategy]
    t0 = time.monotonic()
    rc, out, err = env.farm.run("start", "-a", machine, "-r", env.releases[relkey], "-n", nick,
                                *extra)
    returned = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"stap-server start ({strategy}) failed:\n{out}{err}")
    server = env.farm.server(nick)
    handshake(server["port"])
    return {"server": server, "start_returned": returned,
            "start_to_ready": time.monotonic() - t0}


def handshake(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            tlsprobe.probe("127.0.0.1", port, timeout=3.0)
            return
        except ServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def farm_args(env: BenchEnv, server: dict[str, Any], port: int | None = None) -> list[str]:
    return [f"--use-server={env.host}:{port or server['port']}", "-a", server["config"]["arch"],
            "-r", server["config"]["releases"][0], "-p4"]


def clear_caches(env: BenchEnv, home: str | None = None) -> None:
    """Drop stap's cache for a cold compile: the server's (in its persistent home) and the
    client's."""
    shutil.rmtree(os.path.join(home or str(env.home()), ".systemtap", "cache"),
                  ignore_errors=True)
    runs.clear_client_cache(env.client)


def lifecycle(env: BenchEnv, reps: int) -> dict[str, Any]:
    """start until the first TLS handshake, stop until the container is gone (warm images,
    trees and certificate), REPS times with a fresh native server."""
    import docker.errors

    assert env.farm is not None
    out: dict[str, list[float]] = {"start_returned": [], "start_to_ready": [], "stop": [],
                                   "stop_returned": []}
    for i in range(reps):
        nick = f"lifecycle{i}"
        t0 = time.monotonic()
        rc, o, e = env.farm.run("start", "-a", "x86_64", "-r", env.releases["x86_64"], "-n",
                                nick)
        out["start_returned"].append(time.monotonic() - t0)
        if rc != 0:
            raise RuntimeError(f"stap-server start failed:\n{o}{e}")
        server = env.farm.server(nick)
        handshake(server["port"])
        out["start_to_ready"].append(time.monotonic() - t0)
        time.sleep(1)
        t0 = time.monotonic()
        rc, o, e = env.farm.run("stop", "-n", nick)
        out["stop_returned"].append(time.monotonic() - t0)
        if rc != 0:
            raise RuntimeError(f"stap-server stop failed:\n{o}{e}")
        while True:
            try:
                env.docker.containers.get(server["container"])
            except docker.errors.NotFound:
                break
            time.sleep(0.02)
        out["stop"].append(time.monotonic() - t0)
    return {k: [round(x, 3) for x in v] for k, v in out.items()}


def memory(env: BenchEnv) -> dict[str, dict[str, float]]:
    """Memory of each running bench server, MiB: the cgroup's usage, and docker stats' figure
    (usage less inactive file cache)."""
    found = {}
    for c in env.docker.containers.list(filters={"label": [f"{labels.OWNER}={env.farm_prefix}",
                                                          f"{labels.KIND}=server"]}):
        st = c.stats(stream=False).get("memory_stats", {})
        usage = float(st.get("usage", 0))
        sub = st.get("stats", {})
        inactive = float(sub.get("total_inactive_file", sub.get("inactive_file", 0)))
        rss = float(sub.get("total_rss", sub.get("anon", 0)))
        found[c.labels.get(labels.NICKNAME, c.name)] = {
            "usage_mib": round(usage / 2**20, 1),
            "docker_stats_mib": round((usage - inactive) / 2**20, 1),
            "rss_mib": round(rss / 2**20, 1)}
    return found


# --------------------------------------------------------------------------- latency


def latency(env: BenchEnv, servers: dict[str, dict[str, Any]], strategies: list[str],
            scripts: list[str], given: dict[tuple[str, str], dict[str, Any]] | None = None,
            skip: dict[tuple[str, str], str] | None = None
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Cold (caches dropped) then warm (the same request again) for each pair; the pairs in
    GIVEN were measured already (native `probe begin`: the overhead's first farm run)."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for strategy in strategies:
        server = servers[strategy]
        for script in scripts:
            if skip and (strategy, script) in skip:
                result.setdefault(strategy, {})[script] = {"skipped": skip[(strategy, script)]}
                continue
            if given and (strategy, script) in given:
                result.setdefault(strategy, {})[script] = given[(strategy, script)]
                continue
            args, files = SCRIPTS[script]
            clear_caches(env)
            cold = runs.client_run(env.client, farm_args(env, server) + args, files)
            warm = runs.client_run(env.client, farm_args(env, server) + args, files)
            say(f"{strategy:8s} {script:10s} cold {cold.seconds:7.2f} s  warm "
                f"{warm.seconds:6.2f} s" + ("" if cold.ok and warm.ok else "  FAILED"))
            result.setdefault(strategy, {})[script] = {"cold": cold.brief(),
                                                       "warm": warm.brief()}
    return result


def cross_native(env: BenchEnv, servers: dict[str, dict[str, Any]], reps: int
                 ) -> dict[str, list[dict[str, Any]]]:
    """Cold `probe begin` on the native x86_64 and the cross aarch64 server, interleaved
    (the order alternates), REPS times, with a string of its own per repetition so no
    cache knows it: the medians give cross/native."""
    out: dict[str, list[dict[str, Any]]] = {"native": [], "cross": []}
    for i in range(reps):
        args = ["-m", "hello", "-e", hello(f"pair {env.run_id} {i}")]
        order = ["native", "cross"] if i % 2 == 0 else ["cross", "native"]
        for strategy in order:
            clear_caches(env)
            r = runs.client_run(env.client, farm_args(env, servers[strategy]) + args)
            out[strategy].append(r.brief())
        say(f"cross/native {i + 1}/{reps}: native {out['native'][-1]['seconds']:.2f} s, "
            f"cross {out['cross'][-1]['seconds']:.2f} s")
    return out


# --------------------------------------------------------------------------- overhead


def start_upstream(env: BenchEnv, server: dict[str, Any], n: int) -> dict[str, Any]:
    """Upstream stap-serverd by hand: `docker run` of the farm server's image running
    /usr/lib/systemtap/stap-serverd itself (not the farm's entry script) with the same
    arguments (its own port), the kernel volume and a home holding a copy of the farm's
    certificate database (so the client's trust applies), an empty cache and no
    ~/.systemtap/rc (Debian's systemtap-server writes none: no per-request rlimits) — no
    read-only root, no dropped capabilities, no limits, no tmpfs, no health check, no farm."""
    c = env.docker.containers.get(server["container"])
    cfg = c.attrs["Config"]
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    cmd = list(cfg["Cmd"])
    cmd[cmd.index("--port") + 1] = str(port)
    home = env.root / f"upstream-home-{n}"
    (home / ".systemtap").mkdir(parents=True)
    shutil.copytree(env.home() / ".systemtap" / "ssl", home / ".systemtap" / "ssl")
    log = env.root / f"upstream-{n}.log"
    log.touch()
    uid = int(cfg["User"].split(":")[0])
    gid = int(cfg["User"].split(":")[1]) if ":" in cfg["User"] else uid
    for root, dirs, files in os.walk(home):
        for p in [root] + [os.path.join(root, f) for f in dirs + files]:
            os.chown(p, uid, gid)
    os.chown(log, uid, gid)
    os.chmod(home, 0o700)
    env_vars = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    keep = {k: env_vars[k] for k in ("HOME", "TMPDIR", "DEBUGINFOD_URLS") if k in env_vars}
    kernels_vol = next(m["Name"] for m in c.attrs["Mounts"] if m["Type"] == "volume")
    t0 = time.monotonic()
    up = env.docker.containers.run(
        cfg["Image"], entrypoint=["/usr/bin/tini", "--", "/usr/lib/systemtap/stap-serverd"],
        command=cmd, detach=True, user=cfg["User"], hostname=cfg["Hostname"],
        environment=keep, ports={f"{port}/tcp": port},
        volumes={kernels_vol: {"bind": "/srv/stapfarm/kernels", "mode": "ro"},
                 str(home): {"bind": "/home/stap-server", "mode": "rw"},
                 str(log): {"bind": "/var/log/stapfarm/server.log", "mode": "rw"}},
        name=f"{PREFIX}-{env.run_id}-upstream-{n}",
        labels={labels.TEST: env.label, labels.KIND: UPSTREAM_KIND})
    handshake(port, timeout=90)
    return {"container": up, "port": port, "home": str(home), "ready": time.monotonic() - t0,
            "command": cmd}


def hello(text: str) -> str:
    return f'probe begin {{ println("{text}"); exit() }}'


def start_endpoint(env: BenchEnv) -> float:
    """`stap-server endpoint start` (the servers' certificate exists); seconds until it
    returned (it waits for the endpoint's TLS handshake)."""
    assert env.farm is not None
    t0 = time.monotonic()
    rc, out, err = env.farm.run("endpoint", "start")
    if rc != 0:
        raise RuntimeError(f"stap-server endpoint start failed:\n{out}{err}")
    took = time.monotonic() - t0
    handshake(env.endpoint_port, timeout=60)
    return took


def endpoint_metrics(env: BenchEnv) -> dict[str, float]:
    return endpoint_service.metrics(env.endpoint_metrics_port)


def via_endpoint(env: BenchEnv, server: dict[str, Any], args: list[str],
                 files: dict[str, str] | None = None) -> tuple[runs.Run, dict[str, float]]:
    """One request through the endpoint (same -a/-r as SERVER), and what the endpoint's
    metrics say of it: requests, hit/miss counts and its own seconds (histogram deltas)."""
    before = endpoint_metrics(env)
    r = runs.client_run(env.client, farm_args(env, server, env.endpoint_port) + args, files)
    after = endpoint_metrics(env)

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return r, {"requests": d("stapfarm_endpoint_request_seconds_count"),
               "endpoint_seconds": round(d("stapfarm_endpoint_request_seconds_sum"), 4),
               "hits": d("stapfarm_endpoint_cache_hits_total"),
               "misses": d("stapfarm_endpoint_cache_misses_total")}


def client_floor(env: BenchEnv, reps: int) -> list[float]:
    """The client's own floor: `stap -V` timed in the client container like a compile."""
    return [round(runs.client_run(env.client, ["-V"]).seconds, 4) for _ in range(reps)]


NOSUCH = "6.0.0-nosuch-amd64"


def request_floor(env: BenchEnv, server: dict[str, Any], reps: int) -> list[dict[str, Any]]:
    """The real client's round-trip floor: a full request (pass 0, packing, TLS, the reply
    unpacked) that the endpoint answers at once — a release nobody serves, so the endpoint
    replies with its error without forwarding. The client exits non-zero (expected)."""
    fake = dict(server, config=dict(server["config"], releases=[NOSUCH]))
    out = []
    for _ in range(reps):
        runs.clear_client_cache(env.client)
        r, seen = via_endpoint(env, fake, ["-m", "floor", "-e", hello("floor")])
        answered = "Server:" in r.output and "no server for" in r.output
        out.append({"rc": r.rc, "seconds": round(r.seconds, 4), "answered": answered,
                    "endpoint_seconds": seen["endpoint_seconds"],
                    **({} if answered else {"output_tail": r.output[-1000:]})})
    return out


def overhead(env: BenchEnv, server: dict[str, Any], reps: int, hits: int) -> dict[str, Any]:
    """The same cold `probe begin` request (a distinct string per repetition, so no cache of
    any kind knows it): bare `stap -p4` in the same image, upstream stap-serverd started by
    hand in the same image, the farm server directly, and the farm endpoint (a cache miss,
    forwarded to that same server). Interleaved, REPS times; the farm/endpoint order
    alternates. After the first repetition's farm run the same request is repeated at once
    (warm: the latency table's native `probe begin`), and after its endpoint run the
    identical request is sent HITS more times through the endpoint (cache hits; the client's
    own cache dropped before each, so every one reaches the endpoint)."""
    rel = server["config"]["releases"][0]
    attrs = env.docker.containers.get(server["container"]).attrs
    image = attrs["Config"]["Image"]
    volume = next(m["Name"] for m in attrs["Mounts"] if m["Type"] == "volume")
    out: dict[str, list[dict[str, Any]]] = {"farm": [], "bare": [], "upstream": [],
                                            "endpoint": []}
    first_warm: dict[str, Any] = {}
    hit_runs: list[dict[str, Any]] = []
    upstream = start_upstream(env, server, 0)
    try:
        for i in range(reps):
            args = ["-m", "hello", "-e", hello(f"hello {env.run_id} {i}")]
            bare = runs.bare_run(env.docker, image, volume, ["-p4", "-a",
                                 server["config"]["arch"], "-r", rel, *args], env.label)
            out["bare"].append(bare.brief())
            clear_caches(env, upstream["home"])
            up = runs.client_run(env.client, farm_args(env, server, upstream["port"]) + args)
            out["upstream"].append(up.brief())

            def farm_leg(i: int = i, args: list[str] = args) -> runs.Run:
                clear_caches(env)
                fm = runs.client_run(env.client, farm_args(env, server) + args)
                out["farm"].append(fm.brief())
                if i == 0:
                    first_warm.update(runs.client_run(env.client, farm_args(env, server)
                                                      + args).brief())
                return fm

            def endpoint_leg(i: int = i, args: list[str] = args) -> runs.Run:
                clear_caches(env)
                ep, seen = via_endpoint(env, server, args)
                out["endpoint"].append(dict(ep.brief(), **seen))
                if i == 0:
                    for _ in range(hits):
                        runs.clear_client_cache(env.client)
                        h, hseen = via_endpoint(env, server, args)
                        hit_runs.append(dict(h.brief(), **hseen))
                return ep

            if i % 2 == 0:
                fm = farm_leg()
                ep = endpoint_leg()
            else:
                ep = endpoint_leg()
                fm = farm_leg()
            say(f"overhead {i + 1}/{reps}: farm {fm.seconds:.2f} s, endpoint (miss) "
                f"{ep.seconds:.2f} s, bare {bare.seconds:.2f} s, upstream {up.seconds:.2f} s")
    finally:
        upstream["container"].remove(force=True)
    if hit_runs:
        say("endpoint hits: client " + ", ".join(f"{h['seconds']:.3f}" for h in hit_runs)
            + " s; endpoint side " + ", ".join(
                f"{h['endpoint_seconds'] * 1000:.1f}" for h in hit_runs) + " ms")
    return {"runs": out, "upstream_command": upstream["command"],
            "upstream_start_to_ready": round(upstream["ready"], 3),
            "first_warm": first_warm, "endpoint_hits": hit_runs}


# --------------------------------------------------------------------------- throughput


def _concurrent(env: BenchEnv, server: dict[str, Any], n: int, tag: str) -> dict[str, Any]:
    """N concurrent clients (stap processes in the client container), each with a distinct
    script; throughput = N / (last end - first start), compiles per minute."""
    clear_caches(env)
    client_id = env.client.id
    got: list[Any] = [None] * n

    def one(i: int) -> None:
        dc = Engine.connect().client
        try:
            c = dc.containers.get(client_id)
            script = f'probe begin {{ println("bench {tag} client {i}"); exit() }}'
            got[i] = runs.client_run(c, farm_args(env, server) + ["-m", f"tp{n}_{i}", "-e",
                                                                   script])
        finally:
            dc.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in got if r is not None]
    ok = [r for r in done if r.ok]
    span = ((max(r.end_ns for r in ok) - min(r.start_ns for r in ok)) / 1e9) if ok else 0.0
    per_min = len(ok) / span * 60 if span else 0.0
    say(f"throughput {n} client(s): {len(ok)}/{n} ok in {span:.1f} s = "
        f"{per_min:.2f} compiles/min")
    return {"succeeded": len(ok), "span_seconds": round(span, 3),
            "compiles_per_minute": round(per_min, 3), "runs": [r.brief() for r in done]}


def throughput(env: BenchEnv, server: dict[str, Any], levels: list[int],
               given: dict[str, Any] | None = None, reps: int = 1) -> dict[str, Any]:
    """Each concurrency level in LEVELS against one server, REPS rounds (every level once per
    round, so drift over the run touches every level alike); a level's figure is the median
    of its rounds' compiles per minute. GIVEN: entries measured elsewhere or skipped
    (--quick), kept as they are."""
    result: dict[str, Any] = dict(given or {})
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    for r in range(reps):
        for n in levels:
            rounds[n].append(_concurrent(env, server, n, f"{env.run_id}{n}r{r}"))
    for n, got in rounds.items():
        # the median round (the lower middle one for an even count) gives the level's figures
        mid = sorted(got, key=lambda g: g["compiles_per_minute"])[(len(got) - 1) // 2]
        result[str(n)] = {"clients": n, "succeeded": min(g["succeeded"] for g in got),
                          "span_seconds": mid["span_seconds"],
                          "compiles_per_minute": mid["compiles_per_minute"], "rounds": got}
    return dict(sorted(result.items(), key=lambda kv: int(kv[0])))


def server_threads(env: BenchEnv, server: dict[str, Any]) -> str:
    """stap-serverd's worker threads (its --max-threads, else the CPUs it sees)."""
    c = env.docker.containers.get(server["container"])
    cmd = c.attrs["Config"]["Cmd"]
    if "--max-threads" in cmd:
        return str(cmd[cmd.index("--max-threads") + 1])
    _code, out = c.exec_run(["nproc"])
    return f"default (nproc in the container: {out.decode().strip()})"

