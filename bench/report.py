"""Ratios against the issue's targets, the Markdown table and the PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# name -> (comparison, target, what it is)
TARGETS: dict[str, tuple[str, float | None, str]] = {
    "cross/native": ("<=", 1.25, ("cold `probe begin`, aarch64 cross vs x86_64 native "
                     "(medians of interleaved pairs; --quick: the latency table's pair)")),
    "emulated/native": ("", None, "cold `probe begin`, aarch64 emulated vs x86_64 native"),
    "farm/bare": ("<=", 1.05, "cold `probe begin`, farm server vs `stap -p4` in the image"),
    "farm/upstream": ("<=", 1.02, "cold `probe begin`, farm vs hand-started stap-serverd"),
    "throughput(4)/throughput(1)": (">=", 1.6, "4 concurrent clients vs 1, one server"),
    "start-to-ready s": ("<=", 3.0, "`stap-server start` until a TLS handshake succeeds"),
    "stop s": ("<=", 2.0, "`stap-server stop` until the container is gone"),
    "idle MiB": ("<=", 64.0, "largest idle server, docker stats (usage - inactive file)"),
    "endpoint hit s (client)": ("<=", 0.05, ("median client time of a repeated identical "
                                "request through the endpoint (cache hit), real stap client")),
    "endpoint hit s (endpoint)": ("<=", 0.05, ("median endpoint-side time of those hits "
                                  "(stapfarm_endpoint_request_seconds sum/count delta)")),
    "client floor s (stap -V)": ("", None, ("median time of `stap -V` in the client: what the "
                                 "client costs before any request")),
    "client floor s (request)": ("", None, ("median client time of a full request the "
                                 "endpoint answers at once (a release nobody serves)")),
    "endpoint hit - request floor s": ("", None, "client hit time less that request floor"),
    "endpoint/direct (miss)": ("<=", 1.03, ("cold `probe begin`, distinct script: via the "
                               "endpoint (cache miss) / directly to the same server, medians")),
}


def _cold(res: dict[str, Any], strategy: str, script: str = "begin") -> float | None:
    run = res.get("latency", {}).get(strategy, {}).get(script, {}).get("cold")
    return run["seconds"] if run and run["rc"] == 0 else None


def _median_ok(runs: list[dict[str, Any]]) -> float | None:
    xs = [r["seconds"] for r in runs if r["rc"] == 0]
    return statistics.median(xs) if xs else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every headline figure with its target and verdict (met / missed / not measured)."""
    native = _cold(res, "native")
    ov = res.get("overhead", {}).get("runs", {})
    tp = res.get("throughput", {})
    tp1 = tp.get("1", {}).get("compiles_per_minute")
    tp4 = tp.get("4", {}).get("compiles_per_minute")
    life = res.get("lifecycle", {})
    idle = [m["docker_stats_mib"] for m in res.get("memory", {}).get("idle", {}).values()]
    pairs = res.get("cross_native", {})
    values: dict[str, float | None] = {
        "cross/native": (_div(_median_ok(pairs["cross"]), _median_ok(pairs["native"]))
                         if pairs else _div(_cold(res, "cross"), native)),
        "emulated/native": _div(_cold(res, "emulated"), native),
        "farm/bare": _div(_median_ok(ov.get("farm", [])), _median_ok(ov.get("bare", []))),
        "farm/upstream": _div(_median_ok(ov.get("farm", [])),
                              _median_ok(ov.get("upstream", []))),
        "throughput(4)/throughput(1)": _div(tp4, tp1),
        "start-to-ready s": (statistics.median(life["start_to_ready"])
                             if life.get("start_to_ready") else None),
        "stop s": statistics.median(life["stop"]) if life.get("stop") else None,
        "idle MiB": max(idle) if idle else None,
    }
    ep = res.get("endpoint", {})
    hits = [h for h in res.get("overhead", {}).get("endpoint_hits", [])
            if h["rc"] == 0 and h.get("hits") == 1]
    hit_client = statistics.median([h["seconds"] for h in hits]) if hits else None
    floor = statistics.median(ep["client_floor"]) if ep.get("client_floor") else None
    values["endpoint hit s (client)"] = hit_client
    values["endpoint hit s (endpoint)"] = (statistics.median(
        [h["endpoint_seconds"] for h in hits]) if hits else None)
    values["client floor s (stap -V)"] = floor
    rfl = [r["seconds"] for r in ep.get("request_floor", []) if r.get("answered")]
    rfloor = statistics.median(rfl) if rfl else None
    values["client floor s (request)"] = rfloor
    values["endpoint hit - request floor s"] = (hit_client - rfloor if hit_client is not None
                                                and rfloor is not None else None)
    values["endpoint/direct (miss)"] = _div(_median_ok(ov.get("endpoint", [])),
                                            _median_ok(ov.get("farm", [])))
    out = []
    for name, (op, target, what) in TARGETS.items():
        v = values[name]
        if v is None:
            verdict = "not measured"
        elif target is None:
            verdict = "no target"
        else:
            verdict = "met" if (v <= target if op == "<=" else v >= target) else "missed"
        out.append({"name": name, "value": None if v is None else round(v, 3),
                    "target": None if target is None else f"{op} {target:g}",
                    "verdict": verdict, "what": what})
    return out


