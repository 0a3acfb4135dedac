#!/usr/bin/env bash
# `make demo`: Tandem's closed loop on one machine, everything on loopback and under .demo/.
#
#   1. the fleet (embedded MQTT broker, SQLite, registry, scheduler, rollouts), with v1 registered;
#   2. the "cloud": the exact Countdown solver (`tandem-train solver-cloud`) as the upstream of the
#      fleet's offload gateway;
#   3. four device `tandemd serve`s on the committed policy models/countdown-tiny-v1, offloading
#      over MQTT through the gateway, sending telemetry (prompts opted in), following assignments;
#   4. a workload of 200 held-out Countdown problems, graded, with a report, then field traffic
#      (other problems) whose prompts the devices' telemetry carries to the fleet;
#   5. a retraining job through the scheduler: 20 GAPG steps from v1's committed checkpoint on the
#      task data plus the collected prompts (never the held-out ones), exported, signed, registered
#      as v2;
#   6. a canary-first rollout of v2 to every device, then the workload again: before and after.
#
# About 2 minutes on 2 cores after `make build`. Every process it starts is stopped on exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
: "${ORT_DYLIB_PATH:?run through make demo (it sets ORT_DYLIB_PATH)}"
BIN=$ROOT/target/debug
DEMO=$ROOT/.demo
HELPER="python3 $ROOT/scripts/demo/demo.py"
DEVICES=${DEMO_DEVICES:-4}
PROBLEMS=${DEMO_PROBLEMS:-200}
FIELD_PROBLEMS=${DEMO_FIELD_PROBLEMS:-200}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-20}
# Loopback ports; override with DEMO_PORT_BASE when these are taken.
PORT_BASE=${DEMO_PORT_BASE:-18700}
API_PORT=$((PORT_BASE + 80))
MQTT_PORT=$((PORT_BASE + 83))
CLOUD_PORT=$((PORT_BASE + 90))
API=http://127.0.0.1:$API_PORT

for tool in tandemd tandem-fleet tandem-train; do
    [ -x "$BIN/$tool" ] || { echo "missing $BIN/$tool: run make build first" >&2; exit 1; }
done

PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ ${#PIDS[@]} -gt 0 ]; then
        echo
        echo "Stopping ${#PIDS[@]} processes (SIGTERM)..."
        # Devices first (they drain and flush their telemetry), then the cloud, then the fleet.
        for ((n = ${#PIDS[@]} - 1; n >= 0; n--)); do
            kill -TERM "${PIDS[$n]}" 2>/dev/null || true
            wait "${PIDS[$n]}" 2>/dev/null || true
        done
    fi
    [ $status -eq 0 ] || echo "make demo failed (exit $status); logs are in .demo/logs/" >&2
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start_bg() { # start_bg NAME COMMAND...: runs it with its log in .demo/logs/NAME.log
    local name=$1; shift
    "$@" >"$DEMO/logs/$name.log" 2>&1 &
    PIDS+=($!)
}
wait_http() { # wait_http URL NAME: until URL answers (60 s)
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "$2 did not come up; its log:" >&2
    tail -n 30 "$DEMO/logs/$2.log" >&2
    return 1
}

STARTED=$(date +%s)
rm -rf "$DEMO"
mkdir -p "$DEMO"/{logs,fleet,devices,data}

step "0. Data: the 200 held-out Countdown problems the committed models were evaluated on"
# The exact settings of docs/results/countdown-cpu/run.sh: seed 0 regenerates the same disjoint
# train/test split, so test.jsonl is the set in the manifests' provenance (checked below).
"$BIN/tandem-train" make-data --out-dir "$DEMO/data" --train 2000 --test 200 --seed 0 \
    --min-count 2 --max-count 3 --max-number 12 --max-target 40 --sft-help-fraction 0.15
$HELPER check-data --test "$DEMO/data/test.jsonl" --manifest "$ROOT/models/countdown-tiny-v1/manifest.json"
# Field traffic: other problems of the same kind (another seed), asked after the graded workload.
"$BIN/tandem-train" make-data --out-dir "$DEMO/field" --train "$FIELD_PROBLEMS" --test 1 --seed 7 \
    --min-count 2 --max-count 3 --max-number 12 --max-target 40 >/dev/null

step "1. The fleet: embedded MQTT broker, SQLite, registry, scheduler, rollouts"
cat >"$DEMO/fleet/devices.toml" <<EOF
# Written by make demo: one machine-made password per device, stored as salted hashes.
EOF
for i in $(seq 1 "$DEVICES"); do
    id=device-$i
    mkdir -p "$DEMO/devices/$id"
    (umask 077; python3 -c "import secrets; print(secrets.token_urlsafe(24))" >"$DEMO/devices/$id/mqtt-password")
    hash=$("$BIN/tandem-fleet" hash-password <"$DEMO/devices/$id/mqtt-password")
    printf '[[device]]\nid = "%s"\ngroup = "demo"\npassword = "%s"\n\n' "$id" "$hash" >>"$DEMO/fleet/devices.toml"
done
(umask 077; python3 -c "import secrets; print(secrets.token_urlsafe(24))" >"$DEMO/fleet/api-token")
export DEMO_API_TOKEN_FILE=$DEMO/fleet/api-token
# The demo's signing key, private to its owner as a signing key must be (git keeps no file modes, so
# the committed copy is readable by everyone and the signer would warn about it).
install -m 600 models/keys/demo.key "$DEMO/fleet/demo.key"
# The job template's run configuration: the GAPG run of docs/results/countdown-cpu (see step 5).
cp docs/results/countdown-cpu/configs/gapg.toml "$DEMO/fleet/train-countdown.toml"
cat >"$DEMO/fleet/fleet.toml" <<EOF
devices_file = "$DEMO/fleet/devices.toml"

[store]
url = "sqlite://$DEMO/fleet/fleet.db"

[mqtt.embedded]
listen = "127.0.0.1:$MQTT_PORT"

[api]
listen = "127.0.0.1:$API_PORT"
token = { file = "$DEMO/fleet/api-token" }

# The "cloud": the exact Countdown solver behind an OpenAI-compatible endpoint (step 2).
[[gateway.upstream]]
url = "http://127.0.0.1:$CLOUD_PORT"
model = "countdown-solver"
timeout_ms = 10000

[gateway.device_budget]
cloud_fraction = 0.3
burst = 5

[registry]
dir = "$DEMO/fleet/registry"
trusted_keys = ["$ROOT/models/keys/demo.pub"]
public_url = "http://127.0.0.1:$API_PORT"

[rollouts]
evaluate_interval_ms = 1000

[scheduler]
work_dir = "$DEMO/fleet/jobs"
evaluate_interval_secs = 5
register = true
rollout = false

[[scheduler.template]]
name = "countdown"
# The bundle's registry name: the job's version is then one more than the newest registered (2).
model = "countdown-tiny"
run_config = "$DEMO/fleet/train-countdown.toml"
task_data = ["$DEMO/data/train.jsonl"]
# The graded workload's problems: devices are asked them, but the job never trains on them.
held_out = ["$DEMO/data/test.jsonl"]
signing_key = "$DEMO/fleet/demo.key"
bundle = "{work_dir}/bundle"
# A short GAPG run (with prompt filtering) from v1's committed trainer checkpoint, evaluated on the
# held-out problems; the whole CPU experiment ran 60 steps (make models).
commands = [
    "$BIN/tandem-train train --config {config}",
    "$BIN/tandem-train export --from {work_dir}/run/final --out {bundle} --name {model} --version {version} --run {work_dir}/run --parent-version 1",
    "$BIN/tandem-train sign --key {signing_key} --bundle {bundle}",
    "python3 $ROOT/scripts/demo/demo.py dataset-summary {dataset}",
]

[scheduler.template.overrides]
"model.checkpoint" = "$ROOT/models/checkpoints/countdown-tiny-v1"
"task.test" = "$DEMO/data/test.jsonl"
"run.steps" = $TRAIN_STEPS
"run.checkpoint_every" = $TRAIN_STEPS
"run.eval_every" = 0
# Only on demand in the demo (no schedule, no telemetry rules).
EOF
"$BIN/tandem-fleet" check-config --config "$DEMO/fleet/fleet.toml" >"$DEMO/logs/fleet-check-config.log"
start_bg fleet "$BIN/tandem-fleet" serve --config "$DEMO/fleet/fleet.toml"
wait_http "$API/healthz" fleet
echo "fleet: API $API (token in .demo/fleet/api-token), MQTT 127.0.0.1:$MQTT_PORT, SQLite .demo/fleet/fleet.db"
echo "registering models/countdown-tiny-v1 (signature checked against models/keys/demo.pub):"
"$BIN/tandem-fleet" registry add --config "$DEMO/fleet/fleet.toml" --bundle models/countdown-tiny-v1 \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); m=r.get("model",r); print("  registered", m["name"], "version", m["version"], "manifest sha256", m["manifest_sha256"][:16]+"...")'

step "2. The cloud: the exact Countdown solver as the gateway's upstream"
echo "There is no larger Countdown model to serve, so the cloud is tandem-train solver-cloud: an"
echo "OpenAI-compatible endpoint that answers every Countdown question with an exact solution (a"
echo "perfect cloud, as in docs/results/countdown-cpu). Devices reach it only through the fleet's"
echo "offload gateway (MQTT), which enforces per-device and fleet-wide budgets."
start_bg cloud "$BIN/tandem-train" solver-cloud --listen "127.0.0.1:$CLOUD_PORT"
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$CLOUD_PORT") 2>/dev/null && break
    sleep 0.2
done
echo "cloud: http://127.0.0.1:$CLOUD_PORT/v1/chat/completions"

step "3. $DEVICES devices: tandemd serve on countdown-tiny v1, offload and telemetry over MQTT, updater on"
DEVICE_URLS=()
for i in $(seq 1 "$DEVICES"); do
    id=device-$i
    dir=$DEMO/devices/$id
    port=$((PORT_BASE + 100 + i))
    cat >"$dir/tandemd.toml" <<EOF
device_id = "$id"
model_dir = "$ROOT/models/countdown-tiny-v1"
state_dir = "$dir/state"
trusted_bundle_keys = ["$ROOT/models/keys/demo.pub"]

[server]
listen = "127.0.0.1:$port"

[engine]
intra_threads = 1

[generation]
max_tokens = 64

[budget]
cloud_fraction = 0.3

[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
password_file = "$dir/mqtt-password"
reconnect_min_ms = 100
reconnect_max_ms = 1000

[cloud]
mqtt = true
deadline_ms = 20000

[telemetry]
transport = { kind = "mqtt" }
flush_interval_ms = 200
include_text = true

[updater]
enabled = true
probe_timeout_secs = 30
health_probe_interval_secs = 5

[updater.probation]
probes_to_commit = 2
EOF
    "$BIN/tandemd" check-config --config "$dir/tandemd.toml" >"$DEMO/logs/$id-check-config.log"
    start_bg "$id" "$BIN/tandemd" serve --config "$dir/tandemd.toml"
    DEVICE_URLS+=("http://127.0.0.1:$port")
done
for i in $(seq 1 "$DEVICES"); do wait_http "${DEVICE_URLS[$((i - 1))]}/healthz" "device-$i"; done
URLS=$(IFS=,; echo "${DEVICE_URLS[*]}")
$HELPER devices --api "$API" --expect "$DEVICES"

step "4. Workload on v1: $PROBLEMS problems over the devices' OpenAI-compatible API"
$HELPER workload --devices "$URLS" --data "$DEMO/data/test.jsonl" --limit "$PROBLEMS" --out "$DEMO/before.json"
$HELPER report --api "$API" --run "$DEMO/before.json"
echo
echo "Then $FIELD_PROBLEMS other problems (field traffic, not graded here):"
$HELPER workload --devices "$URLS" --data "$DEMO/field/train.jsonl" --limit "$FIELD_PROBLEMS" --out "$DEMO/field.json" >/dev/null
$HELPER field --run "$DEMO/field.json"

step "5. Retraining on the collected data, through the scheduler (tandem-fleet jobs run)"
echo "The job exports its dataset from the fleet (task data + the prompts devices collected, minus the"
echo "held-out test problems), runs $TRAIN_STEPS GAPG steps from v1's trainer checkpoint (the trainer's"
echo "cloud is the exact solver), evaluates, exports, signs, and registers the bundle as v2."
"$BIN/tandem-fleet" jobs run --config "$DEMO/fleet/fleet.toml" --template countdown >"$DEMO/job.json"
$HELPER job --file "$DEMO/job.json"

step "6. Canary-first rollout of the new version to every device"
$HELPER rollout --api "$API" --job "$DEMO/job.json" --devices "$URLS" --expect "$DEVICES" \
    --data "$DEMO/data/train.jsonl"

step "7. The same workload on the new version"
$HELPER workload --devices "$URLS" --data "$DEMO/data/test.jsonl" --limit "$PROBLEMS" --out "$DEMO/after.json"
$HELPER report --api "$API" --run "$DEMO/after.json"

step "Before and after"
$HELPER compare --before "$DEMO/before.json" --after "$DEMO/after.json" --api "$API"
echo
echo "make demo took $(( $(date +%s) - STARTED )) s. Everything is in .demo/ (configs, logs, fleet.db, registry, jobs)."
if [ -n "${DEMO_HOLD:-}" ]; then
    echo
    echo "DEMO_HOLD is set: everything keeps running. The fleet's dashboard:"
    echo "  $API/#token=$(cat "$DEMO/fleet/api-token")"
    echo "Press Ctrl-C to stop."
    # `wait` returns on a signal at once (a foreground sleep would delay the trap).
    while :; do sleep 3600 & wait $!; done
else
    echo "(DEMO_HOLD=1 make demo keeps everything running at the end, to look at the fleet's dashboard.)"
fi
