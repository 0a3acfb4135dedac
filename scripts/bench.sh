#!/usr/bin/env bash
# `make bench`, every benchmark in docs/benchmarks.md, each next to its peer in the same run:
#   1. the engine against onnxruntime-genai on a random model with Qwen2.5-0.5B's shapes, exported by
#      our exporter (the 2 GB model is made once and reused);
#   2. tandemd's offload overhead and API throughput (scripts/bench-daemon.sh);
#   3. tandem-fleet ingest through Mosquitto against the broker's own ceiling (bench/fleet_bench.sh);
#   4. a GAPG training step against TRL's GRPOTrainer (bench/train_bench.sh);
#   5. a staged rollout of a new model version through 1,000 simulated devices that download and
#      verify it, with the fleet's CPU and memory meanwhile (bench/rollout_bench.sh).
# Everything lands in .bench/. BENCH_ONLY=engine,daemon,fleet,train,rollout runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ORT_DYLIB_PATH:?run through make bench}"
GENAI_VERSION=0.18.0
: "${ORT_VERSION:?run through make bench}"
BENCH=.bench
mkdir -p "$BENCH"

echo "== building release binaries"
cargo build --release -p tandemd -p tandem-train -p tandem-fleet
wants() { [ -z "${BENCH_ONLY:-}" ] || [[ ",$BENCH_ONLY," == *",$1,"* ]]; }

if wants engine; then
    MODEL="$BENCH/qwen2.5-0.5b-shapes"
    if [ ! -f "$MODEL/manifest.json" ]; then
        echo "== creating a random model with Qwen2.5-0.5B's shapes and exporting it (once; ~2 GB)"
        ./target/release/tandem-train init --preset qwen2-5-0-5b --out "$BENCH/q05b-checkpoint" --seed 1
        ./target/release/tandem-train export --from "$BENCH/q05b-checkpoint" --out "$MODEL" --overwrite
        rm -rf "$BENCH/q05b-checkpoint"
    fi

    VENV="$BENCH/venv"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
        echo "== installing onnxruntime-genai $GENAI_VERSION into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet "onnxruntime-genai==$GENAI_VERSION" "onnxruntime==$ORT_VERSION"
    fi
    echo "== engine: tandemd vs onnxruntime-genai on the same model.onnx"
    "$VENV/bin/python" bench/engine_bench.py ./target/release/tandemd "$MODEL" "$VENV/bin/python" \
        --threads "${BENCH_THREADS:-1,2}" --runs "${BENCH_RUNS:-3}"
fi
if wants daemon; then BENCH_BUILT=1 scripts/bench-daemon.sh; fi
if wants fleet; then BENCH_BUILT=1 bench/fleet_bench.sh; fi
if wants train; then BENCH_BUILT=1 bench/train_bench.sh; fi
if wants rollout; then BENCH_BUILT=1 bench/rollout_bench.sh; fi