def _f(v: float | None, unit: str = "", digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# stapfarm bench, {res['date']}" + (" (--quick)" if res["quick"] else ""), ""]
    load = res.get("load", {})
    lines += [f"Host: {res['host']['cpus']} CPUs, kernel {res['host']['kernel']}, Docker "
              f"{res['host']['docker']}. Load average at start "
              f"{_f((load.get('at_start') or [None])[0])} (waited "
              f"{load.get('waited_seconds', 0):.0f} s"
              + (", timed out" if load.get("timed_out") else "") + "), at end "
              f"{_f((load.get('at_end') or [None])[0])}. Releases: x86_64 "
              f"{res['releases'].get('x86_64')}, arm64 {res['releases'].get('arm64')}. "
              f"Measured in {res.get('elapsed_seconds', 0):.0f} s.", ""]
    if res.get("skipped"):
        lines += ["Skipped: " + "; ".join(res["skipped"]) + ".", ""]
    lines += ["## Against the issue's targets", "", "| figure | value | target | verdict |",
              "|---|---|---|---|"]
    for r in res["ratios"]:
        lines.append(f"| {r['name']} ({r['what']}) | {_f(r['value'], digits=3)} | "
                     f"{r['target'] or '–'} | {r['verdict']} |")
    lines += ["", "## Latency through the Debian 13 stap 5.1 client (seconds, inside the client)",
              "", "| strategy | script | cold | warm |", "|---|---|---|---|"]
    for strategy, scripts in res.get("latency", {}).items():
        for script, cw in scripts.items():
            if cw.get("skipped"):
                lines.append(f"| {strategy} | {script} | skipped ({cw['skipped']}) | – |")
                continue
            cells = [(_f(cw[k]["seconds"]) if cw[k]["rc"] == 0 else f"failed ({cw[k]['rc']})")
                     for k in ("cold", "warm")]
            lines.append(f"| {strategy} | {script} | {cells[0]} | {cells[1]} |")
    native = _cold(res, "native")
    pairs = res.get("cross_native", {})
    if pairs:
        lines += ["", "Cold `probe begin` pairs, interleaved (s): native "
                  + ", ".join(_f(r["seconds"]) if r["rc"] == 0 else "failed"
                              for r in pairs["native"])
                  + "; cross " + ", ".join(_f(r["seconds"]) if r["rc"] == 0 else "failed"
                                           for r in pairs["cross"])]
    for script in ("tracepoint", "tapset"):
        c, n = _cold(res, "cross", script), _cold(res, "native", script)
        if c and n:
            lines.append(f"\ncross/native, cold {script}: {c / n:.3f}")
    if native is None:
        lines.append("\n(native cold `probe begin` failed: no ratios against native)")
    ov = res.get("overhead", {}).get("runs", {})
    if ov:
        lines += ["", "## Farm overhead: cold `probe begin`, x86_64 native (seconds)", "",
                  "| path | runs | median |", "|---|---|---|"]
        for k in ("farm", "endpoint", "upstream", "bare"):
            rs = ov.get(k, [])
            lines.append(f"| {k} | {', '.join(_f(r['seconds']) if r['rc'] == 0 else 'failed' for r in rs)}"
                         f" | {_f(_median_ok(rs))} |")
    ep = res.get("endpoint", {})
    hits = res.get("overhead", {}).get("endpoint_hits", [])
    if ep:
        n = len(ov.get("endpoint", []))
        lines += ["", "## Farm endpoint", "",
                  f"- `stap-server endpoint start` returned after {_f(ep.get('start_seconds'))} s",
                  "- cold miss: the overhead table's `endpoint` row — the same distinct script "
                  "as the `farm` row, sent through the endpoint (which forwards it to that same "
                  f"server), interleaved with it, n={n}" + (" (quick: n=1)" if n == 1 else ""),
                  "- client floor, `stap -V` in the client container (s): "
                  + ", ".join(_f(x, digits=3) for x in ep.get("client_floor", [])),
                  "- client request floor, a full request the endpoint answers at once with "
                  "its error (a release nobody serves; client s / endpoint-side ms): "
                  + ", ".join(f"{_f(r['seconds'], digits=3)} / "
                              f"{_f(r['endpoint_seconds'] * 1000, digits=1)}"
                              + ("" if r.get("answered") else " (not answered as expected)")
                              for r in ep.get("request_floor", []))]
        if hits:
            lines += ["", ("Cache hits: the identical request repeated through the endpoint, the "
                      "client's own cache dropped before each."), "",
                      "| # | client s | endpoint side ms | endpoint outcome |", "|---|---|---|---|"]
            for i, h in enumerate(hits, 1):
                what = "hit" if h.get("hits") == 1 else (
                    "miss" if h.get("misses") else f"{h.get('requests')} requests")
                lines.append(f"| {i} | {_f(h['seconds'], digits=3) if h['rc'] == 0 else 'failed'}"
                             f" | {_f(h['endpoint_seconds'] * 1000, digits=1)} | {what} |")
    tp = res.get("throughput", {})
    if tp:
        lines += ["", (f"## Throughput, one x86_64 server (worker threads: "
                  f"{res.get('server_threads', '?')}), distinct `probe begin` scripts"), "",
                  ("| clients | ok (worst round) | span s | compiles/min (median of rounds) | "
                   "vs 1 client | rounds, compiles/min |"), "|---|---|---|---|---|---|"]
        base = tp.get("1", {}).get("compiles_per_minute")
        for n, t in tp.items():
            if t.get("skipped"):
                lines.append(f"| {n} | skipped ({t['skipped']}) | – | – | – | – |")
                continue
            lines.append(f"| {n} | {t['succeeded']}/{t['clients']} | {_f(t['span_seconds'])} | "
                         f"{_f(t['compiles_per_minute'])} | "
                         f"{_f(_div(t['compiles_per_minute'], base))} | "
                         + ", ".join(_f(r["compiles_per_minute"]) for r in t.get("rounds", []))
                         + " |" + (f" {t['note']}" if t.get("note") else ""))
    life = res.get("lifecycle", {})
    if life:
        lines += ["", "## Lifecycle (seconds; warm images, trees and certificate)", "",
                  (f"- start until TLS handshake: {', '.join(_f(x) for x in life['start_to_ready'])}"
                  f" (`start` itself returned after {', '.join(_f(x) for x in life['start_returned'])})"),
                  f"- stop until the container is gone: {', '.join(_f(x) for x in life['stop'])}"]
        for s, st in res.get("server_start", {}).items():
            lines.append(f"- first start of the {s} server: {_f(st['start_to_ready'])}"
                         + (" (creates the certificate)" if st.get("first") else ""))
    mem = res.get("memory", {})
    if mem:
        lines += ["", "## Memory per server (MiB)", "",
                  "| server | when | docker stats | cgroup usage | rss |", "|---|---|---|---|---|"]
        for when, servers in mem.items():
            for nick, m in servers.items():
                lines.append(f"| {nick} | {when} | {m['docker_stats_mib']} | {m['usage_mib']} | "
                             f"{m['rss_mib']} |")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> str:
    """Latency by strategy (cold/warm per script) and throughput by concurrency, one PNG.
    Returns a message when matplotlib is missing (the chart is then skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (make bench installs it into .venv)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    lat = res.get("latency", {})
    labels_, cold, warm = [], [], []
    for strategy, scripts in lat.items():
        for script, cw in scripts.items():
            if cw.get("skipped"):
                continue
            labels_.append(f"{strategy}\n{script}")
            cold.append(cw["cold"]["seconds"] if cw["cold"]["rc"] == 0 else 0)
            warm.append(cw["warm"]["seconds"] if cw["warm"]["rc"] == 0 else 0)
    xs = list(range(len(labels_)))
    ax1.bar([x - 0.2 for x in xs], cold, 0.4, label="cold")
    ax1.bar([x + 0.2 for x in xs], warm, 0.4, label="warm")
    ax1.set_xticks(xs, labels_, fontsize=7)
    ax1.set_ylabel("seconds")
    ax1.set_title("latency by strategy", fontsize=9)
    ax1.legend(fontsize=7)
    tp = res.get("throughput", {})
    ns = [int(n) for n, t in tp.items() if not t.get("skipped")]
    ax2.plot(ns, [tp[str(n)]["compiles_per_minute"] for n in ns], marker="o")
    ax2.set_xticks(ns)
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("compiles / minute")
    ax2.set_title("throughput by concurrency", fontsize=9)
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ""
