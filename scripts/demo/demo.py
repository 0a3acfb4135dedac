#!/usr/bin/env python3
"""The `make demo` helper (Python 3 standard library only): the workload, the Countdown grading,
the reports, and driving the fleet's operator API (devices, jobs, rollouts, stats).

Subcommands are called by scripts/demo.sh; each prints a readable report.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from fractions import Fraction

# --- The prompt the policy was trained on: Template I with the help option ----------------------
# Copied from core/src/tasks/templates.rs (PromptTemplate::COUNTDOWN); `tandem-train eval` sends
# exactly these two messages and the daemon renders them with the bundle's chat template.
HELP_MARKER = "<unknown> I need external assistance </unknown>"
SYSTEM_PROMPT = (
    "You are a careful assistant who reasons before answering. First work through the problem "
    "inside <think> </think> tags. Then, at the very end of your reply, give only the final "
    "expression inside <answer> </answer> tags, for example <answer> (8 - 2) * 4 </answer>. "
    "If you have reasoned carefully and still have no solution, you may instead end your reply by "
    "asking for help with exactly: " + HELP_MARKER
)


def user_prompt(question):
    return question.rstrip() + "\nWork through it step by step."


def messages(question):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_prompt(question)}]


# --- Countdown grading (the rules of core/src/tasks/countdown/verifier.rs and grading.rs) --------
OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-",
       "\u00b7": "*", "\u2217": "*"}
TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


class Invalid(Exception):
    pass


def parse_expression(text):
    """Parses digits, + - * / (and typographic forms) and parentheses; no unary signs. Returns
    (value as Fraction, [numbers used])."""
    tokens = []
    for number, other in TOKEN.findall(text.strip()):
        if number:
            tokens.append(("n", int(number)))
        elif other in OPS:
            tokens.append(("op", OPS[other]))
        elif other in "()":
            tokens.append((other, other))
        elif other.strip():
            raise Invalid(f"unexpected {other!r}")
    if not tokens or len(tokens) > 64:
        raise Invalid("empty or too long")
    pos = 0
    numbers = []

    def peek():
        return tokens[pos] if pos < len(tokens) else (None, None)

    def atom(depth):
        nonlocal pos
        kind, value = peek()
        if depth > 16:
            raise Invalid("too deep")
        if kind == "n":
            pos += 1
            numbers.append(value)
            return Fraction(value)
        if kind == "(":
            pos += 1
            inner = expr(depth + 1)
            if peek()[0] != ")":
                raise Invalid("unbalanced")
            pos += 1
            return inner
        raise Invalid("expected a number or (")

    def term(depth):
        nonlocal pos
        value = atom(depth)
        while peek() in (("op", "*"), ("op", "/")):
            op = peek()[1]
            pos += 1
            right = atom(depth)
            if op == "*":
                value *= right
            elif right == 0:
                raise Invalid("division by zero")
            else:
                value /= right
        return value

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while peek() in (("op", "+"), ("op", "-")):
            op = peek()[1]
            pos += 1
            right = term(depth)
            value = value + right if op == "+" else value - right
        return value

    value = expr(0)
    if pos != len(tokens):
        raise Invalid("trailing text")
    return value, numbers


def last_answer(text):
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    return blocks[-1] if blocks else None


def correct_expression(expression, numbers, target):
    try:
        value, used = parse_expression(expression)
    except Invalid:
        return False
    return sorted(used) == sorted(numbers) and value == target


def grade_strict(response, numbers, target):
    """The device's own answer: the last <answer> block, the expression alone."""
    answer = last_answer(response)
    return answer is not None and correct_expression(answer, numbers, target)


def grade_free_form(response, numbers, target):
    """The cloud's answer (after the device's attempt): the last <answer> block, else the lines
    from the last up, each side of '=' -- the first expression over exactly the numbers decides."""
    if "</think>" in response:
        response = response[response.rfind("</think>") + len("</think>"):]
    places = [p for p in (last_answer(response), response) if p is not None]
    for place in places:
        for line in reversed(place.splitlines()):
            for side in reversed(line.replace("$", " ").replace("**", " ").split("=")):
                candidate = side.strip().rstrip(".")
                try:
                    value, used = parse_expression(candidate)
                except Invalid:
                    continue
                if sorted(used) == sorted(numbers):
                    return value == target
    return False


