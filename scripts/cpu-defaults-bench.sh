#!/usr/bin/env bash
# Serves each model with `rmlx serve` and NO tuning flags (the defaults pick
# the policy), and measures 1 and 8 concurrent streams with `rmlx bench`:
# prints the start-up policy line, each level's aggregate decode tok/s, and
# the 8-stream / 1-stream ratio (issue: >= 3 on a CPU).
#   scripts/cpu-defaults-bench.sh [MODEL_DIR ...]
# Default models: the default SmolLM2-135M and two tiny test models.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=${RMLX:-$ROOT/target/release/rmlx}
models=("$@")
if [ ${#models[@]} = 0 ]; then
  models=("$(bash "$ROOT/scripts/default-model.sh" "$R")" "$ROOT/tests/fixtures/models/llama-q4-g64" "$ROOT/tests/fixtures/models/qwen3-f32")
fi
for m in "${models[@]}"; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  log=$(mktemp)
  "$R" serve --model "$m" --port "$port" --no-metrics-db >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  echo "== $(basename "$m")"
  grep "load policy" "$log" || true
  out=$("$R" bench --url "http://127.0.0.1:$port" --concurrency 1,8 -p 128 -g 64 --server-pid "$pid" --json 2>/dev/null)
  python3 - "$out" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
levels = d.get("levels") or d.get("results") or []
agg = {}
for l in levels:
    c = l.get("concurrency")
    a = l.get("aggregate_decode_tps") or l.get("aggregate_tok_per_s") or l.get("aggregate_decode_tok_per_s")
    agg[c] = a
    print(f"  {c} stream(s): aggregate decode {a} tok/s, TTFT p50 {l.get('ttft_p50_s')} s")
if 1 in agg and 8 in agg and agg[1]:
    print(f"  8/1 ratio: {agg[8] / agg[1]:.2f}")
else:
    print(json.dumps(d)[:2000])
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$log"
done
