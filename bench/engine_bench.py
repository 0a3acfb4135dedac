"""Engine benchmark: tandemd's engine against onnxruntime-genai on the SAME model.onnx, same
thread count, interleaved runs in one process tree. Prints a Markdown table with medians and the
ratio (ours / genai for tok/s, genai / ours for time to first token: above 1.0 means we are faster).

Usage: engine_bench.py TANDEMD MODEL_DIR GENAI_PYTHON [--threads 1,2] [--runs 3] [--prompt-len 32] [--new 64]
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tandemd")
    ap.add_argument("model")
    ap.add_argument("genai_python")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    prompt = ",".join(str(7 + (i * 131) % 400) for i in range(args.prompt_len))

    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        ours, peer = [], []
        for run in range(args.runs):
            print(f"threads={threads} run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            ours.append(run_json([args.tandemd, "generate", "--model", args.model, "--prompt-ids", prompt,
                                  "--max-new-tokens", str(args.new), "--greedy", "--ignore-eos",
                                  "--threads", str(threads), "--json"]))
            peer.append(run_json([args.genai_python, str(HERE / "engine_peer.py"), args.model, prompt,
                                  str(args.new), str(threads)]))
        same_tokens = all(o["ids"] == p["ids"] for o, p in zip(ours, peer))
        med = lambda xs, k: statistics.median(x[k] for x in xs)
        rows.append({
            "threads": threads,
            "ours_tok_s": med(ours, "decode_tok_s"), "genai_tok_s": med(peer, "decode_tok_s"),
            "ours_ttft": med(ours, "ttft_ms"), "genai_ttft": med(peer, "ttft_ms"),
            "ours_rss": med(ours, "peak_rss_mb"), "genai_rss": med(peer, "peak_rss_mb"),
            "same_tokens": same_tokens,
        })

    print(f"\nDecode of {args.new} tokens after a {args.prompt_len}-token prompt, greedy, CPU EP, "
          f"median of {args.runs} interleaved runs each.\n")
    print("| threads | tandemd tok/s | genai tok/s | decode ratio | tandemd TTFT ms | genai TTFT ms | TTFT ratio "
          "| tandemd peak RSS MB | genai peak RSS MB | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['ours_tok_s']:.1f} | {r['genai_tok_s']:.1f} | "
              f"{r['ours_tok_s'] / r['genai_tok_s']:.2f} | {r['ours_ttft']:.0f} | {r['genai_ttft']:.0f} | "
              f"{r['genai_ttft'] / r['ours_ttft']:.2f} | {r['ours_rss']:.0f} | {r['genai_rss']:.0f} | "
              f"{'yes' if r['same_tokens'] else 'NO'} |")
    if not all(r["same_tokens"] for r in rows):
        sys.exit("the two engines generated different tokens from the same model.onnx")


if __name__ == "__main__":
    main()
