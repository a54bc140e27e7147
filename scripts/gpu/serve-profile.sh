#!/usr/bin/env bash
# usage: serve-profile.sh [SHAPE] [QUANT] [PROMPT] [GEN]   (from the bundle folder; default 0.6b bf16 512 128)
# Issue 16's serving rows with the server's defaults, and where a step's time goes:
#  - mlx-lm: mlx_lm.benchmark at batch 1, 8 and 32 (batch_generate);
#  - rmlx bench in-process at batch 1;
#  - one rmlx serve (RMLX_STEP_PROFILE=1), rmlx bench --url at 1, 8 and 32 streams arriving
#    together, twice: the first pass pays MLX's CUDA JIT for the batch shapes, the second is
#    the measurement. Then the step lines of the second pass's 8-stream TTFT (its first steps)
#    and a summary of its decode steps per batch size.
here=$(cd "$(dirname "$0")" && pwd)
S=${1:-0.6b}; Q=${2:-bf16}; P=${3:-512}; G=${4:-128}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=$HOME/models/qwen3-$S-$Q
[ -f $dir/config.json ] || python3 $here/make_model.py $S $Q $dir >/dev/null || exit 1
echo "=== qwen3-$S $Q, prompt $P, generation $G"
for b in 1 8 32; do
  echo -n "mlx-lm b$b: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b $b -n 2 2>&1 | grep Averages
done
echo -n "rmlx bench b1: "; $here/rmlx bench --plugins $here/plugins --model $dir -p $P -g $G -n 3 2>&1 | grep -E "Averages|rror"
port=8160
RMLX_STEP_PROFILE=1 $here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port $port --no-metrics-db > /tmp/serve-prof.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.5; done
echo "--- rmlx serve (defaults), warm-up pass"
$here/rmlx bench --url http://127.0.0.1:$port -p $P -g $G --concurrency 1,8,32 2>&1 | tail -4
mark=$(wc -l < /tmp/serve-prof.log)
echo "--- rmlx serve (defaults), measured pass"
$here/rmlx bench --url http://127.0.0.1:$port -p $P -g $G --concurrency 1,8,32 2>&1 | tail -4
kill $pid; wait $pid 2>/dev/null
tail -n +$mark /tmp/serve-prof.log | grep "^step" > /tmp/steps.txt
echo "--- first steps with prefill in the measured pass (8 then 32 streams arriving)"
grep -v "prefill=0/" /tmp/steps.txt | head -30
echo "--- decode steps of the measured pass, by rows: count, mean build/dispatch/wait/total ms"
python3 - <<'PY'
import re, collections
acc = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
for line in open("/tmp/steps.txt"):
    f = dict(kv.split("=", 1) for kv in line.split()[2:])
    if f["prefill"].startswith("0/") and int(f["rows"]) > 0:
        a = acc[int(f["rows"])]
        a[0] += 1
        for i, k in enumerate(["build_ms", "dispatch_ms", "wait_ms", "total_ms"]):
            a[i + 1] += float(f[k])
for rows in sorted(acc):
    n, *t = acc[rows]
    if n >= 5:
        print(f"rows {rows:3d}: {n:4d} steps, build {t[0]/n:.2f} dispatch {t[1]/n:.2f} wait {t[2]/n:.2f} total {t[3]/n:.2f} ms")
PY
grep -iE "panick|error" /tmp/serve-prof.log | head -5
exit 0
