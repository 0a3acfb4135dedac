#!/usr/bin/env bash
# `make demo`: create a tiny model, export it as a Tandem bundle, and generate with it on ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ORT_DYLIB_PATH:?run through make demo}"
BIN=target/debug
DEMO=.demo
rm -rf "$DEMO"
mkdir -p "$DEMO"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Create a tiny Qwen2-style model: random weights, a BPE tokenizer trained on built-in text"
"$BIN/tandem-train" init --preset tiny-qwen2 --out "$DEMO/checkpoint" --seed 7
ls -l "$DEMO/checkpoint"

step "2. Export it as a Tandem bundle (ONNX opset 17 with KV cache, tokenizer, manifest) — pure Rust, no protoc"
"$BIN/tandem-train" export --from "$DEMO/checkpoint" --out "$DEMO/bundle" --name tiny-qwen2 --version 1
ls -l "$DEMO/bundle"
python3 - "$DEMO/bundle/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
a = m["architecture"]
print(f"manifest: {m['name']} v{m['version']}, {a['model_type']}, {a['num_hidden_layers']} layers, "
      f"hidden {a['hidden_size']}, vocab {a['vocab_size']}, context {a['context_length']}, "
      f"opset {m['io']['opset']}")
for name, digest in m["files"].items():
    print(f"  {name:22} {digest['size']:>9} B  sha256 {digest['sha256'][:16]}...")
PY

step "3. Generate on ONNX Runtime with tandemd (greedy). The weights are random, so the text is too."
"$BIN/tandemd" generate --model "$DEMO/bundle" --prompt "Using the numbers 3, 7 and 25," --max-new-tokens 24

step "4. The same with seeded sampling (temperature 0.8, top-p 0.9), as one JSON object"
"$BIN/tandemd" generate --model "$DEMO/bundle" --prompt "Using the numbers 3, 7 and 25," --max-new-tokens 24 \
    --temperature 0.8 --top-p 0.9 --seed 1 --json

printf '\nDone. The bundle is in %s; try: %s/tandemd generate --model %s/bundle --prompt "..." --max-new-tokens 32\n' \
    "$DEMO" "$BIN" "$DEMO"
