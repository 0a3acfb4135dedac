#!/usr/bin/env bash
# Reproduces the CPU experiment (about an hour on 2 shared cores): data, a small policy with its own
# tokenizer, the supervised warm start, then (a) GAPG with prompt filtering and (b) GRPO with the
# hierarchical reward and no filtering, each evaluated with the paper's protocol. The cloud is the
# exact Countdown solver behind the OpenAI-compatible client (`[cloud] kind = "solver"`). Run from
# the repository root; everything is written under target/experiments/countdown-cpu, and the metrics,
# plots and evaluation summaries are copied next to this script.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=docs/results/countdown-cpu
EXP=target/experiments/countdown-cpu
cargo build --release -p tandem-train
BIN=./target/release/tandem-train
rm -rf "$EXP" && mkdir -p "$EXP"
"$BIN" make-data --out-dir "$EXP/data" --train 2000 --test 200 --seed 0 \
    --min-count 2 --max-count 3 --max-number 12 --max-target 40 --sft-help-fraction 0.15
"$BIN" init --preset small-qwen2 --out "$EXP/base" --seed 0 --extra-corpus "$EXP/data/corpus.txt" --tokenizer-vocab 1024
for run in sft gapg grpo; do
    "$BIN" train --config "$HERE/configs/$run.toml" --quiet | tee "$EXP/$run.log"
    mkdir -p "$HERE/$run"
    cp "$EXP/$run/metrics.jsonl" "$HERE/$run/metrics.jsonl"
    cp "$EXP/$run"/plots/*.png "$HERE/$run/"
    # The evaluation without the per-problem predictions (those stay in $EXP/$run/eval.json).
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r.pop("predictions"); print(json.dumps(r, indent=2))' \
        "$EXP/$run/eval.json" > "$HERE/$run/eval.json"
done
python3 "$HERE/analyse.py" "$EXP" > "$HERE/analysis.md"
