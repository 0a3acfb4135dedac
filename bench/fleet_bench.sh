#!/usr/bin/env bash
# tandem-fleet ingest: 1,000 simulated devices (`tandem-fleet loadgen`) publish telemetry batches
# through Mosquitto into the fleet (external-broker mode, SQLite). Three phases in one run:
#   1. ceiling:   the broker's own delivery rate to a plain subscriber that only counts
#                 (`tandem-fleet sink`), the load generator publishing as fast as it is acknowledged;
#   2. max:       the same load into the fleet; its commit rate (first to last commit) and no loss;
#   3. sustained: a fixed offered rate for longer; end-to-end latency (event created on the device
#                 → committed in SQLite) and no loss.
# Also the CPU time each process spent per event, which does not depend on how the cores were
# shared with other work, and the bytes the fleet wrote to disk per event.
# Every daemon is on a free loopback port and stopped on exit. Results: stdout and
# .bench/fleet/results.md. Knobs: BENCH_FLEET_{DEVICES,BATCH,MAX_SECONDS,RATE,SECONDS}.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=.bench/fleet
DEVICES=${BENCH_FLEET_DEVICES:-1000}
BATCH=${BENCH_FLEET_BATCH:-20}
MAX_SECONDS=${BENCH_FLEET_MAX_SECONDS:-5}
RATE=${BENCH_FLEET_RATE:-25000}
SUSTAINED_SECONDS=${BENCH_FLEET_SECONDS:-30}
MOSQUITTO=/usr/sbin/mosquitto
[ -x "$MOSQUITTO" ] || { echo "fleet_bench: mosquitto is missing (scripts/test-deps.sh installs it)" >&2; exit 1; }
. bench/fleet_common.sh
cat > "$RUN/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
persistence false
user root
allow_anonymous true
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
log_dest stderr
log_type error
CONF

start_broker() {
    "$MOSQUITTO" -c "$RUN/mosquitto.conf" 2>>"$RUN/mosquitto.log" &
    BROKER=$!
    PIDS+=("$BROKER")
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$MQTT_PORT") 2>/dev/null && return; sleep 0.05; done
    echo "fleet_bench: mosquitto did not start" >&2; exit 1
}
stop_broker() { kill "$BROKER"; wait "$BROKER" 2>/dev/null || true; }

start_fleet() {
    rm -f "$RUN"/fleet.db*
    cat > "$RUN/fleet.toml" <<CONF
[store]
url = "sqlite://$PWD/$RUN/fleet.db"
[mqtt]
mode = "external"
[mqtt.external]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "fleet-bench"
[api]
listen = "127.0.0.1:$API_PORT"
CONF
    "$FLEET" serve --config "$RUN/fleet.toml" 2>>"$RUN/fleet.log" &
    FLEET_PID=$!
    PIDS+=("$FLEET_PID")
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$API_PORT/healthz" | grep -q '"ok"' && return
        sleep 0.05
    done
    echo "fleet_bench: the fleet did not become healthy" >&2; exit 1
}
stop_fleet() { kill "$FLEET_PID"; wait "$FLEET_PID" 2>/dev/null || true; }

# CPU seconds a process has used so far, and bytes it has caused to be written to disk.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
disk_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
stored() {
    curl -s "http://127.0.0.1:$API_PORT/metrics" \
        | awk '/^tandem_fleet_ingest_events_total\{result="stored"\}/ {print $2}' | head -1
}
wait_stored() { # until the fleet stored $1 events (or 600 s)
    for _ in $(seq 6000); do [ "$(stored)" = "$1" ] && return; sleep 0.1; done
    echo "fleet_bench: the fleet stored $(stored) of $1 events" >&2; exit 1
}
loadgen() { "$FLEET" loadgen --url "mqtt://127.0.0.1:$MQTT_PORT" --devices "$DEVICES" --batch "$BATCH" "$@"; }
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }

echo "== 1. broker ceiling: $DEVICES devices, $BATCH events per message, ${MAX_SECONDS} s flat out"
start_broker
rm -f "$RUN/sink.ready"
"$FLEET" sink --url "mqtt://127.0.0.1:$MQTT_PORT" --idle 3 --ready-file "$RUN/sink.ready" > "$RUN/sink.json" &
SINK=$!
PIDS+=("$SINK")
for _ in $(seq 200); do [ -f "$RUN/sink.ready" ] && break; sleep 0.05; done
loadgen --rate 0 --duration "$MAX_SECONDS" --drain 30 > "$RUN/ceiling-load.json"
wait "$SINK"
BROKER_CPU_CEILING=$(cpu_seconds "$BROKER")
stop_broker
CEILING=$(python3 -c "import json; print(round(json.load(open('$RUN/sink.json'))['messages_per_second'] * $BATCH))")
echo "   $CEILING events/s delivered to the discarding subscriber"

