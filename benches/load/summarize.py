#!/usr/bin/env python3
"""Summarises a benches/load/run.sh output directory as markdown (medians over rounds).

    python3 benches/load/summarize.py target/load/<timestamp>
"""
import pathlib
import re
import statistics
import sys

NAMES = {
    "direct": "(a) upstream directly (nginx `return 200`)",
    "nginx": "(b) nginx proxy, `limit_req` by Authorization",
    "cliqgate": "(c) cliqgate, memory store, 10k users",
    "hyper-mt": "bare hyper proxy, tokio multi-thread (baseline)",
    "hyper-percore": "bare hyper proxy, one runtime per core (baseline)",
    "tcp-relay": "TCP relay, no HTTP, one runtime per core (floor)",
}
# Foreign CPU (others' work on the machine) above this, in % of the machine, is flagged.
FOREIGN_WARN = 10.0


def parse(path):
    text = path.read_text()
    m = re.search(r"^WRKRESULT (.*)$", text, re.M)
    if not m:
        return None
    r = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    c = re.search(r"^CPU (.*)$", text, re.M)
    if c:
        r.update({k: float(v) for k, v in (kv.split("=") for kv in c.group(1).split())})
    return r


def med(runs, key):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def spread(runs, key, fmt):
    values = sorted(r[key] for r in runs if key in r)
    if len(values) < 2:
        return ""
    return f" ({fmt(values[0])}-{fmt(values[-1])})"


def us(v):
    return f"{v:,.0f} µs" if v < 10_000 else f"{v / 1000:,.1f} ms"


def rps(v):
    return f"{v:,.0f}"


def main():
    out = pathlib.Path(sys.argv[1])
    targets_file = out / "targets.txt"
    targets = (
        targets_file.read_text().split() if targets_file.exists() else ["direct", "nginx", "cliqgate"]
    )
    results = {}
    for mode in ("high", "moderate"):
        for t in targets:
            runs = [parse(p) for p in sorted(out.glob(f"{mode}-{t}-*.txt"))]
            results[(mode, t)] = [r for r in runs if r]

    machine = (out / "machine.txt").read_text() if (out / "machine.txt").exists() else ""
    print("## Proxy load benchmark\n")
    print("```\n" + machine.strip() + "\n```\n")
    rounds = max((len(v) for v in results.values()), default=0)
    foreign_max = 0.0
    for mode, title in (
        ("high", "High load (closed loop)"),
        ("moderate", "Moderate load (paced: each connection pauses before every request)"),
    ):
        print(f"### {title}: median of {rounds} round(s), range in brackets\n")
        print(
            "| Target | Requests/s | p50 | p99 | p99.9 | non-2xx | socket errors "
            "| CPU per call (target process) | others' CPU |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in targets:
            runs = results[(mode, t)]
            if not runs:
                continue
            cpu = ""
            if all("proxy_s" in r for r in runs):
                per_call = statistics.median(r["proxy_s"] / r["requests"] * 1e6 for r in runs)
                cpu = f"{per_call:.1f} µs"
            foreign = [r.get("foreign_pct", 0.0) for r in runs]
            foreign_max = max(foreign_max, *foreign)
            print(
                f"| {NAMES.get(t, t)} | {rps(med(runs, 'rps'))}{spread(runs, 'rps', rps)}"
                f" | {us(med(runs, 'p50_us'))}{spread(runs, 'p50_us', us)}"
                f" | {us(med(runs, 'p99_us'))}{spread(runs, 'p99_us', us)}"
                f" | {us(med(runs, 'p999_us'))}{spread(runs, 'p999_us', us)}"
                f" | {sum(r['non2xx'] for r in runs):.0f}"
                f" | {sum(r['socket_errors'] for r in runs):.0f} | {cpu}"
                f" | {statistics.median(foreign):.0f}% (max {max(foreign):.0f}%) |"
            )
        print()

    hi_n, hi_c = results.get(("high", "nginx"), []), results.get(("high", "cliqgate"), [])
    mo_d = results.get(("moderate", "direct"), [])
    lines = []
    if hi_n and hi_c:
        thr = med(hi_c, "rps") / med(hi_n, "rps")
        p99 = med(hi_c, "p99_us") / med(hi_n, "p99_us")
        p999 = med(hi_c, "p999_us") / med(hi_n, "p999_us")
        # Per-round ratios (same round = closest in time) show how stable the ratio is.
        per_round = [c["rps"] / n["rps"] for n, c in zip(hi_n, hi_c)]
        lines.append(
            f"| throughput cliqgate / nginx (high load) | **{thr:.2f}x** "
            f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}) | >= 1.1x | "
            f"{'met' if thr >= 1.1 else 'MISSED'} |"
        )
        lines.append(
            f"| p99 cliqgate / nginx (high load) | **{p99:.2f}x** "
            f"({us(med(hi_c, 'p99_us'))} vs {us(med(hi_n, 'p99_us'))}) | <= 1.0x | "
            f"{'met' if p99 <= 1.0 else 'MISSED'} |"
        )
        lines.append(f"| p99.9 cliqgate / nginx (high load) | {p999:.2f}x | | |")
        if all("proxy_s" in r for r in hi_n + hi_c):
            cn = statistics.median(r["proxy_s"] / r["requests"] for r in hi_n)
            cc = statistics.median(r["proxy_s"] / r["requests"] for r in hi_c)
            lines.append(f"| CPU per call (proxy process) cliqgate / nginx (high load) | {cc / cn:.2f}x | | |")
    for t in targets:
        if t == "direct":
            continue
        mo = results.get(("moderate", t), [])
        if not (mo_d and mo):
            continue
        added = med(mo, "p50_us") - med(mo_d, "p50_us")
        per_round = [c["p50_us"] - d["p50_us"] for d, c in zip(mo_d, mo)]
        if t == "cliqgate":
            lines.append(
                f"| added p50 over the upstream, moderate load: cliqgate | **{added:.0f} µs** "
                f"(per round: {', '.join(f'{x:.0f}' for x in per_round)}) | < 100 µs | "
                f"{'met' if added < 100 else 'MISSED'} |"
            )
        else:
            lines.append(
                f"| added p50 over the upstream, moderate load: {t} | {added:.0f} µs "
                f"(per round: {', '.join(f'{x:.0f}' for x in per_round)}) | | |"
            )
    if lines:
        print("### Ratios and targets\n")
        print("| Measure | Value | Target | |")
        print("|---|---:|---|---|")
        print("\n".join(lines))
        print()
    if foreign_max > FOREIGN_WARN:
        print(
            f"**Warning:** other work on the machine took up to {foreign_max:.0f}% of its CPU "
            "during some measurements (column \"others' CPU\"); those figures are lower bounds.\n"
        )


if __name__ == "__main__":
    main()
