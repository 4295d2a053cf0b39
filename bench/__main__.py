"""`python -m bench [--quick] [--out DIR]`: measure the farm side by side, in one run.

See bench/README.md for what is measured and how. Nothing here asserts: every figure is
compared with the target of issue 8 and reported as met or missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests.support.* (the client image helpers) and farm
    sys.path.insert(0, str(REPO))

from bench import env as benv
from bench import measure, report
from bench.env import say
from farm.engine.docker import Engine
from tests.support.client import authorize_cert


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="no emulated strategy, no tracepoint script, throughput up to 4 "
                        "clients, one repetition of the overhead comparison")
    p.add_argument("--out", default=str(REPO / "bench" / "results"),
                   help="directory for <date>.json, .md and .png (default bench/results)")
    p.add_argument("--max-wait", type=float, default=None,
                   help="seconds to wait for the 1-minute load average to drop below 1.0 "
                        "before measuring (default 1800; 30 with --quick)")
    p.add_argument("--only-throughput", action="store_true",
                   help="only the throughput section (native server, 1, 2, 4 and 8 clients, "
                        "3 rounds): the other rows are reported as not measured")
    p.add_argument("--drop-trees", action="store_true",
                   help="remove the cached stapfarmbench-kernels-* volumes and exit")
    return p.parse_args(argv)


def host_info(docker_client: Any) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "machine": platform.machine(),
            "docker": docker_client.version().get("Version", "?")}


def run(args: argparse.Namespace, docker_client: Any, res: dict[str, Any]) -> None:
    quick = args.quick
    emulated = not quick and not args.only_throughput  # the aarch64 image and arm64 tree
    strategies = ["native", "cross"] + ([] if quick else ["emulated"])
    scripts = ["begin", "tapset"] if quick else ["begin", "tracepoint", "tapset"]
    # --quick: 1 client is the overhead's first farm run (one cold compile of a distinct
    # script, as a 1-client run is), 2 clients are skipped; only 4 clients are run
    levels = [4] if quick else [1, 2, 4, 8]
    reps = 1 if quick else 3
    hits = 5 if quick else 10
    max_wait = args.max_wait if args.max_wait is not None else (30 if quick else 1800)
    if quick:
        res["skipped"] = ["--quick: the emulated strategy (~4-5 min per cold compile)",
                          "--quick: the tracepoint script", "--quick: 2 and 8 concurrent clients",
                          "--quick: 1 client = the overhead's farm run (n=1)",
                          ("--quick: overhead and endpoint miss measured once, not 3 times "
                          "(n=1, no median)"), "--quick: 5 endpoint hits, not 10",
                          "--quick: one throughput round, not 3 (no median)",
                          "--quick: the cross tapset script",
                          "--quick: cross/native from one cold pair (no interleaved medians)",
                          "--quick: waits at most 30 s for a quiet machine"]
    env = benv.create(docker_client)
    res["run_id"] = env.run_id
    try:
        benv.require_images(env, emulated=emulated)
        res["images"] = {a: {"tag": t, "id": docker_client.images.get(t).id[:19]}
                         for a, t in env.images.items()}
        say("kernel trees (the newest release per target the mirror offers)")
        res["trees"] = benv.ensure_trees(env, emulated=emulated)
        res["releases"] = dict(env.releases)
        res["tree_copy_seconds"] = round(benv.copy_trees(env, emulated=emulated), 1)
        res["farm_prefix"] = env.farm_prefix
        say("client image and container (Debian 13, stap 5.1)")
        benv.start_client(env)
        res["load"] = measure.wait_for_quiet(max_wait)
        t_start = time.monotonic()
        say(f"measuring (load {os.getloadavg()[0]:.2f})")

        if args.only_throughput:
            res["skipped"] = ["--only-throughput: every other section"]
            st = measure.start_server(env, "native")
            assert env.farm is not None
            authorize_cert(env.client, env.farm.cert())
            res["server_threads"] = measure.server_threads(env, st["server"])
            res["throughput"] = measure.throughput(env, st["server"], [1, 2, 4, 8], None, 3)
            res["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
            res["load"]["at_end"] = os.getloadavg()
            return
        servers: dict[str, dict[str, Any]] = {}
        res["server_start"] = {}
        for i, strategy in enumerate(strategies):
            st = measure.start_server(env, strategy)
            servers[strategy] = st["server"]
            res["server_start"][strategy] = {"start_returned": round(st["start_returned"], 3),
                                             "start_to_ready": round(st["start_to_ready"], 3),
                                             "first": i == 0}
            if i == 0:
                assert env.farm is not None
                authorize_cert(env.client, env.farm.cert())
        res["endpoint"] = {"start_seconds": round(measure.start_endpoint(env), 3),
                           "port": env.endpoint_port}
        assert env.farm is not None
        authorize_cert(env.client, env.farm.farm_cert())  # the farm's identity (endpoint)
        time.sleep(3 if quick else 5)
        res["memory"] = {"idle": measure.memory(env)}
        say(f"idle memory: {res['memory']['idle']}")
        res["lifecycle"] = measure.lifecycle(env, 3)
        say(f"lifecycle: {res['lifecycle']}")
        res["endpoint"]["client_floor"] = measure.client_floor(env, 3 if quick else 5)
        res["endpoint"]["request_floor"] = measure.request_floor(env, servers["native"],
                                                                 3 if quick else 5)
        say(f"client floor (stap -V): {res['endpoint']['client_floor']} s; a request the "
            "endpoint answers at once (unserved release): "
            f"{[r['seconds'] for r in res['endpoint']['request_floor']]} s")
        res["overhead"] = measure.overhead(env, servers["native"], reps, hits)
        first = res["overhead"]["runs"]["farm"][0]
        res["latency"] = measure.latency(env, servers, strategies, scripts, given={
            ("native", "begin"): {"cold": first, "warm": res["overhead"]["first_warm"],
                                  "note": "the overhead's first farm run"}},
            skip={("cross", "tapset"): "quick"} if quick else None)
        if not quick:
            res["cross_native"] = measure.cross_native(env, servers, reps)
        res["server_threads"] = measure.server_threads(env, servers["native"])
        given: dict[str, Any] = {}
        if quick:
            ok = first["rc"] == 0
            given = {"1": {"clients": 1, "succeeded": int(ok), "span_seconds": first["seconds"],
                           "compiles_per_minute": round(60 / first["seconds"], 3) if ok else 0,
                           "runs": [first], "note": "quick: the overhead's farm run, n=1"},
                     "2": {"clients": 2, "skipped": "quick"}}
        res["throughput"] = measure.throughput(env, servers["native"], levels, given, reps)
        time.sleep(3 if quick else 5)
        res["memory"]["idle after compiles"] = measure.memory(env)
        res["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
        res["load"]["at_end"] = os.getloadavg()
    finally:
        say("removing the bench's containers, network and volumes (kernel trees are kept)")
        problems = benv.cleanup(env)
        if problems:
            res.setdefault("errors", []).extend(f"left behind: {p}" for p in problems)
            say("could not remove: " + "; ".join(problems))


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / res["date"]
    res["ratios"] = report.ratios(res)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(report.markdown(res))
    note = report.chart(res, stem.with_suffix(".png"))
    if note:
        say(note)
    print()
    print("ratio / figure                  value     target    verdict")
    for r in res["ratios"]:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        print(f"{r['name']:30s} {v:>8s}   {r['target'] or '-':8s}  {r['verdict']}")
    for s in res.get("skipped", []):
        print(f"skipped: {s}")
    print(f"\nwritten: {stem}.json, {stem}.md" + ("" if note else f", {stem}.png"))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    docker_client = Engine.connect().client
    if args.drop_trees:
        for name in benv.drop_trees(docker_client):
            say(f"removed {name}")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    now = dt.datetime.now(dt.UTC)
    res: dict[str, Any] = {"date": now.strftime("%Y-%m-%dT%H%MZ"), "quick": args.quick,
                           "host": host_info(docker_client), "releases": {}}
    rc = 0
    try:
        run(args, docker_client, res)
    except KeyboardInterrupt:
        say("interrupted: nothing written")
        return 130
    except Exception as e:  # noqa: BLE001 - what was measured is still written
        res.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        rc = 1
    write(res, Path(args.out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
