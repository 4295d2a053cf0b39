"""Ratios against the issue's targets, the Markdown table and the PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# name -> (comparison, target, what it is)
TARGETS: dict[str, tuple[str, float | None, str]] = {
    "cross/native": ("<=", 1.25, "cold `probe begin`, aarch64 cross vs x86_64 native"),
    "emulated/native": ("", None, "cold `probe begin`, aarch64 emulated vs x86_64 native"),
    "farm/bare": ("<=", 1.05, "cold `probe begin`, farm server vs `stap -p4` in the image"),
    "farm/upstream": ("<=", 1.02, "cold `probe begin`, farm vs hand-started stap-serverd"),
    "throughput(4)/throughput(1)": (">=", 1.6, "4 concurrent clients vs 1, one server"),
    "start-to-ready s": ("<=", 3.0, "`stap-server start` until a TLS handshake succeeds"),
    "stop s": ("<=", 2.0, "`stap-server stop` until the container is gone"),
    "idle MiB": ("<=", 64.0, "largest idle server, docker stats (usage - inactive file)"),
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
    values: dict[str, float | None] = {
        "cross/native": _div(_cold(res, "cross"), native),
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
            cells = [(_f(cw[k]["seconds"]) if cw[k]["rc"] == 0 else f"failed ({cw[k]['rc']})")
                     for k in ("cold", "warm")]
            lines.append(f"| {strategy} | {script} | {cells[0]} | {cells[1]} |")
    native = _cold(res, "native")
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
        for k in ("farm", "upstream", "bare"):
            rs = ov.get(k, [])
            lines.append(f"| {k} | {', '.join(_f(r['seconds']) if r['rc'] == 0 else 'failed' for r in rs)}"
                         f" | {_f(_median_ok(rs))} |")
    tp = res.get("throughput", {})
    if tp:
        lines += ["", (f"## Throughput, one x86_64 server (worker threads: "
                  f"{res.get('server_threads', '?')}), distinct `probe begin` scripts"), "",
                  "| clients | ok | span s | compiles/min | vs 1 client |", "|---|---|---|---|---|"]
        base = tp.get("1", {}).get("compiles_per_minute")
        for n, t in tp.items():
            lines.append(f"| {n} | {t['succeeded']}/{t['clients']} | {_f(t['span_seconds'])} | "
                         f"{_f(t['compiles_per_minute'])} | "
                         f"{_f(_div(t['compiles_per_minute'], base))} |")
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
    ns = [int(n) for n in tp]
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