def grade(route, response, numbers, target):
    if route == "cloud":
        # The reply is the device's attempt (up to the help marker) and then the cloud's answer.
        cloud_part = response.split(HELP_MARKER)[-1]
        if "</unknown>" in cloud_part:
            cloud_part = cloud_part[cloud_part.rfind("</unknown>") + len("</unknown>"):]
        return grade_free_form(cloud_part, numbers, target)
    return grade_strict(response, numbers, target)


# --- HTTP ------------------------------------------------------------------------------------------
def token():
    path = os.environ.get("DEMO_API_TOKEN_FILE")
    return open(path).read().strip() if path else None


def http(method, url, body=None, timeout=120, auth=True):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if auth and token():
        request.add_header("Authorization", "Bearer " + token())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{method} {url}: HTTP {error.code}: {error.read().decode(errors='replace')}")


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def ms(value):
    return "-" if value is None else f"{value:,.0f} ms"


def pct(numerator, denominator):
    return "-" if not denominator else f"{100 * numerator / denominator:.1f}%"


def load_jsonl(path, limit=None):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[:limit] if limit else rows


def device_status(url):
    return http("GET", url + "/v1/status", auth=False, timeout=10)


def model_version_of(status):
    for path in (("model", "version"), ("model_version",)):
        value = status
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return str(value)
    return "?"


# --- Subcommands -----------------------------------------------------------------------------------
def cmd_check_data(args):
    rows = load_jsonl(args.test)
    digest = hashlib.sha256(open(args.test, "rb").read()).hexdigest()
    manifest = json.load(open(args.manifest))
    expected = manifest.get("provenance", {}).get("data_sha256", {}).get("test.jsonl")
    same = "the same file as in the manifest's provenance" if digest == expected else \
        f"NOT the manifest's test set (expected {expected})"
    print(f"test.jsonl: {len(rows)} problems, sha256 {digest[:16]}... -- {same}")
    print(f"example: {rows[0]['prompt']}")


def cmd_devices(args):
    deadline = time.time() + 60
    while True:
        devices = http("GET", args.api + "/v1/devices")["devices"]
        online = [d for d in devices if d.get("status") == "online"]
        if len(online) >= args.expect or time.time() > deadline:
            break
        time.sleep(0.5)
    print(f"the fleet sees {len(online)} of {len(devices)} devices online:")
    for d in devices:
        print(f"  {d['id']:10} group {d.get('group') or '-':6} {d.get('status'):8} serving "
              f"v{d.get('reported_version') or '?'}")


def ask(url, question, max_tokens=64):
    body = {"model": "tandem", "messages": messages(question), "max_tokens": max_tokens, "temperature": 0}
    started = time.monotonic()
    reply = http("POST", url + "/v1/chat/completions", body, timeout=180, auth=False)
    return reply, (time.monotonic() - started) * 1000


def cmd_workload(args):
    urls = args.devices.split(",")
    problems = load_jsonl(args.data, args.limit)
    versions = {url: model_version_of(device_status(url)) for url in urls}
    print(f"{len(problems)} problems, round-robin over {len(urls)} devices (one request at a time per "
          f"device), greedy, at most 64 new tokens, Template I with the help option")
    print("device model versions: " + ", ".join(f"{u.rsplit(':', 1)[1]}=v{v}" for u, v in versions.items()))
    results = [None] * len(problems)
    done = [0]
    lock = threading.Lock()
    started = time.monotonic()

    def run_device(d):
        for i in range(d, len(problems), len(urls)):
            p = problems[i]
            numbers, target = p["meta"]["numbers"], p["meta"]["target"]
            reply, latency = ask(urls[d], p["prompt"])
            info = reply.get("tandem", {})
            content = reply["choices"][0]["message"]["content"]
            route = info.get("route", "?")
            results[i] = {
                "id": p["id"], "device": urls[d], "route": route, "correct": grade(route, content, numbers, target),
                "latency_ms": latency, "local_ms": info.get("local_ms"), "cloud_ms": info.get("cloud_ms"),
                "fallback_reason": info.get("fallback_reason"), "response": content,
                "help_probability": info.get("help_probability"),
            }
            with lock:
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == len(problems):
                    print(f"  {done[0]:4}/{len(problems)} answered ({time.monotonic() - started:.0f} s)", flush=True)

    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(run_device, range(len(urls))))
    run = {"versions": versions, "wall_s": time.monotonic() - started, "results": results,
           "started_ms": int(time.time() * 1000 - (time.monotonic() - started) * 1000),
           "ended_ms": int(time.time() * 1000)}
    json.dump(run, open(args.out, "w"), indent=1)


