"""tandemd benchmark: what the daemon adds to an offloaded request, and the local API's throughput.

Drives daemons that scripts/bench-daemon.sh started (Python 3 standard library only) and prints
Markdown tables.

offload: interleaved rounds of four requests over kept-alive connections, in rotating order:
  direct   the request body the device sends to the cloud, straight to the cloud's endpoint
  device   the same chat request to a device whose model always asks for help (route `cloud`)
  control  the same chat request, max_tokens 1, to a device whose model never asks: the API, the
           chat template and the prefill that an offloaded request also goes through
  healthz  GET /healthz on the device: the HTTP round trip with nothing behind it
Rows are per-round differences (paired), so drift over the run cancels out.

throughput: C clients, each on its own kept-alive connection, send chat requests back to back
for a fixed time; a 429 is counted and the client waits its Retry-After, as OpenAI clients do.

Usage:
  daemon_bench.py offload --cloud URL --device URL --control URL --device-state DIR [--rounds 300]
  daemon_bench.py throughput --url URL [--url-wide URL] [--clients 1,4,16,64] [--duration 10]
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

PROMPT = "What is 2 + 2?"
MAX_TOKENS = 8
# What tandemd's HTTPS offload sends for this request (daemon/src/offload/https.rs), with
# `cloud.https.model = "cloud"`, no temperature and `send_local_attempt` off.
CLOUD_BODY = {
    "model": "cloud",
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": MAX_TOKENS,
    "stream": False,
}
CHAT_BODY = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
CONTROL_BODY = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1}
TIMEOUT_S = 30


class Endpoint:
    """One kept-alive HTTP/1.1 connection to a daemon."""

    def __init__(self, url):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.conn = None

    def _connect(self):
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        self.conn.connect()

    def local_port(self):
        return self.conn.sock.getsockname()[1] if self.conn and self.conn.sock else None

    def request(self, method, path, body=None):
        """(status, headers, body bytes, seconds from sending to the last byte read)."""
        if self.conn is None:
            self._connect()
        headers = {"content-type": "application/json"} if body is not None else {}
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = None
            raise
        elapsed = time.perf_counter() - started
        return response.status, response.headers, data, elapsed


def pct(values, p):
    """Percentile with linear interpolation between closest ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def row(name, values, note=""):
    return (f"| {name} | {pct(values, 50):.2f} | {pct(values, 90):.2f} | {pct(values, 99):.2f} | "
            f"{statistics.fmean(values):.2f} | {note} |")


