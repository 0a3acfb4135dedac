"""Summarises the CPU experiment: final evaluations side by side, where help requests go (by problem
size and by whether the device's own answer would have been right), and the training curves in a
few numbers. Usage: analyse.py target/experiments/countdown-cpu > analysis.md"""

import json
import sys

exp = sys.argv[1]
test = [json.loads(line) for line in open(f"{exp}/data/test.jsonl") if line.strip()]
size = [len(r["meta"]["numbers"]) for r in test]


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def load(run):
    try:
        return json.load(open(f"{exp}/{run}/eval.json"))
    except FileNotFoundError:
        return None


def train_records(run):
    out = []
    for line in open(f"{exp}/{run}/metrics.jsonl"):
        record = json.loads(line)
        if record["kind"] == "train":
            out.append(record)
    return out


def evals(run):
    return [json.loads(l) for l in open(f"{exp}/{run}/metrics.jsonl") if json.loads(l)["kind"] == "eval"]


runs = [("sft", "warm start (SFT)"), ("gapg", "(a) GAPG + filtering"), ("grpo", "(b) GRPO, no filtering")]
print("## Final evaluation (200 test problems, greedy, 30% cap)\n")
print("| policy | overall | local | cond. local | call ratio | asked for help | local only | random offloading (same ratio) | cloud only |")
print("|---|---|---|---|---|---|---|---|---|")
for run, name in runs:
    r = load(run)
    if r is None:
        continue
    ro = r.get("random_offloading") or {}
    print(f"| {name} | {pct(r['overall_accuracy'])} | {pct(r['local_accuracy'])} | {pct(r['conditional_local_accuracy'])} "
          f"| {pct(r['call_ratio'])} | {pct(r['help_request_ratio'])} | {pct(r['local_only_accuracy'])} "
          f"| {pct(ro.get('accuracy'))} (expected {pct(ro.get('expected_accuracy'))}) | {pct(r['cloud_only_accuracy'])} |")

print("\n## Where help requests go\n")
print("| policy | asked: 2 numbers | asked: 3 numbers | own answer right when it asked | own answer right when it did not ask |")
print("|---|---|---|---|---|")
for run, name in runs:
    r = load(run)
    if r is None:
        continue
    p = r["predictions"]
    by = {2: [0, 0], 3: [0, 0]}
    asked_right = [x["local_correct"] for x in p if x["asked_for_help"] and x["local_correct"] is not None]
    kept_right = [x["local_correct"] for x in p if not x["asked_for_help"] and x["local_correct"] is not None]
    for x, n in zip(p, size):
        by[n][0] += x["asked_for_help"]
        by[n][1] += 1
    rate = lambda v: f"{sum(v)}/{len(v)} ({pct(sum(v) / len(v))})" if v else "–"
    print(f"| {name} | {by[2][0]}/{by[2][1]} | {by[3][0]}/{by[3][1]} | {rate(asked_right)} | {rate(kept_right)} |")

print("\n## Training (sampled at temperature 1; means over the first and last 10 steps)\n")
print("| run | reward | local accuracy | help requests / samples | |D¹| | |D²| | s/step |")
print("|---|---|---|---|---|---|---|")
for run, name in runs[1:]:
    try:
        t = train_records(run)
    except FileNotFoundError:
        continue
    def mean(key, part):
        v = [x.get(key) for x in part if x.get(key) is not None]
        return sum(v) / len(v) if v else None
    first, last = t[:10], t[-10:]
    def both(key, fmt):
        a, b = mean(key, first), mean(key, last)
        return f"{fmt(a)} → {fmt(b)}"
    num = lambda x: "–" if x is None else f"{x:.2f}"
    print(f"| {name} | {both('reward', num)} | {both('local_accuracy', pct)} | {both('call_ratio', pct)} "
          f"| {both('d1', num)} | {both('d2', num)} | {num(mean('step_seconds', t))} |")

print("\n## Evaluations during training\n")
print("| run | step | overall | local | call ratio | asked for help |")
print("|---|---|---|---|---|---|")
for run, name in runs:
    try:
        for e in evals(run):
            print(f"| {name} | {e['step']} | {pct(e['overall_accuracy'])} | {pct(e['local_accuracy'])} "
                  f"| {pct(e['call_ratio'])} | {pct(e['help_request_ratio'])} |")
    except FileNotFoundError:
        pass
