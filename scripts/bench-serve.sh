#!/usr/bin/env bash
# Drives a running OpenAI-compatible server with N concurrent streamed
# /v1/completions requests (prompt token ids, greedy, EOS ignored where the
# server supports it) and prints TTFT p50/p95, per-stream and aggregate decode
# tok/s. Works against `rmlx serve` and `mlx_lm.server` alike.
#
#   scripts/bench-serve.sh URL MODEL [STREAMS...]   (default streams: 1 4 8)
#   env: PROMPT_TOKENS (64), GEN_TOKENS (32), JSON=1 for one JSON line per run
set -euo pipefail
URL=${1:?usage: bench-serve.sh URL MODEL [STREAMS...]}
MODEL=${2:?model id}
shift 2
STREAMS=${*:-1 4 8}
exec python3 - "$URL" "$MODEL" "${PROMPT_TOKENS:-64}" "${GEN_TOKENS:-32}" "${JSON:-0}" $STREAMS <<'PY'
import json, sys, threading, time, urllib.request
url, model, p, g, as_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
streams = [int(x) for x in sys.argv[6:]]

def one(i, out):
    # distinct prompts (no shared prefix beyond the first token)
    prompt = [1] + [((i * 7919 + k * 31) % 2000) + 100 for k in range(p - 1)]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": g, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.time(); first = None; n = 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("text") is not None:
                if first is None:
                    first = time.time()
                n += 1
    t1 = time.time()
    out[i] = (first - t0 if first else float("nan"), n, t1 - (first or t0), t1 - t0)

def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

if not as_json:
    print(f"{'streams':>7} {'ttft p50':>9} {'ttft p95':>9} {'tok/s/stream':>13} {'aggregate tok/s':>16}")
for n in streams:
    out = [None] * n
    ts = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
    t0 = time.time()
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.time() - t0
    ttft = [o[0] for o in out]
    per = [(o[1] - 1) / o[2] for o in out if o[2] > 0 and o[1] > 1]
    total = sum(o[1] for o in out)
    # aggregate decode: tokens after each stream's first over the span from the first first-token to the last end
    span = max(o[3] for o in out) - min(o[0] for o in out)
    agg = sum(o[1] - 1 for o in out) / span if span > 0 else float("nan")
    row = {"streams": n, "ttft_p50_s": pct(ttft, .5), "ttft_p95_s": pct(ttft, .95),
           "per_stream_tok_s": sum(per) / max(1, len(per)), "aggregate_tok_s": agg, "tokens": total, "wall_s": wall}
    if as_json:
        print(json.dumps(row))
    else:
        print(f"{n:>7} {row['ttft_p50_s']:>9.2f} {row['ttft_p95_s']:>9.2f} {row['per_stream_tok_s']:>13.2f} {agg:>16.2f}")
PY
