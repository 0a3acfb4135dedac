#!/usr/bin/env bash
# One GAPG step of tandem-train (rollouts + update, candle on the CPU) next to one step of TRL's
# GRPOTrainer (PyTorch on the CPU) on the same model: the small-qwen2 preset (4 layers, hidden 128,
# 0.9 M weights) saved as a Hugging Face checkpoint, which transformers loads as Qwen2ForCausalLM.
# Same prompts, P prompts × G samples, exactly L new tokens per sample, no KL term, one micro-batch.
# Results land in .bench/train/ (results.md is the table for docs/benchmarks.md).
#
#   TRAIN_BENCH_PROMPTS=8 TRAIN_BENCH_GROUP=8 TRAIN_BENCH_NEW_TOKENS=32 TRAIN_BENCH_STEPS=5 \
#   TRAIN_BENCH_THREADS=2 bench/train_bench.sh
#
# The TRL side needs `pip install trl torch` into .bench/trl-venv (done here once). PyPI's Linux torch
# wheel is the CUDA build: it pulls the nvidia-* wheels (the venv is about 6 GB); there is no CPU-only
# wheel on PyPI, and download.pytorch.org (which has one) is not reachable from our machines.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=.bench/train
VENV=.bench/trl-venv
TRL_VERSION=1.16.0
TORCH_VERSION=2.15.0
P=${TRAIN_BENCH_PROMPTS:-8}
G=${TRAIN_BENCH_GROUP:-8}
L=${TRAIN_BENCH_NEW_TOKENS:-32}
STEPS=${TRAIN_BENCH_STEPS:-5}
THREADS=${TRAIN_BENCH_THREADS:-$(nproc)}
mkdir -p "$BENCH"

if [ -z "${BENCH_BUILT:-}" ]; then
    echo "== building tandem-train (release)"
    cargo build --release -p tandem-train
fi
BIN=./target/release/tandem-train

if [ ! -f "$BENCH/model/model.safetensors" ]; then
    echo "== creating the benchmark model and prompts"
    "$BIN" make-data --out-dir "$BENCH/data" --train 64 --test 1 --seed 0 \
        --min-count 2 --max-count 3 --max-number 12 --max-target 40 >/dev/null
    "$BIN" init --preset small-qwen2 --out "$BENCH/model" --seed 0 --extra-corpus "$BENCH/data/corpus.txt"
    python3 -c 'import json,sys; [print(json.loads(l)["prompt"]) for l in open(sys.argv[1])]' \
        "$BENCH/data/train.jsonl" > "$BENCH/prompts.txt"
fi

if ! "$VENV/bin/python" -c "import trl, torch" 2>/dev/null; then
    echo "== installing trl $TRL_VERSION and torch $TORCH_VERSION into $VENV (once; about 6 GB)"
    python3 -m venv "$VENV"
    start=$(date +%s)
    "$VENV/bin/pip" install --quiet "trl==$TRL_VERSION" "torch==$TORCH_VERSION"
    echo "   installed in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi

echo "== tandem-train bench-step: P=$P G=$G L=$L, $STEPS timed steps, $THREADS threads"
RAYON_NUM_THREADS=$THREADS "$BIN" bench-step --checkpoint "$BENCH/model" --prompts-file "$BENCH/prompts.txt" \
    --prompts "$P" --group-size "$G" --max-new-tokens "$L" --steps "$STEPS" --warmup 1 | tee "$BENCH/ours.json"

echo "== TRL GRPOTrainer: same model, prompts and shapes"
"$VENV/bin/python" bench/trl_grpo_step.py --model "$BENCH/model" --prompts-file "$BENCH/prompts.txt" \
    --prompts "$P" --group-size "$G" --max-new-tokens "$L" --steps "$STEPS" --warmup 1 --threads "$THREADS" \
    2>"$BENCH/trl.log" | tail -n 1 | tee "$BENCH/trl.json"

python3 - "$BENCH" "$P" "$G" "$L" "$THREADS" <<'PY'
import json, sys
bench, p, g, l, threads = sys.argv[1:]
ours = json.load(open(f"{bench}/ours.json"))
trl = json.load(open(f"{bench}/trl.json"))
ratio = trl["step_seconds"] / ours["step_seconds"]
table = "\n".join([
    f"| step (P={p} prompts × G={g} samples, {l} new tokens, prompt ≤ {ours['prompt_tokens']} tokens, {threads} threads) | seconds (median) |",
    "|---|---|",
    f"| tandem-train GAPG step (candle): rollouts {ours['rollout_seconds']:.3f} s + update {ours['update_seconds']:.3f} s | **{ours['step_seconds']:.3f}** |",
    f"| TRL {trl['trl']} GRPOTrainer step (torch {trl['torch']}, CPU) | {trl['step_seconds']:.3f} |",
    f"| ratio TRL / tandem-train | **{ratio:.2f}×** |",
])
open(f"{bench}/results.md", "w").write(table + "\n")
print(table)
PY
