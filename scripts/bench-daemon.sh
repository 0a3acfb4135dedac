#!/usr/bin/env bash
# `make bench`, after the engine: what tandemd adds to an offloaded request over calling the cloud
# directly, and the local API's throughput with concurrent clients. A tiny random model (made once
# in .bench/daemon/), daemons on free loopback ports, all stopped on exit. Results: stdout and
# .bench/daemon/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ORT_DYLIB_PATH:?run through make bench}"
BENCH=.bench/daemon
TANDEMD=./target/release/tandemd
TRAIN=./target/release/tandem-train
ROUNDS=${BENCH_DAEMON_ROUNDS:-300}
DURATION=${BENCH_DAEMON_SECONDS:-10}
mkdir -p "$BENCH"

# scripts/bench.sh has just built them and says so; run alone, this builds them.
if [ -z "${BENCH_BUILT:-}" ]; then
    cargo build --release -p tandemd -p tandem-train
fi

MODEL="$BENCH/tiny-qwen2"
if [ ! -f "$MODEL/manifest.json" ]; then
    echo "== creating the tiny model"
    "$TRAIN" init --preset tiny-qwen2 --out "$BENCH/tiny-checkpoint" --seed 41
    "$TRAIN" export --from "$BENCH/tiny-checkpoint" --out "$MODEL" --overwrite
    rm -rf "$BENCH/tiny-checkpoint"
fi

echo "== tandemd: offload overhead and local API throughput"
RUN="$BENCH/run"
rm -rf "$RUN"
mkdir -p "$RUN"
# Some daemons keep their state on tmpfs, where fsync costs nothing.
SHM=$(mktemp -d /dev/shm/tandem-bench.XXXXXX)
PIDS=()
stop_daemons() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$SHM"
}
trap stop_daemons EXIT INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_daemon NAME STATE_DIR CONFIG: starts `tandemd serve` with CONFIG in $RUN/NAME, waits for
# /healthz and sets PORT and DAEMON_PID. No TANDEM_* variable from the caller's environment
# reaches it.
start_daemon() {
    local name=$1 state=$2 config=$3 dir="$RUN/$1"
    mkdir -p "$dir"
    printf 'state_dir = "%s"\n%s\n' "$state" "$config" > "$dir/tandemd.toml"
    PORT=$(free_port)
    local unset_env=()
    for var in $(compgen -e | grep '^TANDEM_' || true); do unset_env+=(-u "$var"); done
    env "${unset_env[@]}" -u RUST_LOG "$TANDEMD" serve --model "$MODEL" --listen "127.0.0.1:$PORT" \
        --config "$dir/tandemd.toml" > "$dir/tandemd.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    DAEMON_PID=$pid
    local deadline=$((SECONDS + 60))
    until curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "tandemd '$name' did not become healthy:" >&2
            cat "$dir/tandemd.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

ALWAYS_ASK=60.0
NEVER_ASK=-60.0
start_daemon cloud "$PWD/$RUN/cloud/state" "device_id = \"cloud\"
[router]
help_bias = $NEVER_ASK"
CLOUD="http://127.0.0.1:$PORT"

# device_config HELP_BIAS MAX_QUEUE [SPOOL_DIR]: a device with offloading set up, over HTTPS (plain
# HTTP on loopback) to the cloud above, a budget that never refuses, telemetry kept in the spool
# (no transport; under state_dir unless SPOOL_DIR), default logging (info).
device_config() {
    printf '%s\n' "device_id = \"robot-1\"" "[router]" "help_bias = $1" \
        "[server]" "max_queue = $2" \
        "[cloud]" "attempts_per_transport = 1" \
        "[cloud.https]" "url = \"$CLOUD\"" "model = \"cloud\"" \
        "[budget]" "cloud_fraction = 0.99" "burst = 1000000" \
        "[telemetry]" "transport = { kind = \"none\" }"
    if [ -n "${3:-}" ]; then echo "spool_dir = \"$3\""; fi
}
# The offloading device as deployed, then the same with its budget journal on tmpfs, then with its
# telemetry spool on tmpfs too: the differences are what the fsyncs cost.
start_daemon device-offload "$PWD/$RUN/device-offload/state" "$(device_config $ALWAYS_ASK 16)"
DEVICE="http://127.0.0.1:$PORT"
DEVICE_PID=$DAEMON_PID
start_daemon device-offload-budget-tmpfs "$SHM/budget-tmpfs" \
    "$(device_config $ALWAYS_ASK 16 "$PWD/$RUN/device-offload-budget-tmpfs/telemetry")"
DEVICE_BUDGET_TMPFS="http://127.0.0.1:$PORT"
start_daemon device-offload-all-tmpfs "$SHM/all-tmpfs" "$(device_config $ALWAYS_ASK 16)"
DEVICE_ALL_TMPFS="http://127.0.0.1:$PORT"
# What an offloaded request does before it asks: a never-asking device answering one token.
start_daemon control "$SHM/control" "$(device_config $NEVER_ASK 16)"
CONTROL="http://127.0.0.1:$PORT"
start_daemon device-local "$PWD/$RUN/device-local/state" "$(device_config $NEVER_ASK 16)"
LOCAL="http://127.0.0.1:$PORT"
WIDE_QUEUE=256
start_daemon device-local-wide "$PWD/$RUN/device-local-wide/state" "$(device_config $NEVER_ASK $WIDE_QUEUE)"
LOCAL_WIDE="http://127.0.0.1:$PORT"

ORT_RUNTIME=$(curl -sf "$DEVICE/v1/status" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["model"]["ort_version"])')
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
STATE_FS=$(df -T "$RUN" | awk 'NR == 2 {print $2}')
{
    echo "Machine: $(nproc) vCPU ($CPU), shared; ONNX Runtime $ORT_RUNTIME (CPU EP); $($TANDEMD --version)" \
        "release build; model tiny-qwen2 (2 layers, hidden 64); state on $STATE_FS. Client:" \
        "bench/daemon/daemon_bench.py ($(python3 --version), http.client, kept-alive connections)" \
        "on the same machine; load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)."
    timeout 600 python3 bench/daemon/daemon_bench.py offload --cloud "$CLOUD" \
        --device "$DEVICE" --device-pid "$DEVICE_PID" --device-state "$RUN/device-offload/state" \
        --device-budget-tmpfs "$DEVICE_BUDGET_TMPFS" --device-all-tmpfs "$DEVICE_ALL_TMPFS" \
        --control "$CONTROL" --rounds "$ROUNDS"
    timeout 600 python3 bench/daemon/daemon_bench.py throughput --duration "$DURATION" \
        --target "local" "$LOCAL" 16 1,4,16,64 \
        --target "local" "$LOCAL_WIDE" "$WIDE_QUEUE" 64 \
        --target "local, state on tmpfs" "$CONTROL" 16 1,16 \
        --target "offload" "$DEVICE" 16 1,4,16 \
        --target "offload, state on tmpfs" "$DEVICE_ALL_TMPFS" 16 1,4,16
} | tee "$BENCH/results.md"
