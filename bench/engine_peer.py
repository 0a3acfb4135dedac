"""Runs onnxruntime-genai on a model folder and prints one JSON line with the same numbers
`tandemd generate --json` prints: ttft_ms, decode_tok_s, ids, peak_rss_mb.

Usage: engine_peer.py MODEL_DIR PROMPT_IDS(comma separated) NEW_TOKENS THREADS
"""
import json
import sys
import time

import onnxruntime_genai as og


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    folder, prompt_csv, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompt = [int(t) for t in prompt_csv.split(",")]
    config = og.Config(folder)
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    end = time.perf_counter()
    ids = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    print(json.dumps({
        "ttft_ms": (first - start) * 1000.0,
        "decode_tok_s": (len(ids) - 1) / (end - first),
        "ids": ids,
        "peak_rss_mb": peak_rss_mb(),
    }))


if __name__ == "__main__":
    main()