def cloud_connections(cloud_port):
    """Local ports of established TCP connections to `cloud_port` on this machine."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == cloud_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def write_atomically(path, data):
    """The budget store's write (daemon/src/router/budget_store.rs): temp file, fsync, rename,
    fsync of the directory."""
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def time_budget_writes(directory, size, count):
    """Milliseconds per `write_atomically` of `size` bytes in `directory` (the budget file's disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "budget.json"
    data = b"x" * size
    times = []
    for _ in range(count):
        started = time.perf_counter()
        write_atomically(path, data)
        times.append((time.perf_counter() - started) * 1000)
    return times


def offload(args):
    cloud, device = Endpoint(args.cloud), Endpoint(args.device)
    control, health = Endpoint(args.control), Endpoint(args.device)
    cloud_body = json.dumps(CLOUD_BODY).encode()
    chat_body = json.dumps(CHAT_BODY).encode()
    control_body = json.dumps(CONTROL_BODY).encode()

    def once(kind):
        if kind == "direct":
            status, _, data, elapsed = cloud.request("POST", "/v1/chat/completions", cloud_body)
            if status != 200:
                sys.exit(f"the cloud answered {status}: {data[:300]!r}")
            return elapsed, None
        if kind == "device":
            status, headers, data, elapsed = device.request("POST", "/v1/chat/completions", chat_body)
            body = json.loads(data)
            if status != 200 or headers.get("x-tandem-route") != "cloud":
                sys.exit(f"the device answered {status}, route {headers.get('x-tandem-route')}: "
                         f"{data[:400]!r}")
            return elapsed, body
        if kind == "control":
            status, headers, data, elapsed = control.request("POST", "/v1/chat/completions", control_body)
            if status != 200 or headers.get("x-tandem-route") != "local":
                sys.exit(f"the control device answered {status}: {data[:300]!r}")
            return elapsed, None
        status, _, data, elapsed = health.request("GET", "/healthz")
        if status != 200:
            sys.exit(f"/healthz answered {status}")
        return elapsed, None

    kinds = ["direct", "device", "control", "healthz"]
    for i in range(args.warmup):
        for kind in kinds:
            once(kind)

    samples = {k: [] for k in kinds}
    local_ms, cloud_ms, tokens = [], [], set()
    seen_connections = set()
    cloud_port = urlsplit(args.cloud).port
    started = time.perf_counter()
    for i in range(args.rounds):
        shift = i % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            elapsed, body = once(kind)
            samples[kind].append(elapsed * 1000)
            if body is not None:
                local_ms.append(body["tandem"]["local_ms"])
                cloud_ms.append(body["tandem"]["cloud_ms"])
                tokens.add(body["usage"]["completion_tokens"])
        if i % 25 == 0 or i == args.rounds - 1:
            seen_connections |= cloud_connections(cloud_port) - {cloud.local_port()}
    wall = time.perf_counter() - started

    d, e, c, h = (samples[k] for k in kinds)
    raw = [ei - di for ei, di in zip(e, d)]
    added = [ei - di - li for ei, di, li in zip(e, d, local_ms)]
    path_cost = [ei - di - (ci - hi) for ei, di, ci, hi in zip(e, d, c, h)]
    residual = [ei - li - ci for ei, li, ci in zip(e, local_ms, cloud_ms)]
    half = args.rounds // 2

    state_dir = Path(args.device_state)
    budget_file = state_dir / "budget.json"
    budget_bytes = budget_file.stat().st_size
    budget_entries = len(json.loads(budget_file.read_text()).get("settled", []))
    probe_dir = state_dir.parent / "fsync-probe"
    writes_now = time_budget_writes(probe_dir, budget_bytes, args.fsync_probes)
    per_entry = budget_bytes / max(budget_entries, 1)
    hour_bytes = int(per_entry * 3600)
    writes_hour = time_budget_writes(probe_dir, hour_bytes, args.fsync_probes)

    print(f"\n### Offload overhead ({args.rounds} rounds after {args.warmup} warm-up, "
          f"{wall:.1f} s, max_tokens {MAX_TOKENS})\n")
    print("All times in ms, measured by the client from sending the request to reading the last byte. "
          "Difference rows are per round (paired).\n")
    print("| measure | p50 | p90 | p99 | mean | what |")
    print("|---|---|---|---|---|---|")
    print(row("direct cloud", d, "request body the device sends, straight to the cloud's endpoint"))
    print(row("device end-to-end", e, "route `cloud` every time"))
    print(row("device `tandem.local_ms`", local_ms, "reported by the device (whole ms)"))
    print(row("device `tandem.cloud_ms`", cloud_ms, "reported by the device (whole ms)"))
    print(row("**added overhead**", added, "device − direct − `local_ms`"))
    print(row("raw difference", raw, "device − direct"))
    print(row("local control", c, "never-asking device, max_tokens 1: API + template + prefill"))
    print(row("HTTP floor", h, "`GET /healthz` on the device"))
    print(row("offload path", path_cost, "device − direct − (control − HTTP floor)"))
    print(row("device residual", residual, "device − `local_ms` − `cloud_ms`"))
    print(row("budget write", writes_now,
              f"one fsynced write of the budget file as at the end ({budget_bytes} B); 2 per offload"))
    print(row("budget write, 1 h at 1 query/s", writes_hour,
              f"projected file of {hour_bytes} B ({per_entry:.0f} B per query in the window)"))

    print()
    print(f"- device completion tokens per answer (device + cloud): {sorted(tokens)}")
    print(f"- added overhead p50, first half vs second half of the run: "
          f"{pct(added[:half], 50):.2f} vs {pct(added[half:], 50):.2f} ms "
          f"(the budget file grew to {budget_entries} entries)")
    print(f"- device → cloud TCP connections seen during the run: {len(seen_connections)} "
          f"({'kept alive and reused' if len(seen_connections) == 1 else 'NOT a single reused connection'})")
    p50 = pct(added, 50)
    verdict = "meets" if p50 < 1.0 else "misses"
    print(f"- verdict: added overhead p50 {p50:.2f} ms {verdict} the 1 ms target "
          f"(offload path alone: p50 {pct(path_cost, 50):.2f} ms)")


def throughput(args):
    body = json.dumps(CHAT_BODY).encode()
    levels = [int(c) for c in args.clients.split(",")]
    runs = [(c, args.url, "default (16)") for c in levels]
    if args.url_wide:
        runs += [(c, args.url_wide, args.wide_queue) for c in levels if c > 16]

    def measure(clients, url):
        deadline = time.perf_counter() + args.duration
        results = [[] for _ in range(clients)]
        barrier = threading.Barrier(clients)

        def client(slot):
            endpoint = Endpoint(url)
            barrier.wait()
            while time.perf_counter() < deadline:
                try:
                    status, headers, data, elapsed = endpoint.request("POST", "/v1/chat/completions", body)
                except (http.client.HTTPException, OSError) as e:
                    results[slot].append(("error", 0.0, 0, repr(e)))
                    continue
                tokens = json.loads(data)["usage"]["completion_tokens"] if status == 200 else 0
                results[slot].append((status, elapsed * 1000, tokens, None))
                if status == 429:
                    time.sleep(min(float(headers.get("retry-after", "1")), max(deadline - time.perf_counter(), 0)))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + TIMEOUT_S + 5)
        wall = time.perf_counter() - started
        return [r for rs in results for r in rs], wall

    # Warm-up: the first requests load kernels and allocators.
    for url in {args.url, args.url_wide} - {None}:
        endpoint = Endpoint(url)
        for _ in range(args.warmup):
            endpoint.request("POST", "/v1/chat/completions", body)

    print(f"\n### Local API throughput ({args.duration:.0f} s per row, max_tokens {MAX_TOKENS}, "
          f"route `local`)\n")
    print("| clients | max_queue | requests/s | completion tokens/s | p50 ms | p99 ms | 429s | other errors |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, url, queue in runs:
        print(f"{clients} clients on max_queue {queue}", file=sys.stderr, flush=True)
        results, wall = measure(clients, url)
        ok = [r for r in results if r[0] == 200]
        refused = sum(1 for r in results if r[0] == 429)
        errors = [r for r in results if r[0] not in (200, 429)]
        latencies = [r[1] for r in ok]
        print(f"| {clients} | {queue} | {len(ok) / wall:.1f} | {sum(r[2] for r in ok) / wall:.0f} | "
              f"{pct(latencies, 50):.1f} | {pct(latencies, 99):.1f} | {refused} | {len(errors)} |",
              flush=True)
        for r in errors[:3]:
            print(f"  error: {r}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    o = sub.add_parser("offload")
    o.add_argument("--cloud", required=True)
    o.add_argument("--device", required=True)
    o.add_argument("--control", required=True)
    o.add_argument("--device-state", required=True)
    o.add_argument("--rounds", type=int, default=300)
    o.add_argument("--warmup", type=int, default=30)
    o.add_argument("--fsync-probes", type=int, default=200)
    t = sub.add_parser("throughput")
    t.add_argument("--url", required=True)
    t.add_argument("--url-wide", help="the same device with a larger max_queue, for clients > 16")
    t.add_argument("--wide-queue", default="256")
    t.add_argument("--clients", default="1,4,16,64")
    t.add_argument("--duration", type=float, default=10.0)
    t.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    offload(args) if args.command == "offload" else throughput(args)


if __name__ == "__main__":
    main()
