#!/usr/bin/env bash
# A staged rollout through 1,000 simulated devices: `tandem-fleet serve` (embedded broker, SQLite,
# registry holding the committed signed bundles models/countdown-tiny-v1 and -v2), 1,000
# `tandem-fleet loadgen --follow-assignments` devices serving v1 and sending telemetry, then v2
# registered and rolled out in stages (default 1 % → 10 % → 50 % → 100 %, a short soak each).
# Every device downloads the whole bundle from the fleet's registry over HTTP (at most
# BENCH_ROLLOUT_CONCURRENCY downloads at once over all devices), checks the manifest's sha256 and
# signature and every file's sha256, reports downloading → verifying → active, and sends telemetry
# from v2, which is what the rollout's stage gates wait for.
# Measured: time from the rollout's creation to every device reporting v2 active and to the
# rollout's completion, per stage; the fleet process's CPU time (utime + stime from /proc/PID/stat)
# and memory (VmRSS sampled every 100 ms, VmHWM) while it runs. Results: stdout and
# .bench/rollout/results.md. Knobs: BENCH_ROLLOUT_{DEVICES,RATE,BATCH,STAGES,SOAK,CONCURRENCY,
# EVALUATE_MS,DOWNLOAD}.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=.bench/rollout
DEVICES=${BENCH_ROLLOUT_DEVICES:-1000}
RATE=${BENCH_ROLLOUT_RATE:-1000}
BATCH=${BENCH_ROLLOUT_BATCH:-5}
STAGES=${BENCH_ROLLOUT_STAGES:-1,10,50,100}
SOAK=${BENCH_ROLLOUT_SOAK:-5}
CONCURRENCY=${BENCH_ROLLOUT_CONCURRENCY:-32}
EVALUATE_MS=${BENCH_ROLLOUT_EVALUATE_MS:-1000}
DOWNLOAD=${BENCH_ROLLOUT_DOWNLOAD:-1}
. bench/fleet_common.sh
API="http://127.0.0.1:$API_PORT"
cat > "$RUN/fleet.toml" <<CONF
[store]
url = "sqlite://$PWD/$RUN/fleet.db"
[mqtt.embedded]
listen = "127.0.0.1:$MQTT_PORT"
allow_anonymous = true
[api]
listen = "127.0.0.1:$API_PORT"
[registry]
dir = "$PWD/$RUN/registry"
trusted_keys = ["$PWD/models/keys/demo.pub"]
[rollouts]
evaluate_interval_ms = $EVALUATE_MS
CONF

"$FLEET" serve --config "$RUN/fleet.toml" 2>>"$RUN/fleet.log" &
FLEET_PID=$!
PIDS+=("$FLEET_PID")
for _ in $(seq 200); do
    curl -sf "$API/healthz" | grep -q '"ok"' && break
    sleep 0.05
done
curl -sf "$API/healthz" | grep -q '"ok"' || { echo "rollout_bench: the fleet did not become healthy" >&2; exit 1; }
curl -sf -X POST "$API/v1/models" -H 'content-type: application/json' \
    -d "{\"path\": \"$PWD/models/countdown-tiny-v1\"}" > "$RUN/register-v1.json"

FOLLOW=(--follow-assignments --trusted-key models/keys/demo.pub --download-concurrency "$CONCURRENCY")
[ "$DOWNLOAD" = 1 ] || FOLLOW+=(--skip-download)
echo "== $DEVICES loadgen devices on v1 ($RATE events/s in all, $BATCH per message), following assignments"
"$FLEET" loadgen --url "mqtt://127.0.0.1:$MQTT_PORT" --devices "$DEVICES" --rate "$RATE" --batch "$BATCH" \
    --duration 3600 --drain 10 --model-version 1 "${FOLLOW[@]}" > "$RUN/loadgen.json" 2>"$RUN/loadgen.log" &
LOADGEN_PID=$!
PIDS+=("$LOADGEN_PID")

python3 - "$API" "$FLEET_PID" "$LOADGEN_PID" "$DEVICES" "$STAGES" "$SOAK" "$RUN" <<'PY'
import json, os, sys, time, urllib.request

api, fleet_pid, loadgen_pid, devices, stages, soak, run = sys.argv[1:]
devices, soak = int(devices), int(soak)
ticks = os.sysconf("SC_CLK_TCK")

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

def memory_kib(pid):
    values = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values

