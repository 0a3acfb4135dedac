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

# A no-op when scripts/bench.sh has just built them.
cargo build --release -p tandemd -p tandem-train

MODEL="$BENCH/tiny-qwen2"
if [ ! -f "$MODEL/manifest.json" ]; then
    echo "== creating the tiny model"
    "$TRAIN" init --preset tiny-qwen2 --out "$BENCH/tiny-checkpoint" --seed 41
    "$TRAIN" export --from "$BENCH/tiny-checkpoint" --out "$MODEL" --overwrite
    rm -rf "$BENCH/tiny-checkpoint"
fi

RUN="$BENCH/run"
rm -rf "$RUN"
mkdir -p "$RUN"
PIDS=()
stop_daemons() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap stop_daemons EXIT INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_daemon NAME CONFIG: starts `tandemd serve` with CONFIG in $RUN/NAME, waits for /healthz
# and sets PORT. No TANDEM_* variable from the caller's environment reaches it.
start_daemon() {
    local name=$1 config=$2 dir="$RUN/$1"
    mkdir -p "$dir"
    printf 'state_dir = "%s"\n%s\n' "$PWD/$dir/state" "$config" > "$dir/tandemd.toml"
    PORT=$(free_port)
    local unset_env=()
    for var in $(compgen -e | grep '^TANDEM_' || true); do unset_env+=(-u "$var"); done
    env "${unset_env[@]}" -u RUST_LOG "$TANDEMD" serve --model "$MODEL" --listen "127.0.0.1:$PORT" \
        --config "$dir/tandemd.toml" > "$dir/tandemd.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
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
start_daemon cloud "device_id = \"cloud\"
[router]
help_bias = $NEVER_ASK"
CLOUD="http://127.0.0.1:$PORT"

# A device with offloading set up: over HTTPS (plain HTTP on loopback) to the cloud above, a
# budget that never refuses, telemetry kept in the spool (no transport), default logging (info).
device_config() {
    printf '%s\n' "device_id = \"robot-1\"" "[router]" "help_bias = $1" \
        "[server]" "max_queue = $2" \
        "[cloud]" "attempts_per_transport = 1" \
        "[cloud.https]" "url = \"$CLOUD\"" "model = \"cloud\"" \
        "[budget]" "cloud_fraction = 0.99" "burst = 1000000" \
        "[telemetry]" "transport = { kind = \"none\" }"
}
start_daemon device-offload "$(device_config $ALWAYS_ASK 16)"
DEVICE="http://127.0.0.1:$PORT"
start_daemon device-local "$(device_config $NEVER_ASK 16)"
LOCAL="http://127.0.0.1:$PORT"
WIDE_QUEUE=256
start_daemon device-local-wide "$(device_config $NEVER_ASK $WIDE_QUEUE)"
LOCAL_WIDE="http://127.0.0.1:$PORT"

ORT_RUNTIME=$(curl -sf "$DEVICE/v1/status" | python3 -c 'import json, sys; print(json.load(sys.stdin)["model"]["ort_version"])')
{
    echo "Machine: $(nproc) vCPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), shared;" \
        "ONNX Runtime $ORT_RUNTIME (CPU EP), $($TANDEMD --version), model tiny-qwen2 (2 layers, hidden 64)," \
        "release build. Client: bench/daemon/daemon_bench.py (Python $(python3 -c 'import platform; print(platform.python_version())'), http.client," \
        "kept-alive connections) on the same machine."
    timeout 600 python3 bench/daemon/daemon_bench.py offload --cloud "$CLOUD" --device "$DEVICE" \
        --control "$LOCAL" --device-state "$RUN/device-offload/state" --rounds "$ROUNDS"
    timeout 600 python3 bench/daemon/daemon_bench.py throughput --url "$LOCAL" --url-wide "$LOCAL_WIDE" \
        --wide-queue "$WIDE_QUEUE" --duration "$DURATION"
} | tee "$BENCH/results.md"