def summarise(run):
    results = run["results"]
    n = len(results)
    by_route = {}
    for r in results:
        by_route.setdefault(r["route"], []).append(r)
    cloud = len(by_route.get("cloud", []))
    return {
        "n": n, "by_route": by_route, "cloud": cloud,
        "correct": sum(r["correct"] for r in results),
        "asked": sum(1 for r in results if r["route"] == "cloud" or r["fallback_reason"]),
        "local_lat": [r["latency_ms"] for r in results if r["route"] != "cloud"],
        "cloud_lat": [r["latency_ms"] for r in results if r["route"] == "cloud"],
        "cloud_wait": [r["cloud_ms"] for r in results if r["route"] == "cloud" and r["cloud_ms"] is not None],
        "versions": sorted(set(run["versions"].values())),
        "wall_s": run["wall_s"],
    }


def fleet_stats(api, since_ms=None, until_ms=None):
    query = "?group_by=model_version" + (f"&from={since_ms}" if since_ms else "") + \
        (f"&to={until_ms}" if until_ms else "")
    return http("GET", api + "/v1/stats" + query)


def cmd_report(args):
    run = json.load(open(args.run))
    s = summarise(run)
    n = s["n"]
    print(f"\nReport: {n} problems on model version(s) {', '.join('v' + v for v in s['versions'])}, "
          f"{s['wall_s']:.0f} s")
    print(f"  {'route':16} {'answers':>8} {'share':>7} {'correct':>8} {'accuracy':>9}")
    for route in ("local", "cloud", "local_fallback"):
        rows = s["by_route"].get(route, [])
        good = sum(r["correct"] for r in rows)
        print(f"  {route:16} {len(rows):8} {pct(len(rows), n):>7} {good:8} {pct(good, len(rows)):>9}")
    print(f"  {'all':16} {n:8} {'100%':>7} {s['correct']:8} {pct(s['correct'], n):>9}")
    print(f"  asked for help: {s['asked']} ({pct(s['asked'], n)}); cloud calls / queries = "
          f"{pct(s['cloud'], n)} against the budget of 30% "
          f"({'inside' if s['cloud'] <= 0.3 * n + 1e-9 else 'OVER'})")
    reasons = {}
    for r in s["by_route"].get("local_fallback", []):
        reasons[r["fallback_reason"]] = reasons.get(r["fallback_reason"], 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"    answered on the device instead ({count}x): {reason}")
    print(f"  latency seen by the caller, local answers: p50 {ms(percentile(s['local_lat'], 50))}, "
          f"p95 {ms(percentile(s['local_lat'], 95))}")
    print(f"  latency seen by the caller, cloud answers: p50 {ms(percentile(s['cloud_lat'], 50))}, "
          f"p95 {ms(percentile(s['cloud_lat'], 95))} (of which waiting for the cloud: p50 "
          f"{ms(percentile(s['cloud_wait'], 50))}, p95 {ms(percentile(s['cloud_wait'], 95))})")
    # The fleet's view: telemetry stored in SQLite, through the operator API. Wait for the spools.
    deadline = time.time() + 30
    while True:
        stats = fleet_stats(args.api, run["started_ms"] - 500, run["ended_ms"] + 500)
        if stats["totals"]["queries"] >= n or time.time() > deadline:
            break
        time.sleep(0.5)
    everything = fleet_stats(args.api)["totals"]
    print(f"  fleet (GET /v1/stats): {everything['queries']} events stored in all; for this run:")
    for row in stats["rows"]:
        lat = row.get("local_latency_ms") or {}
        cl = row.get("cloud_latency_ms") or {}
        print(f"    model v{row['key']}: {row['queries']} queries, local {row['local']}, cloud {row['cloud']}, "
              f"local_fallback {row['local_fallback']}, call ratio {row['call_ratio'] * 100:.1f}%, "
              f"local p50 {ms(lat.get('p50'))}, cloud p50 {ms(cl.get('p50'))}")