def wait(what, check, limit=600):
    started = time.time()
    while not check():
        if time.time() - started > limit:
            sys.exit(f"rollout_bench: timed out waiting until {what}")
        time.sleep(0.2)

def listed():
    return call("GET", "/v1/devices")["devices"]

wait(f"{devices} devices are online on v1", lambda: sum(
    1 for d in listed() if d["status"] == "online" and d["reported_version"] == "1") == devices)
time.sleep(2)  # let the connection burst settle
before = {"fleet_cpu_s": cpu_seconds(fleet_pid), "loadgen_cpu_s": cpu_seconds(loadgen_pid),
          "fleet_memory_kib": memory_kib(fleet_pid)}
call("POST", "/v1/models", {"path": os.path.abspath("models/countdown-tiny-v2")})
percents = [float(p) for p in stages.split(",")]
plan = [{"percent": p, "soak_secs": soak} for p in percents[:-1]] + [{"percent": percents[-1]}]

started = time.time()
cpu0, lcpu0 = cpu_seconds(fleet_pid), cpu_seconds(loadgen_pid)
rollout = call("POST", "/v1/rollouts", {"model": "countdown-tiny", "version": "2", "stages": plan})
rid = rollout["id"]
created_ms = rollout["created_ms"]
stage_started = {0: rollout["stage_started_ms"]}
rss_peak, samples, all_active_s, completed_s, last_devices_poll = 0, [], None, None, 0.0
while True:
    now = time.time()
    rss_peak = max(rss_peak, memory_kib(fleet_pid)["VmRSS"])
    samples.append((now - started, cpu_seconds(fleet_pid) - cpu0))
    r = call("GET", f"/v1/rollouts/{rid}")
    stage_started.setdefault(r["stage"], r["stage_started_ms"])
    if r["status"] not in ("running", "completed"):
        sys.exit(f"rollout_bench: the rollout is {r['status']}: {r.get('reason')}")
    if all_active_s is None and now - last_devices_poll > 0.5:
        last_devices_poll = now
        active = sum(1 for d in listed() if d["reported_version"] == "2"
                     and (d.get("update") or {}).get("state") == "active")
        if active == devices:
            all_active_s = time.time() - started
    if r["status"] == "completed" and completed_s is None:
        completed_s = (r["updated_ms"] - created_ms) / 1000
    if completed_s is not None and all_active_s is not None:
        break
    if now - started > 1800:
        sys.exit("rollout_bench: the rollout did not complete in 30 minutes")
    time.sleep(0.1)
wall = time.time() - started
cpu = cpu_seconds(fleet_pid) - cpu0
loadgen_cpu = cpu_seconds(loadgen_pid) - lcpu0
after_memory = memory_kib(fleet_pid)

# Per stage, from the fleet's records: when it started, when the last of its devices reported v2
# active (fleet clock, update.received_ms), and assignment → active per device.
final = call("GET", f"/v1/rollouts/{rid}")
reached = {d["id"]: d["assigned_at_ms"] for d in final["devices"]}
active_ms = {d["id"]: d["update"]["received_ms"] for d in listed()
             if (d.get("update") or {}).get("version") == "2"}
