#!/usr/bin/env bash
# usage: run13.sh A|B|C   (from the bundle folder) — the thirteenth session's GPU calls, in order of need.
#  A: MLX primitives and host time per decode step (0.6B bf16; after the 2-D residual stream and the
#     L = 1 head split), then issue 16's 0.6B rows, bf16 and q4 (issue16.sh).
#  B: issue 16's 4B rows (bf16 and q4, batch 1); issue 13's hybrid row (moe-hybrid.sh hybrid-2b bf16).
#  D: why batch 1 trails mlx-lm on a fast host: the compiled step against op by op (mask-free SDPA),
#     MLX_MAX_OPS_PER_BUFFER, the host's time per token, primitives of both sides, and a perf profile
#     (QUICK=1: without the MLX_MAX_OPS_PER_BUFFER sweep and the profile).
#  C: issue 12's 4-bit families against bf16 at 1 and 8 streams (kv-families.sh), with their primitives.
# Everything is also written to $OUT/run13-PART.txt when $OUT is set.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
part=${1:?A, B or C}
log=${OUT:-/tmp}/run13-$part.txt
ops() { # model dir, extra bench flags -> the primitives line and the host's time per token
  RMLX_COUNT_OPS=1 RMLX_COMPILE=0 $here/rmlx bench --plugins $here/plugins --model $1 $2 -p 16 -g 3 -n 1 2>&1 | grep -m1 "decode step"
  RMLX_PROFILE_DECODE=1 RMLX_COMPILE=0 $here/rmlx bench --plugins $here/plugins --model $1 $2 -p 512 -g 128 -n 1 2>&1 | grep -m1 "decode per token"
}
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
case $part in
A)
  dir=$HOME/models/qwen3-0.6b-bf16
  [ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null
  echo "=== primitives per b1 decode step, 0.6B bf16 (op by op)"; ops $dir ""
  echo "=== issue 16: 0.6B rows, bf16 and q4"
  ONLY="0.6b-bf16 0.6b-q4" timeout ${TA:-480} bash $here/issue16.sh ;;
B)
  echo "=== issue 16: 4B rows"
  ONLY="4b-bf16 4b-q4" timeout ${TB1:-300} bash $here/issue16.sh
  echo "=== issue 13: hybrid-2b bf16"
  timeout ${TB2:-220} bash $here/moe-hybrid.sh hybrid-2b bf16
  echo "=== primitives per b1 decode step, hybrid-2b bf16"; ops $HOME/models/hybrid-2b-bf16 "" ;;
D)
  dir=$HOME/models/qwen3-0.6b-bf16
  [ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null
  b() { $here/rmlx bench --plugins $here/plugins --model $dir -p 512 -g 128 "$@" 2>&1; }
  b -n 1 >/dev/null # JIT warm-up
  echo -n "mlx-lm b1: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
  echo -n "rmlx compiled: "; b -n 3 | grep Averages
  echo -n "rmlx op by op: "; RMLX_COMPILE=0 b -n 3 | grep Averages
  [ -n "$QUICK" ] || for o in 20 50 300; do echo -n "rmlx op by op, MLX_MAX_OPS_PER_BUFFER=$o: "; MLX_MAX_OPS_PER_BUFFER=$o RMLX_COMPILE=0 b -n 3 | grep Averages; done
  for c in 1 0; do echo "profile, RMLX_COMPILE=$c:"; RMLX_PROFILE_DECODE=1 RMLX_COMPILE=$c b -n 3 | grep -E "per token"; done
  for c in 1 0; do echo -n "primitives, RMLX_COMPILE=$c: "; RMLX_COUNT_OPS=1 RMLX_COMPILE=$c $here/rmlx bench --plugins $here/plugins --model $dir -p 16 -g 3 -n 1 2>&1 | grep -m1 "decode step"; done
  python3 - $dir <<'PY' 2>&1 | tail -3
import sys, mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
m, _ = load(sys.argv[1]); c = make_prompt_cache(m)
mx.eval(m(mx.array([[1] * 16]), cache=c)); y = m(mx.array([[1]]), cache=c)
mx.export_to_dot("/tmp/step.dot", y)
import shutil, os; os.environ.get("OUT") and shutil.copy("/tmp/step.dot", os.environ["OUT"] + "/mlx-lm-step.dot")
print("dot lines:", sum(1 for _ in open("/tmp/step.dot")))
PY
  if [ -z "$QUICK" ] && command -v perf >/dev/null; then
    RMLX_COMPILE=0 perf record -q -g -o /tmp/p.data $here/rmlx bench --plugins $here/plugins --model $dir -p 16 -g 512 -n 1 >/dev/null 2>&1
    perf report -i /tmp/p.data --no-children --sort dso,symbol -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | cut -c1-150 | head -30
    perf report -i /tmp/p.data --no-children --sort dso -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -12
  else echo "no perf"; fi ;;
C)
  dir=$HOME/models/qwen3-0.6b-bf16
  [ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null
  for f in turbo4 q4; do echo "=== primitives, KV $f"; ops $dir "--kv-cache $f"; done
  echo "=== issue 12: 4-bit families against bf16"
  FAMS=${FAMS:-"bf16 turbo4 q4 planar4"} SKIP_OPS=1 timeout ${TC:-420} bash $here/kv-families.sh ;;
esac
date -u
} 2>&1 | tee $log