def cmd_dataset_summary(args):
    rows = load_jsonl(args.dataset)
    fleet = [r for r in rows if r.get("meta", {}).get("source") == "fleet"]
    answered = [r for r in fleet if r.get("meta", {}).get("cloud_answer")]
    verifiable = [r for r in fleet if "numbers" in r.get("meta", {})]
    print(f"dataset {args.dataset}: {len(rows)} records = {len(rows) - len(fleet)} task records "
          f"+ {len(fleet)} prompts collected from the devices ({len(verifiable)} recognised as Countdown "
          f"problems, graded by the verifier; {len(answered)} the cloud had answered)")
    if fleet:
        print("a collected record:", json.dumps(fleet[-1])[:400])


def cmd_job(args):
    job = json.load(open(args.file))
    ev = job.get("evaluation") or {}
    print(f"job {job['id']}: {job['state']} ({job['trigger']}: {job.get('trigger_detail')}), "
          f"dataset {job.get('dataset_rows')} records, {(job['finished_ms'] - job['created_ms']) / 1000:.1f} s")
    print(f"  registered {job.get('model_name')} version {job.get('model_version')} "
          f"(signature and hashes checked by the registry)")
    if ev:
        print(f"  the job's own evaluation (200 held-out test problems, greedy, 30% cap, in its manifest): overall "
              f"{ev.get('overall_accuracy', 0) * 100:.1f}%, local {ev.get('local_accuracy', 0) * 100:.1f}%, "
              f"call ratio {ev.get('call_ratio', 0) * 100:.1f}%")


def cmd_field(args):
    s = summarise(json.load(open(args.run)))
    print(f"field traffic: {s['n']} problems in {s['wall_s']:.0f} s, {s['cloud']} answered by the cloud; the "
          f"devices' telemetry carried each prompt (opted in) and the cloud's answers to the fleet")


def cmd_rollout(args):
    job = json.load(open(args.job))
    name, version = job["model_name"], job["model_version"]
    plan = {"model": name, "version": version,
            "stages": [{"percent": 25, "soak_secs": 10, "min_healthy": 1.0},
                       {"percent": 100, "soak_secs": 5, "min_healthy": 1.0}],
            "gates": {"max_error_rate": 0.2}}
    rollout = http("POST", args.api + "/v1/rollouts", plan)
    rollout = rollout.get("rollout", rollout)
    rid = rollout["id"]
    print(f"POST /v1/rollouts: rollout {rid} of {name} v{version}: stage 1 = 25% (canary) soaking 10 s, "
          f"stage 2 = 100% soaking 5 s, every device of a stage healthy before it advances")
    urls = args.devices.split(",")
    warm = load_jsonl(args.data, 400)
    started = time.monotonic()
    last = None
    k = 0
    while True:
        r = http("GET", f"{args.api}/v1/rollouts/{rid}")
        r = r.get("rollout", r)
        devices = http("GET", args.api + "/v1/devices")["devices"]
        on_new = sorted(d["id"] for d in devices if str(d.get("reported_version")) == str(version))
        line = (f"status {r.get('status')}, stage {int(r.get('stage', 0)) + 1}/{len(plan['stages'])}, "
                f"{len(on_new)}/{len(devices)} devices on v{version}: {', '.join(on_new) or '-'}")
        if line != last:
            print(f"  [{time.monotonic() - started:5.1f} s] {line}", flush=True)
            last = line
        if r.get("status") in ("halted", "aborted", "superseded"):
            raise SystemExit(f"rollout {r.get('status')}: {r.get('reason')}")
        if r.get("status") == "completed" and len(on_new) >= args.expect:
            break
        if time.monotonic() - started > 300:
            raise SystemExit("the rollout did not complete in 5 minutes: " + json.dumps(r)[:2000])
        # A device is healthy once it reports the new version active and sends telemetry from it:
        # keep a trickle of training problems going to every device (not counted in the reports).
        for url in urls:
            ask(url, warm[k % len(warm)]["prompt"], max_tokens=16)
            k += 1
        time.sleep(0.5)
    print(f"rollout {rid} completed in {time.monotonic() - started:.0f} s:")
    targets = [t for t in r.get("devices", []) if isinstance(t, dict) and t.get("assigned_at_ms")]
    first = min((t["assigned_at_ms"] for t in targets), default=0)
    for t in sorted(targets, key=lambda t: t["assigned_at_ms"]):
        role = "canary" if t["assigned_at_ms"] == first else "stage 2"
        print(f"  {t['id']} assigned v{version} at +{(t['assigned_at_ms'] - first) / 1000:.1f} s ({role})")
    for url in urls:
        st = device_status(url)
        up = st.get("update") or {}
        print(f"  {st.get('device_id')} ({url}): serving v{model_version_of(st)}, slot {up.get('slot')}, "
              f"update state {up.get('state')}, on probation {up.get('on_probation')}")