starts = [stage_started[i] for i in range(len(plan))]
rows = []
for i, stage in enumerate(plan):
    end = starts[i + 1] if i + 1 < len(plan) else float("inf")
    # 500 ms of slack: a stage's assignments and its start are recorded in one step.
    members = [d for d, at in reached.items() if starts[i] <= at + 500 < end]
    lags = sorted(active_ms[d] - reached[d] for d in members)
    rows.append({
        "stage": i + 1, "percent": stage["percent"], "new_devices": len(members),
        "started_s": (starts[i] - created_ms) / 1000,
        "all_active_s": (max(active_ms[d] for d in members) - created_ms) / 1000 if members else None,
        "ends_s": ((starts[i + 1] if i + 1 < len(plan) else final["updated_ms"]) - created_ms) / 1000,
        "assign_to_active_p50_ms": lags[len(lags) // 2] if lags else None,
        "assign_to_active_max_ms": lags[-1] if lags else None,
    })
cpu_1s = max((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[10:]) if b[0] > a[0]) \
    if len(samples) > 10 else cpu / wall
result = {
    "devices": devices, "plan": plan, "rollout": rid,
    "all_active_s": all_active_s, "completed_s": completed_s, "wall_s": wall, "stages": rows,
    "fleet_cpu_s": cpu, "fleet_cpu_cores_avg": cpu / wall, "fleet_cpu_cores_peak_1s": cpu_1s,
    "fleet_rss_peak_mib": rss_peak / 1024, "fleet_vmhwm_mib": after_memory["VmHWM"] / 1024,
    "fleet_rss_before_mib": before["fleet_memory_kib"]["VmRSS"] / 1024,
    "loadgen_cpu_s": loadgen_cpu, "loadavg": open("/proc/loadavg").read().split()[:3],
}
json.dump(result, open(f"{run}/result.json", "w"), indent=1)
PY

kill -TERM "$LOADGEN_PID"
wait "$LOADGEN_PID" || true
python3 - "$RUN" "$BENCH" "$DOWNLOAD" "$CONCURRENCY" "$EVALUATE_MS" "$RATE" "$BATCH" <<'PY'
import json, sys
run, bench, download, concurrency, evaluate_ms, rate, batch = sys.argv[1:]
r = json.load(open(f"{run}/result.json"))
load = json.load(open(f"{run}/loadgen.json"))
u = load.get("updates") or {}
mib = u.get("bytes_downloaded", 0) / 2**20
how = (f"each device downloads the whole bundle (manifest + 4 files, {mib / max(u.get('downloads', 1), 1):.1f} MiB) "
       f"from the fleet's registry, at most {concurrency} at once over all devices, and verifies the "
       f"signature and every sha256" if download == "1" else "downloads skipped (states reported only)")
plan = " → ".join(f"{s['percent']:g} %" for s in r["plan"])
soak = r["plan"][0].get("soak_secs", 0)
fmt = lambda v: "–" if v is None else f"{v:.1f} s"
lines = [
    f"Rollout of v2 through {r['devices']} simulated devices, stages {plan} (soak {soak} s each but the last; "
    f"rollouts evaluated every {evaluate_ms} ms); {how}; telemetry {rate} events/s in all, {batch} per message.",
    "",
    "| stage | percent | devices it added | started | its last device active | next stage / completed | assignment → active p50 / max |",
    "|---|---|---|---|---|---|---|",
]
for s in r["stages"]:
    p50 = s["assign_to_active_p50_ms"]
    mx = s["assign_to_active_max_ms"]
    lag = "–" if p50 is None else f"{p50 / 1000:.2f} s / {mx / 1000:.2f} s"
    lines.append(f"| {s['stage']} | {s['percent']:g} | {s['new_devices']} | {fmt(s['started_s'])} | "
                 f"{fmt(s['all_active_s'])} | {fmt(s['ends_s'])} | {lag} |")
lines += [
    "",
    "| measure | value |",
    "|---|---|",
    f"| creation → every device reports v2 active | {fmt(r['all_active_s'])} (polled every 0.5 s) |",
    f"| creation → rollout completed | {fmt(r['completed_s'])} |",
    f"| downloads verified / failed / resumed | {u.get('downloads', '–')} / {u.get('failures', '–')} / {u.get('download_resumes', '–')} |",
    f"| bytes served by the registry | {mib:.0f} MiB |",
    f"| download time per device (slot held) p50 / p99 | {(u.get('download_ms') or {}).get('p50', '–')} ms / {(u.get('download_ms') or {}).get('p99', '–')} ms |",
    f"| fleet CPU during the rollout | {r['fleet_cpu_s']:.1f} s in {r['wall_s']:.1f} s = {r['fleet_cpu_cores_avg']:.2f} cores on average, {r['fleet_cpu_cores_peak_1s']:.2f} at the busiest 1 s |",
    f"| fleet memory | RSS {r['fleet_rss_before_mib']:.0f} MiB before, {r['fleet_rss_peak_mib']:.0f} MiB peak during (VmHWM {r['fleet_vmhwm_mib']:.0f} MiB) |",
    f"| load generator CPU during the rollout | {r['loadgen_cpu_s']:.1f} s |",
    f"| devices serving v2 at the end (load generator) | {u.get('serving', {}).get('2', 0)} of {r['devices']} |",
    "",
    f"Load average at the end: {' '.join(r['loadavg'])} ({__import__('os').cpu_count()} CPUs; the fleet, the load generator and anything else running share them).",
]
text = "\n".join(lines)
print(text)
open(f"{bench}/results.md", "w").write(text + "\n")
ok = u.get("serving", {}).get("2", 0) == r["devices"] and u.get("failures", 0) == 0
sys.exit(0 if ok else 1)
PY
