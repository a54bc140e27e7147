#!/usr/bin/env bash
# usage: issue16.sh [PROMPT=512] [GEN=128]   (from the bundle folder: rmlx, lib/, plugins/, make_model.py)
# Every row of issue 16's "Must show" table in one GPU call, side by side with mlx-lm on the same
# random-weight Qwen3 files (make_model.py), printed as one table at the end:
#  - batch-1 decode: mlx_lm.benchmark -b 1 against rmlx bench (in-process), Qwen3-0.6B bf16 and q4,
#    Qwen3-4B bf16 (also as a share of the card's bandwidth floor) and q4;
#  - 8 streams through rmlx serve (rmlx bench --url, prompts arriving together) against
#    batch_generate at batch 8, 0.6B bf16 and q4; 32 streams against batch 32 (bf16);
#  - TTFT p50 at 8 streams against the time batch_generate takes to prefill the 8 prompts;
#  - peak memory of each side (mlx-lm's peak_memory; rmlx bench's, and the server's gauge).
# Each server is driven twice and the second pass counts: the first pays MLX's CUDA JIT for the
# batch's shapes. ONLY="0.6b-bf16 ..." limits the models; N=trials (default 3).
here=$(cd "$(dirname "$0")" && pwd)
P=${1:-512}; G=${2:-128}; N=${N:-3}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
res=$(mktemp)
put() { echo "$1 $2" >> $res; }   # key value
avg() { grep -m1 Averages | sed -E 's/.*prompt_tps=([0-9.]+).*generation_tps=([0-9.]+).*peak_memory=([0-9.]+).*/\1 \2 \3/'; }
serve_pass() { # port, concurrency -> "ttft_p50 aggregate peak_gb"
  $here/rmlx bench --url http://127.0.0.1:$1 -p $P -g $G --concurrency $2 --json 2>/dev/null |
    python3 -c 'import json,sys; l=json.load(sys.stdin)["levels"][0]; print("%.4f %.1f %.2f" % (l["ttft_p50_s"], l["aggregate_decode_tps"] or 0, (l["peak_memory_bytes"] or 0)/1e9))'
}
port=8190
for m in ${ONLY:-0.6b-bf16 0.6b-q4 4b-bf16 4b-q4}; do
  s=${m%-*}; q=${m#*-}; dir=$HOME/models/qwen3-$m
  [ -f $dir/config.json ] || python3 $here/make_model.py $s $q $dir >/dev/null || { echo "make_model $m failed"; continue; }
  put "$m.bytes" $(du -cb $dir/*.safetensors | tail -1 | cut -f1)
  echo "=== $m"
  r=$(python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b 1 -n $N 2>&1 | avg); echo "mlx-lm b1: $r"; put "$m.mlx.b1" "$r"
  r=$($here/rmlx bench --plugins $here/plugins --model $dir -p $P -g $G -n $N 2>&1 | avg); echo "rmlx b1: $r"; put "$m.rmlx.b1" "$r"
  case $m in 0.6b-*) ;; *) continue;; esac
  levels="8"; [ $m = 0.6b-bf16 ] && levels="8 32"
  for b in $levels; do
    r=$(python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b $b -n $N 2>&1 | avg); echo "mlx-lm batch_generate b$b: $r"; put "$m.mlx.b$b" "$r"
  done
  $here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port $port --no-metrics-db --no-prefix-cache > /tmp/serve-$m.log 2>&1 &
  pid=$!
  for i in $(seq 240); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.5; done
  for b in $levels; do
    serve_pass $port $b >/dev/null   # JIT warm-up for this batch's shapes
    r=$(serve_pass $port $b); echo "rmlx serve $b streams (ttft_p50 aggregate peak_gb): $r"; put "$m.serve.s$b" "$r"
  done
  kill $pid; wait $pid 2>/dev/null
  grep -iE "panick|error" /tmp/serve-$m.log | head -3
  port=$((port + 1))
done
python3 - "$res" "$card" "$P" "$G" <<'PY'
import sys
kv = {}
for line in open(sys.argv[1]):
    k, _, v = line.strip().partition(" ")
    kv[k] = v.split()
card, P, G = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bw = 4.8e12 if "H200" in card else 3.35e12
def f(k, i):
    try: return float(kv[k][i])
    except (KeyError, IndexError, ValueError): return None
rows = []
def row(metric, target, mine, peer, ratio, ok, note=""):
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")
    rows.append((metric, target, fmt(mine), fmt(peer), "-" if ratio is None else f"{ratio:.2f}x", "-" if ok is None else ("met" if ok else "missed"), note))
for m, need in [("0.6b-bf16", 1.3), ("0.6b-q4", 1.3), ("4b-bf16", 1.2), ("4b-q4", 1.5)]:
    a, b = f(f"{m}.rmlx.b1", 1), f(f"{m}.mlx.b1", 1)
    r = a / b if a and b else None
    note = f"peak {f(m+'.rmlx.b1', 2)} vs {f(m+'.mlx.b1', 2)} GB"
    ok = None if r is None else r >= need
    if m == "4b-bf16" and a and f(m + ".bytes", 0):
        floor = bw / f(m + ".bytes", 0)
        share = a / floor
        note += f"; {share:.0%} of the {bw/1e12:.2f} TB/s floor ({floor:.0f} tok/s)"
        ok = ok and share >= 0.5
    row(f"b1 decode tok/s, Qwen3-{m}", f">= {need}x", a, b, r, ok, note)
for m, s, need in [("0.6b-bf16", 8, 1.2), ("0.6b-q4", 8, 1.2), ("0.6b-bf16", 32, 1.2)]:
    a, b = f(f"{m}.serve.s{s}", 1), f(f"{m}.mlx.b{s}", 1)
    r = a / b if a and b else None
    row(f"{s} streams aggregate tok/s, {m}", f">= {need}x", a, b, r, None if r is None else r >= need,
        f"peak {f(m+f'.serve.s{s}', 2)} vs {f(m+f'.mlx.b{s}', 2)} GB")
t, pt = f("0.6b-bf16.serve.s8", 0), f("0.6b-bf16.mlx.b8", 0)
pre = 8 * P / pt if pt else None
row("TTFT p50 at 8 streams, s (0.6b-bf16)", "<= batch prefill", t, pre, t / pre if t and pre else None, None if not (t and pre) else t <= pre)
print(f"\n{card}; prompt {P}, generation {G}; rmlx vs mlx-lm on the same files")
w = [max(len(str(r[i])) for r in rows + [("metric", "target", "rmlx", "mlx-lm", "ratio", "status", "")]) for i in range(7)]
for r in [("metric", "target", "rmlx", "mlx-lm", "ratio", "status", "notes")] + rows:
    print(" | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)))
PY
exit 0