def cmd_compare(args):
    before, after = summarise(json.load(open(args.before))), summarise(json.load(open(args.after)))

    def row(label, f):
        print(f"  {label:38} {f(before):>16} {f(after):>16}")

    print(f"  {'':38} {'before':>16} {'after':>16}")
    row("model version", lambda s: ", ".join("v" + v for v in s["versions"]))
    row("problems", lambda s: str(s["n"]))
    row("accuracy (overall)", lambda s: pct(s["correct"], s["n"]))
    for route in ("local", "cloud", "local_fallback"):
        row(f"answers {route}", lambda s, r=route: f"{len(s['by_route'].get(r, []))} ({pct(len(s['by_route'].get(r, [])), s['n'])})")
        row(f"  correct among {route}", lambda s, r=route: pct(sum(x['correct'] for x in s['by_route'].get(r, [])), len(s['by_route'].get(r, []))))
    row("local answers correct / all problems", lambda s: pct(sum(x['correct'] for x in s['by_route'].get('local', [])), s['n']))
    row("asked for help", lambda s: pct(s["asked"], s["n"]))
    row("call ratio (budget 30%)", lambda s: pct(s["cloud"], s["n"]))
    def lat(values):
        return "-" if not values else f"{percentile(values, 50):.0f} / {percentile(values, 95):.0f} ms"

    row("local latency p50 / p95", lambda s: lat(s["local_lat"]))
    row("cloud latency p50 / p95", lambda s: lat(s["cloud_lat"]))
    row("workload wall time", lambda s: f"{s['wall_s']:.0f} s")
    totals = fleet_stats(args.api)["totals"]
    print(f"  telemetry events stored in the fleet (GET /v1/stats): {totals['queries']} in all "
          f"(both workloads, the field traffic and the requests sent during the rollout)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check-data"); p.add_argument("--test"); p.add_argument("--manifest")
    p = sub.add_parser("devices"); p.add_argument("--api"); p.add_argument("--expect", type=int)
    p = sub.add_parser("workload"); p.add_argument("--devices"); p.add_argument("--data")
    p.add_argument("--limit", type=int); p.add_argument("--out")
    p = sub.add_parser("report"); p.add_argument("--api"); p.add_argument("--run")
    p = sub.add_parser("dataset-summary"); p.add_argument("dataset")
    p = sub.add_parser("job"); p.add_argument("--file")
    p = sub.add_parser("field"); p.add_argument("--run")
    p = sub.add_parser("rollout"); p.add_argument("--api"); p.add_argument("--job"); p.add_argument("--devices")
    p.add_argument("--expect", type=int); p.add_argument("--data")
    p = sub.add_parser("compare"); p.add_argument("--before"); p.add_argument("--after"); p.add_argument("--api")
    args = parser.parse_args()
    globals()["cmd_" + args.cmd.replace("-", "_")](args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except urllib.error.URLError as error:
        sys.exit(f"demo.py: {error} (did a process stop? see .demo/logs/)")
