"""tandemd benchmark: what the daemon adds to an offloaded request, and the local API's throughput.

Drives daemons that scripts/bench-daemon.sh started (Python 3 standard library only) and prints
Markdown tables.

offload: interleaved rounds over kept-alive connections, in rotating order, of
  direct        the request body the device sends to the cloud, straight to the cloud's endpoint
  device        the same chat request to a device whose model always asks for help (route `cloud`),
                state (budget journal, telemetry spool) on disk as deployed
  budget_tmpfs  the same device with its state_dir (the budget journal) on tmpfs, where fsync is free
  all_tmpfs     the same with the telemetry spool on tmpfs too
  control       the chat request with max_tokens 1 to a never-asking device with all state on tmpfs:
                the API, chat template and prefill an offloaded request goes through before asking
  healthz       GET /healthz on the control device: the HTTP round trip with nothing behind it
  append        one budget-journal append: a record written into a preallocated file, fdatasync
Differences are taken per round (paired), so drift over the run cancels out. Added overhead =
device − direct − (control − healthz), split into budget fsyncs (device − budget_tmpfs), spool
fsync (budget_tmpfs − all_tmpfs) and the rest.

throughput: C clients, each on its own kept-alive connection, send chat requests back to back
for a fixed time; a 429 is counted and the client waits its Retry-After, as OpenAI clients do.

Usage:
  daemon_bench.py offload --cloud URL --device URL --device-pid PID --device-state DIR
                          --device-budget-tmpfs URL --device-all-tmpfs URL --control URL [--rounds 300]
  daemon_bench.py throughput --target LABEL URL MAX_QUEUE CLIENTS [--target ...] [--duration 10]
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


def paired(f, *series):
    """`f` applied to the values of one round of each series, for every round."""
    return [f(*values) for values in zip(*series)]


def row(name, values, note=""):
    return (f"| {name} | {pct(values, 50):.2f} | {pct(values, 90):.2f} | {pct(values, 99):.2f} | "
            f"{statistics.fmean(values):.2f} | {note} |")


def cloud_connections(pid, cloud_port):
    """Local ports of the established TCP connections that process `pid` holds to `cloud_port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == cloud_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class JournalProbe:
    """Appends the way the budget store appends a reservation (daemon/src/router/budget_journal.rs):
    a record of about 90 bytes written after the last one into a file preallocated with zeros,
    then fdatasync."""

    RECORD = b"r" * 90
    SIZE = 1 << 20

    def __init__(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "budget-probe.journal"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(self.fd, b"\0" * self.SIZE)
        os.fsync(self.fd)
        self.end = 0

    def append(self):
        """Milliseconds for one append."""
        if self.end + len(self.RECORD) > self.SIZE:
            self.end = 0
        started = time.perf_counter()
        os.pwrite(self.fd, self.RECORD, self.end)
        os.fdatasync(self.fd)
        self.end += len(self.RECORD)
        return (time.perf_counter() - started) * 1000

    def close(self):
        os.close(self.fd)
        self.path.unlink()


def journal_records(path):
    """(records, bytes) of the records at the start of a budget journal (length-prefixed frames,
    zeros after the last one)."""
    data = path.read_bytes()
    at = records = 0
    while at + 8 <= len(data):
        length = int.from_bytes(data[at:at + 4], "little")
        if length == 0 or at + 8 + length > len(data):
            break
        at += 8 + length
        records += 1
    return records, at


def offload(args):
    cloud_body = json.dumps(CLOUD_BODY).encode()
    chat_body = json.dumps(CHAT_BODY).encode()
    control_body = json.dumps(CONTROL_BODY).encode()
    state_dir = Path(args.device_state)
    probe = JournalProbe(state_dir.parent / "fsync-probe")

    def post(url, body, route):
        endpoint = Endpoint(url)

        def send():
            status, headers, data, elapsed = endpoint.request("POST", "/v1/chat/completions", body)
            if status != 200 or (route and headers.get("x-tandem-route") != route):
                sys.exit(f"{url} answered {status}, route {headers.get('x-tandem-route')} "
                         f"(expected {route}): {data[:400]!r}")
            return elapsed, json.loads(data)
        return send

    def healthz():
        status, _, _, elapsed = health.request("GET", "/healthz")
        if status != 200:
            sys.exit(f"/healthz answered {status}")
        return elapsed, None

    def journal_append():
        return probe.append() / 1000, None

    health = Endpoint(args.control)
    requests = {
        "direct": post(args.cloud, cloud_body, None),
        "device": post(args.device, chat_body, "cloud"),
        "budget_tmpfs": post(args.device_budget_tmpfs, chat_body, "cloud"),
        "all_tmpfs": post(args.device_all_tmpfs, chat_body, "cloud"),
        "control": post(args.control, control_body, "local"),
        "healthz": healthz,
        "append": journal_append,
    }
    kinds = list(requests)
    for _ in range(args.warmup):
        for kind in kinds:
            requests[kind]()

    samples = {k: [] for k in kinds}
    local_ms, cloud_ms, tokens = [], [], set()
    seen_connections = set()
    cloud_port = urlsplit(args.cloud).port
    started = time.perf_counter()
    for i in range(args.rounds):
        shift = i % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            elapsed, body = requests[kind]()
            samples[kind].append(elapsed * 1000)
            if kind == "device":
                local_ms.append(body["tandem"]["local_ms"])
                cloud_ms.append(body["tandem"]["cloud_ms"])
                tokens.add(body["usage"]["completion_tokens"])
        if i % 25 == 0 or i == args.rounds - 1:
            seen_connections |= cloud_connections(args.device_pid, cloud_port)
    wall = time.perf_counter() - started

    d, e, bt, at, c, h, w = (samples[k] for k in kinds)
    local_work = paired(lambda ci, hi: ci - hi, c, h)
    added = paired(lambda ei, di, li: ei - di - li, e, d, local_work)
    rest = paired(lambda ai, di, li: ai - di - li, at, d, local_work)
    snapshot = state_dir / "budget.json"
    snapshot_entries = len(json.loads(snapshot.read_text())["state"]["settled"])
    journals = sorted(state_dir.glob("budget-*.journal"))
    appends_back_to_back = [probe.append() for _ in range(args.fsync_probes)]
    probe.close()
    half = args.rounds // 2

    print(f"\n### Offload overhead ({args.rounds} interleaved rounds after {args.warmup} warm-up, "
          f"{wall:.1f} s, max_tokens {MAX_TOKENS})\n")
    print("Times in ms, measured by the client from sending the request to reading the last byte. "
          "Difference rows are computed per round (paired), so their percentiles do not add up; "
          "their means do.\n")
    print("| measure | p50 | p90 | p99 | mean | what |")
    print("|---|---|---|---|---|---|")
    print(row("direct cloud", d, "the body the device sends, straight to the cloud's endpoint"))
    print(row("device end-to-end", e, "route `cloud` every time; state on disk, as deployed"))
    print(row("device `tandem.local_ms`", local_ms, "as reported (whole ms)"))
    print(row("device `tandem.cloud_ms`", cloud_ms, "as reported (whole ms)"))
    print(row("raw difference", paired(lambda ei, di: ei - di, e, d), "device − direct"))
    print(row("device − direct − `local_ms`", paired(lambda ei, di, li: ei - di - li, e, d, local_ms),
              "the intended subtraction; see the note on `local_ms`"))
    print(row("local work", local_work, "never-asking device (state on tmpfs), max_tokens 1, − HTTP floor: "
              "API, template, prefill, the first token"))
    print(row("**added overhead**", added, "device − direct − local work"))
    print(row("… budget journal fsync", paired(lambda ei, bi: ei - bi, e, bt),
              "device − the same device with `state_dir` on tmpfs"))
    print(row("… telemetry spool fsync", paired(lambda bi, ai: bi - ai, bt, at),
              "budget on tmpfs − budget and spool on tmpfs"))
    print(row("… the rest (no disk)", rest, "all state on tmpfs − direct − local work"))
    print(row("HTTP floor", h, "`GET /healthz`"))
    print(row("budget journal append", w, "one record written into a preallocated file + fdatasync, "
              "same disk, once per round; 1 per offload"))
    print(row("budget journal append, back to back", appends_back_to_back,
              f"{args.fsync_probes} such appends in a row, as under a steady stream of offloads"))
    print()
    print(f"- completion tokens per answer (device + cloud): {sorted(tokens)}")
    print(f"- budget state at the end: snapshot {snapshot.stat().st_size} B ({snapshot_entries} entries), "
          f"journal {', '.join(f'{j.name}: {journal_records(j)[0]} records, {journal_records(j)[1]} B of {j.stat().st_size} B preallocated' for j in journals)}; added overhead p50, first "
          f"vs second half of the run: {pct(added[:half], 50):.2f} vs {pct(added[half:], 50):.2f} ms")
    print(f"- device → cloud TCP connections seen during the run: {len(seen_connections)} "
          f"({'kept alive and reused' if len(seen_connections) == 1 else 'NOT one reused connection'})")
    p50 = pct(added, 50)
    print(f"- verdict: added overhead p50 {p50:.2f} ms {'meets' if p50 < 1.0 else 'misses'} the 1 ms "
          f"target; without disk writes {pct(rest, 50):.2f} ms")


def throughput(args):
    body = json.dumps(CHAT_BODY).encode()

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
                    time.sleep(0.1)
                    continue
                if status == 200:
                    answer = json.loads(data)
                    results[slot].append((status, elapsed * 1000, answer["usage"]["completion_tokens"],
                                          answer["tandem"]["route"]))
                else:
                    results[slot].append((status, elapsed * 1000, 0, data[:200]))
                if status == 429:
                    wait = float(headers.get("retry-after", "1"))
                    time.sleep(min(wait, max(deadline - time.perf_counter(), 0)))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        started, cpu_started = time.perf_counter(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + TIMEOUT_S + 5)
        wall = time.perf_counter() - started
        client_cores = (time.process_time() - cpu_started) / wall
        return [r for rs in results for r in rs], wall, client_cores

    print(f"\n### API throughput ({args.duration:.0f} s per row, max_tokens {MAX_TOKENS})\n")
    print("| daemon | clients | max_queue | requests/s | completion tokens/s | p50 ms | p99 ms | 429s "
          "| other errors | routes | client CPU (cores) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    warmed = set()
    for label, url, queue, clients in args.target:
        if url not in warmed:
            endpoint = Endpoint(url)
            for _ in range(args.warmup):
                endpoint.request("POST", "/v1/chat/completions", body)
            warmed.add(url)
        for n in [int(c) for c in clients.split(",")]:
            print(f"{label}: {n} clients", file=sys.stderr, flush=True)
            results, wall, client_cores = measure(n, url)
            ok = [r for r in results if r[0] == 200]
            refused = sum(1 for r in results if r[0] == 429)
            errors = [r for r in results if r[0] not in (200, 429)]
            routes = sorted({r[3] for r in ok})
            latencies = [r[1] for r in ok]
            print(f"| {label} | {n} | {queue} | {len(ok) / wall:.1f} | {sum(r[2] for r in ok) / wall:.0f} | "
                  f"{pct(latencies, 50):.1f} | {pct(latencies, 99):.1f} | {refused} | {len(errors)} | "
                  f"{', '.join(routes)} | {client_cores:.2f} |", flush=True)
            for r in errors[:3]:
                print(f"  error: {r}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    o = sub.add_parser("offload")
    o.add_argument("--cloud", required=True)
    o.add_argument("--device", required=True, help="the offloading device, state on disk")
    o.add_argument("--device-pid", type=int, required=True, help="to watch its connections to the cloud")
    o.add_argument("--device-state", required=True, help="its state_dir")
    o.add_argument("--device-budget-tmpfs", required=True, help="the same device, state_dir on tmpfs")
    o.add_argument("--device-all-tmpfs", required=True, help="the same, state_dir and spool on tmpfs")
    o.add_argument("--control", required=True, help="a never-asking device, state_dir and spool on tmpfs")
    o.add_argument("--rounds", type=int, default=300)
    o.add_argument("--warmup", type=int, default=30)
    o.add_argument("--fsync-probes", type=int, default=100)
    t = sub.add_parser("throughput")
    t.add_argument("--target", nargs=4, action="append", required=True,
                   metavar=("LABEL", "URL", "MAX_QUEUE", "CLIENTS"),
                   help="a daemon to load, with its max_queue (for the table) and client counts, e.g. 1,4,16")
    t.add_argument("--duration", type=float, default=10.0)
    t.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    offload(args) if args.command == "offload" else throughput(args)


if __name__ == "__main__":
    main()