echo "== 2. fleet, flat out: same load into tandem-fleet (SQLite)"
start_broker
start_fleet
loadgen --rate 0 --duration "$MAX_SECONDS" --drain 120 > "$RUN/max-load.json"
wait_stored "$(json "$RUN/max-load.json" "['events_acked']")"
FLEET_CPU=$(cpu_seconds "$FLEET_PID")
FLEET_DISK=$(disk_bytes "$FLEET_PID")
FLEET_PEAK_MIB=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$FLEET_PID/status")
BROKER_CPU_MAX=$(cpu_seconds "$BROKER")
stop_fleet
stop_broker
python3 - "$RUN/fleet.db" "$RUN/max-load.json" "$FLEET_CPU" "$FLEET_DISK" > "$RUN/max.json" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
load = json.load(open(sys.argv[2]))
n, first, last = db.execute("SELECT COUNT(*), MIN(received_ms), MAX(received_ms) FROM events").fetchone()
print(json.dumps({"events": n, "acked": load["events_acked"], "seconds": (last - first) / 1000,
                  "events_per_second": round(n / max((last - first) / 1000, 1e-9)),
                  "fleet_cpu_us_per_event": round(float(sys.argv[3]) * 1e6 / max(n, 1), 1),
                  "fleet_disk_bytes_per_event": round(int(sys.argv[4]) / max(n, 1))}))
PY
MAX=$(json "$RUN/max.json" "['events_per_second']")
echo "   $MAX events/s committed ($(json "$RUN/max.json" "['events']") events, $(json "$RUN/max.json" "['acked']") acknowledged to devices)"

echo "== 3. fleet, sustained: $RATE events/s offered for ${SUSTAINED_SECONDS} s"
start_broker
start_fleet
loadgen --rate "$RATE" --duration "$SUSTAINED_SECONDS" --drain 120 > "$RUN/sustained-load.json"
wait_stored "$(json "$RUN/sustained-load.json" "['events_acked']")"
stop_fleet
stop_broker
python3 - "$RUN/fleet.db" "$RUN/sustained-load.json" > "$RUN/sustained.json" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
load = json.load(open(sys.argv[2]))
lag = [r[0] for r in db.execute("SELECT received_ms - at_ms FROM events ORDER BY 1")]
n = len(lag)
pick = lambda q: lag[min(n - 1, int(q * n))]
print(json.dumps({"events": n, "acked": load["events_acked"], "offered_seconds": load["seconds"],
                  "events_per_second": round(load["events_acked"] / load["seconds"]),
                  "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": lag[-1]}))
PY
SUSTAINED=$(json "$RUN/sustained.json" "['events_per_second']")
P50=$(json "$RUN/sustained.json" "['p50_ms']")
P99=$(json "$RUN/sustained.json" "['p99_ms']")
LOSS_MAX=$(( $(json "$RUN/max.json" "['acked']") - $(json "$RUN/max.json" "['events']") ))
LOSS_SUSTAINED=$(( $(json "$RUN/sustained.json" "['acked']") - $(json "$RUN/sustained.json" "['events']") ))
PERCENT=$(python3 -c "print(round(100 * $MAX / $CEILING))")
# CPU per event, whatever share of the cores each process got: the broker's over everything it
# delivered in each phase (the load generator's messages in, the subscriber's out), the fleet's
# over everything it stored (parsing, SQLite, acknowledging).
CEILING_EVENTS=$(json "$RUN/ceiling-load.json" "['events_acked']")
BROKER_US_CEILING=$(python3 -c "print(round($BROKER_CPU_CEILING * 1e6 / $CEILING_EVENTS, 1))")
BROKER_US_MAX=$(python3 -c "print(round($BROKER_CPU_MAX * 1e6 / $(json "$RUN/max.json" "['events']"), 1))")
FLEET_US=$(json "$RUN/max.json" "['fleet_cpu_us_per_event']")
FLEET_BYTES=$(json "$RUN/max.json" "['fleet_disk_bytes_per_event']")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "| run ($DEVICES devices, $BATCH events per message, Mosquitto, SQLite) | events/s | end-to-end p50 | end-to-end p99 | acknowledged but not stored |"
    echo "|---|---|---|---|---|"
    echo "| broker ceiling: discarding subscriber, flat out | $CEILING | – | – | – |"
    echo "| tandem-fleet, flat out | $MAX ($PERCENT % of the ceiling) | – | – | $LOSS_MAX |"
    echo "| tandem-fleet, $RATE events/s offered for ${SUSTAINED_SECONDS} s | $SUSTAINED | $P50 ms | $P99 ms | $LOSS_SUSTAINED |"
    echo
    echo "CPU per event: Mosquitto $BROKER_US_CEILING µs (ceiling run), $BROKER_US_MAX µs (into the fleet);"
    echo "tandem-fleet $FLEET_US µs, and $FLEET_BYTES bytes written to disk per event (flat out); its peak resident size $FLEET_PEAK_MIB MiB."
    echo "Load average at the end: $LOAD (2 vCPU; the load generator, Mosquitto and the fleet share them)."
} | tee "$BENCH/results.md"
[ "$LOSS_MAX" = 0 ] && [ "$LOSS_SUSTAINED" = 0 ] || { echo "fleet_bench: events were lost" >&2; exit 1; }
