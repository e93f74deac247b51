#!/usr/bin/env python3
"""Draws deploy/grafana/dashboard.png: the cliqgate dashboard's panels from a real test run.

What it runs, all on 127.0.0.1 with ports chosen by the kernel:
  - a Zoho stand-in (below) answering 200 after 40-600 ms, and one throttle (429) when told;
  - cliqgate (a release build) with the shipped config/cliq.yaml routes in front of it;
  - Prometheus (the real one: Debian's prometheus package) scraping cliqgate every 5 s and
    evaluating deploy/prometheus/alerts.yml (so the recording rules the dashboard reads exist);
  - a load of a few minutes: steady calls from several users, two bursts on the chat route (an
    "alert storm", which queues; callers that give up while queued; calls beyond max_wait), calls
    without a token, clients sending heads cliqgate cannot read or that are too large, and one
    throttle answer from the stand-in (another client used the quota), which locks that user out
    of the route.
Then it asks Prometheus for every panel's queries exactly as they are in cliqgate.json (Grafana's
variables filled in: $job=cliqgate, $route=.*, $__rate_interval=20s, $__range=the run) and draws
the panels where the dashboard's gridPos puts them, with the same titles, in Grafana's dark theme.

Usage (from the repository root; takes about RUN_SECONDS plus a few seconds):
  cargo build --release
  python3 -m venv target/render-venv && target/render-venv/bin/pip install matplotlib
  target/render-venv/bin/python deploy/grafana/render.py \\
      [--binary target/release/cliqgate] [--prometheus PATH] [--seconds 300]
Prometheus: `prometheus` on PATH, or the copy scripts/check-deploy.sh unpacks under target/.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cliqgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 5
RATE_INTERVAL = "20s"  # Grafana's $__rate_interval for a 5 s scrape interval: 4 x 5 s

# Grafana's dark theme and named colours.
BG, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
NAMED = {"green": "#73BF69", "blue": "#5794F2", "orange": "#FF9830", "red": "#F2495C",
         "purple": "#B877D9", "text": "#CCCCDC", "yellow": "#FADE2A", "dark-yellow": "#E0B400"}
CLASSIC = ["#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A6",
           "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17"]


# ---- The Zoho stand-in -------------------------------------------------------------------------

class Stub:
    """Answers like Zoho: 200 with a JSON body after a realistic delay; a 429 for `throttle_user`
    once, after `throttle()` (as if another client had used that user's quota)."""

    def __init__(self):
        self.throttle_next = set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                user = self.headers.get("Authorization", "")
                # Latency: mostly 60-150 ms, a slow tail up to 600 ms.
                time.sleep(min(0.6, random.lognormvariate(-2.4, 0.45)))
                if (self.path.split("?")[0], user) in stub.throttle_next:
                    stub.throttle_next.discard((self.path.split("?")[0], user))
                    status, body = 429, b'{"message":"Too many requests within a certain time frame."}'
                else:
                    status, body = 200, b'{"data":{"ok":true}}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json;charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def throttle(self, path, token):
        self.throttle_next.add((path, f"Zoho-oauthtoken {token}"))


# ---- Processes ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cliqgate(binary, upstream, tmp):
    shipped = (ROOT / "config" / "cliq.yaml").read_text()
    routes = shipped[shipped.index("# ---- Routes ----"):]
    config = Path(tmp) / "cliqgate.yaml"
    config.write_text(
        f'listen: "127.0.0.1:0"\nadmin_listen: "127.0.0.1:0"\nupstream: "{upstream}"\n'
        'safety_margin: "1s"\nlog:\n  format: json\n  level: "info"\n' + routes)
    proc = subprocess.Popen([binary, "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    addrs = {}
    ready = threading.Event()

    def drain():
        for line in proc.stderr:
            if not ready.is_set():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("message") == "cliqgate listening":
                    addrs.update(proxy=event["proxy_addr"], admin=event["admin_addr"])
                    ready.set()
    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(30):
        proc.kill()
        sys.exit("cliqgate did not start")
    return proc, addrs["proxy"], addrs["admin"]


def start_prometheus(binary, admin, tmp):
    port = free_port()
    config = Path(tmp) / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "cliqgate", "static_configs": [{"targets": [admin]}]}],
    }))
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={Path(tmp) / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("prometheus did not start")


# ---- The load ----------------------------------------------------------------------------------

def call(base, method, path, token, timeout=40.0):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Zoho-oauthtoken {token}"
    data = b'{"text":"deploy done"}' if method in ("POST", "PUT") else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        e.read()
    except OSError:
        pass  # a caller that gives up (timeout) while its call is queued


def run_load(base, stub, seconds, reload):
    start = time.monotonic()
    stop = threading.Event()
    threads = []

    def steady(method, path, token, per_minute):
        while not stop.is_set():
            threading.Thread(target=call, args=(base, method, path, token), daemon=True).start()
            stop.wait(random.expovariate(per_minute / 60.0))

    def at(offset, fn):
        def wait_then():
            if not stop.wait(max(0.0, offset - (time.monotonic() - start))):
                fn()
        t = threading.Thread(target=wait_then, daemon=True)
        t.start()
        threads.append(t)

    def burst(path, token, n, patience=40.0):
        for _ in range(n):
            threading.Thread(target=call, args=(base, "POST", path, token, patience), daemon=True).start()

    # Apps calling within their quotas.
    for user in ("ops-bot", "deploy-bot", "alice", "bob"):
        threads.append(threading.Thread(target=steady, daemon=True, args=(
            "POST", f"/api/v3/chats/CT_{user}/message", user, 8)))
        threads.append(threading.Thread(target=steady, daemon=True, args=(
            "GET", "/api/v3/messages/search?query=incident", user, 6)))
    threads.append(threading.Thread(target=steady, daemon=True, args=(
        "POST", "/api/v3/channelsbyname/alerts/message", "alertmanager", 20)))
    threads.append(threading.Thread(target=steady, daemon=True, args=(
        "GET", "/api/v2/chats/CT_1/messages", "carol", 5)))
    threads.append(threading.Thread(target=steady, daemon=True, args=(
        "POST", "/api/v3/chats/CT_1/message", None, 2)))  # no token: 401 invalid

    def broken_client(head, per_minute):
        # A client that sends a head cliqgate cannot read (400), or one larger than its head
        # buffer (max_header_bytes and 16 KiB of slack: 431); both are caller errors.
        host, port = base.removeprefix("http://").rsplit(":", 1)
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(head)
                    s.recv(4096)
            except OSError:
                pass
            stop.wait(random.expovariate(per_minute / 60.0))
    threads.append(threading.Thread(target=broken_client, daemon=True, args=(
        b"GET /api/v2/me HTTP/1.1\r\nHost: cliq\r\nBad Field: x\r\n\r\n", 3)))
    threads.append(threading.Thread(target=broken_client, daemon=True, args=(
        b"GET /api/v2/me HTTP/1.1\r\nHost: cliq\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n", 1)))
    for t in threads:
        t.start()
    # An alert storm on one user's chat route (20 per minute): 30 calls a minute for 40% of the
    # run. Each call in the first minute goes at once; then calls queue for their slot (delayed) while it is within
    # max_wait (30 s), and get 429 at once (queue_timeout) when it is not. Some callers give up
    # after 10 s while queued (cancelled): their calls are never sent.
    def storm():
        end = time.monotonic() + 0.4 * seconds
        n = 0
        while time.monotonic() < end and not stop.is_set():
            patience = 10.0 if n % 5 == 4 else 40.0
            burst("/api/v3/chats/CT_storm/message", "pager", 1, patience)
            n += 1
            stop.wait(2.0)
    at(0.2 * seconds, storm)
    # Another client used carol's quota on Zoho: her next call is throttled, then locked (10 min).
    at(0.45 * seconds, lambda: stub.throttle("/api/v2/chats/CT_1/messages", "carol"))
    # A config change rolled out: SIGHUP.
    at(0.8 * seconds, reload)
    stop.wait(seconds)
    stop.set()


# ---- Queries -----------------------------------------------------------------------------------

def fill(expr, run_seconds):
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{run_seconds}s")
    expr = expr.replace('job=~"$job"', 'job=~"cliqgate"').replace('route=~"$route"', 'route=~".*"')
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def query_range(prom, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{q}", timeout=30) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "") or \
        ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


# ---- Drawing -----------------------------------------------------------------------------------

def fmt_value(v, unit):
    if v is None:
        return "0"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
    if unit in ("reqps", "ops"):
        return f"{v:.2f} req/s" if unit == "reqps" else f"{v:.2f} ops/s"
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 or abs(v) >= 10 else f"{v:.2f}"


def axis_formatter(unit):
    def f(v, _pos):
        if unit == "s":
            return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
        if unit == "reqps":
            return f"{v:g} req/s"
        if unit == "ops":
            return f"{v:g} ops/s"
        return f"{v:g}"
    return matplotlib.ticker.FuncFormatter(f)


def threshold_color(value, steps):
    color = steps[0]["color"]
    for step in steps[1:]:
        if value is not None and value >= step["value"]:
            color = step["color"]
    return NAMED.get(color, color)


def draw(dashboard, data, run_start, run_end, out):
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    col_in, row_in, header_in = 1.0, 0.42, 0.9
    fig = plt.figure(figsize=(24 * col_in, rows * row_in + header_in), facecolor=BG)
    height = rows * row_in + header_in

    def box(g):
        pad = 0.06
        x0 = (g["x"] * col_in + pad) / (24 * col_in)
        w = (g["w"] * col_in - 2 * pad) / (24 * col_in)
        top = height - header_in - g["y"] * row_in - pad
        h = g["h"] * row_in - 2 * pad
        return x0, (top - h) / height, w, h / height

    fig.text(0.006, 1 - 0.28 / height, dashboard["title"], color=TEXT, fontsize=18, weight="bold",
             va="center")
    started = datetime.fromtimestamp(run_start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    fig.text(0.006, 1 - 0.68 / height,
             f"Prometheus: Prometheus    Job: cliqgate    Route: All        "
             f"{started} UTC + {int(run_end - run_start)} s: a test run of cliqgate with the shipped "
             f"routes in front of a Zoho stand-in (deploy/grafana/render.py)",
             color=MUTED, fontsize=10.5, va="center")

    for p in panels:
        x0, y0, w, h = box(p["gridPos"])
        frame = fig.add_axes([x0, y0, w, h])
        frame.set_xticks([])
        frame.set_yticks([])
        frame.set_facecolor(PANEL)
        for s in frame.spines.values():
            s.set_color(BORDER)
        title_h = 0.3 / (height * h)
        frame.text(0.012, 1 - title_h / 2, p["title"], transform=frame.transAxes, color=TEXT,
                   fontsize=11, weight="bold", va="center")
        series = data[p["id"]]
        defaults = p["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        if p["type"] == "stat":
            values = [v for s in series for _, v in s["values"]]
            last = series[0]["values"][-1][1] if series and series[0]["values"] else None
            color = threshold_color(last if last is not None else 0, defaults["thresholds"]["steps"])
            frame.set_facecolor(color)
            if last is not None and defaults.get("decimals") == 0:
                last = round(last)
            frame.text(0.5, 0.42, fmt_value(last, unit), transform=frame.transAxes, color="white",
                       fontsize=26, weight="bold", ha="center", va="center")
            frame.texts[0].set_color("white")
            if values and series[0]["values"]:
                spark = fig.add_axes([x0, y0, w, h * 0.45])
                spark.set_axis_off()
                ts = [t for t, _ in series[0]["values"]]
                vs = [v for _, v in series[0]["values"]]
                spark.fill_between(ts, vs, color="white", alpha=0.18, linewidth=0)
                spark.set_xlim(run_start, run_end)
                spark.set_ylim(0, max(max(vs) * 1.2, 1e-9))
            continue
        inner = [x0 + w * 0.055, y0 + h * 0.1, w * 0.93, h * (1 - 0.1) - title_h * h - h * 0.03]
        ax = fig.add_axes(inner)
        ax.set_facecolor(PANEL)
        for s in ax.spines.values():
            s.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=8.5)
        ax.grid(color=BORDER, linewidth=0.6)
        ax.yaxis.set_major_formatter(axis_formatter(unit))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.set_xlim(datetime.fromtimestamp(run_start, timezone.utc),
                    datetime.fromtimestamp(run_end, timezone.utc))
        colors = {o["matcher"]["options"]: NAMED.get(prop["value"]["fixedColor"], prop["value"]["fixedColor"])
                  for o in p["fieldConfig"]["overrides"] for prop in o["properties"] if prop["id"] == "color"}
        custom = defaults.get("custom", {})
        stacked = custom.get("stacking", {}).get("mode") == "normal"
        bars = custom.get("drawStyle") == "bars"
        base = {}
        lines = []
        # Every query has the same start, end and step: one time grid. A point a query did not
        # return (a `> 0` filter, a series not yet born) is a gap, as in Grafana (spanNulls off);
        # stacked series count it as 0.
        grid = [run_start + k * SCRAPE_INTERVAL_S for k in range(int((run_end - run_start) // SCRAPE_INTERVAL_S) + 1)]
        ts = [datetime.fromtimestamp(t, timezone.utc) for t in grid]
        for i, s in enumerate(sorted(series, key=lambda s: s["legend"])):
            if not s["values"]:
                continue
            known = {round((t - run_start) / SCRAPE_INTERVAL_S): v for t, v in s["values"]}
            vs = [known.get(k, 0.0 if stacked or bars else float("nan")) for k in range(len(grid))]
            color = colors.get(s["legend"], CLASSIC[i % len(CLASSIC)])
            if bars:
                width = SCRAPE_INTERVAL_S * 3 / 86400
                ax.bar(ts, vs, width=width, color=color, label=s["legend"])
            elif stacked:
                lower = [base.get(k, 0.0) for k in range(len(grid))]
                upper = [lo + v for lo, v in zip(lower, vs)]
                ax.fill_between(ts, lower, upper, color=color, alpha=0.35, linewidth=0)
                ax.plot(ts, upper, color=color, linewidth=1.1, label=s["legend"])
                for k, u in enumerate(upper):
                    base[k] = u
            else:
                ax.plot(ts, vs, color=color, linewidth=1.3, label=s["legend"])
            lines.append(s["legend"])
        if not lines:
            ax.text(0.5, 0.5, "No data (none happened in this run)", transform=ax.transAxes,
                    color=MUTED, fontsize=10, ha="center", va="center")
            ax.set_ylim(0, 1)
        else:
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", fontsize=8, ncol=1 if len(lines) < 7 else 2,
                      facecolor=PANEL, edgecolor=BORDER, labelcolor=TEXT, framealpha=0.85)
    fig.savefig(out, dpi=80, facecolor=BG)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "cliqgate"))
    parser.add_argument("--prometheus", default=shutil.which("prometheus")
                        or str(ROOT / "target" / "deploy-tools" / "usr" / "bin" / "prometheus"))
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "deploy" / "grafana" / "dashboard.png"))
    args = parser.parse_args()
    random.seed(8)
    dashboard = json.loads(DASHBOARD.read_text())
    stub = Stub()
    with tempfile.TemporaryDirectory() as tmp:
        gate, proxy, admin = start_cliqgate(args.binary, stub.url, tmp)
        prom, prom_url = start_prometheus(args.prometheus, admin, tmp)
        try:
            time.sleep(2 * SCRAPE_INTERVAL_S)
            run_start = time.time()
            print(f"cliqgate {proxy} (admin {admin}), Prometheus {prom_url}: "
                  f"running the load for {args.seconds} s", flush=True)
            run_load(f"http://{proxy}", stub, args.seconds, lambda: gate.send_signal(signal.SIGHUP))
            time.sleep(2 * SCRAPE_INTERVAL_S)
            run_end = time.time()
            data = {}
            for p in dashboard["panels"]:
                data[p["id"]] = []
                for t in p["targets"]:
                    expr = fill(t["expr"], int(run_end - run_start))
                    for s in query_range(prom_url, expr, run_start, run_end, SCRAPE_INTERVAL_S):
                        s["legend"] = legend(t.get("legendFormat"), s["metric"])
                        s["values"] = [(float(ts), float(v)) for ts, v in s["values"]
                                       if v not in ("NaN", "+Inf", "-Inf")]
                        data[p["id"]].append(s)
        finally:
            for proc in (prom, gate):
                proc.send_signal(signal.SIGTERM)
            for proc in (prom, gate):
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
    draw(dashboard, data, run_start, run_end, args.out)
    summary = {p["title"]: len(data[p["id"]]) for p in dashboard["panels"]}
    print(f"wrote {os.path.relpath(args.out)}; series per panel: {summary}")


if __name__ == "__main__":
    main()
