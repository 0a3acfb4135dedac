#!/usr/bin/env bash
# `make models`: trains the demo policies with Tandem's own trainer and writes them, signed with the
# demo key, as bundles under models/ (committed; `make demo` uses them). About an hour on 2 cores:
# the CPU experiment's data, tokenizer and model, its supervised warm start (v1), then GAPG with
# prompt filtering (v2). See docs/results/countdown-cpu/README.md for the method and results.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIGS=docs/results/countdown-cpu/configs
EXP=target/experiments/countdown-cpu
cargo build --release -p tandem-train
BIN=./target/release/tandem-train

echo "== data and the initial model"
rm -rf "$EXP" && mkdir -p "$EXP"
"$BIN" make-data --out-dir "$EXP/data" --train 2000 --test 200 --seed 0 \
    --min-count 2 --max-count 3 --max-number 12 --max-target 40 --sft-help-fraction 0.15
"$BIN" init --preset small-qwen2 --out "$EXP/base" --seed 0 --extra-corpus "$EXP/data/corpus.txt" --tokenizer-vocab 1024
for run in sft gapg; do
    echo "== training: $run"
    "$BIN" train --config "$CONFIGS/$run.toml"
done

echo "== exporting and signing"
[ -f models/keys/demo.key ] || "$BIN" keygen --out models/keys --name demo
"$BIN" export --from "$EXP/sft/final" --out models/countdown-tiny-v1 --name countdown-tiny --version 1 \
    --run "$EXP/sft" --overwrite
"$BIN" export --from "$EXP/gapg/final" --out models/countdown-tiny-v2 --name countdown-tiny --version 2 \
    --run "$EXP/gapg" --parent-version 1 --overwrite
for v in 1 2; do "$BIN" sign --key models/keys/demo.key --bundle "models/countdown-tiny-v$v"; done
# v1's trainer checkpoint, from which make demo's retraining job starts (it exports to v1's model.onnx).
rm -rf models/checkpoints/countdown-tiny-v1 && mkdir -p models/checkpoints
cp -r "$EXP/sft/final" models/checkpoints/countdown-tiny-v1
du -sh models/countdown-tiny-v*
