#!/usr/bin/env bash
# usage: run14.sh A|B|C|D   (from the bundle folder) — the fourteenth session's GPU calls.
#  A: MLX primitives and host time per decode step (0.6B bf16; after the 2-D residual stream and the
#     L = 1 head split), then issue 16's 0.6B rows, bf16 and q4 (issue16.sh).
#  B: issue 16's 4B rows (bf16 and q4, batch 1); issue 13's hybrid row (moe-hybrid.sh hybrid-2b bf16).
#  D: batch 1 (0.6B bf16 and q4) against mlx-lm: the compiled step attending through rmlx's fused
#     decode kernel (the default on a GPU), through MLX's sdpa with a mask (RMLX_FUSED_KERNELS=0),
#     and op by op (RMLX_COMPILE=0); host time per token; primitives; the kernels' numerics first.
#     DQ="bf16" limits the models (default "bf16 q4").
#  C: issue 12's 4-bit families against bf16 at 1 and 8 streams (kv-families.sh), with their primitives.
# Everything is also written to $OUT/run14-PART.txt when $OUT is set.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
part=${1:?A, B, C or D}
log=${OUT:-/tmp}/run14-$part.txt
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
  ONLY="0.6b-bf16 0.6b-q4" timeout ${TA:-420} bash $here/issue16.sh
  echo "=== 8 streams, 0.6B bf16: the server's compiled paged step (default) against op by op (RMLX_COMPILE_PAGED=0)"
  for c in 1 0; do
    RMLX_COMPILE_PAGED=$c $here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port 8199 --no-metrics-db --no-prefix-cache > /tmp/serve-c$c.log 2>&1 &
    pid=$!
    for i in $(seq 240); do curl -sf http://127.0.0.1:8199/health >/dev/null && break; sleep 0.5; done
    $here/rmlx bench --url http://127.0.0.1:8199 -p 512 -g 128 --concurrency 8 >/dev/null 2>&1
    echo -n "RMLX_COMPILE_PAGED=$c: "; $here/rmlx bench --url http://127.0.0.1:8199 -p 512 -g 128 --concurrency 1,8 2>&1 | tail -2 | tr '\n' ' '; echo
    kill $pid; wait $pid 2>/dev/null
  done ;;
B)
  echo "=== issue 16: 4B rows"
  ONLY="4b-bf16 4b-q4" timeout ${TB1:-300} bash $here/issue16.sh
  echo "=== issue 13: hybrid-2b bf16"
  timeout ${TB2:-220} bash $here/moe-hybrid.sh hybrid-2b bf16
  echo "=== primitives per b1 decode step, hybrid-2b bf16"; ops $HOME/models/hybrid-2b-bf16 "" ;;
D)
  echo "=== the fused decode kernels against MLX / the composed path (kv-dense: paged and contiguous)"
  $here/kvd-test --nocapture 2>&1 | grep -E "fused kernels|test result|panicked|rror" | head -8
  for q in ${DQ:-bf16 q4}; do
    dir=$HOME/models/qwen3-0.6b-$q
    [ -f $dir/config.json ] || python3 $here/make_model.py 0.6b $q $dir >/dev/null
    b() { $here/rmlx bench --plugins $here/plugins --model $dir -p 512 -g 128 "$@" 2>&1; }
    b -n 1 >/dev/null # JIT warm-up
    echo "=== 0.6B $q, batch 1, prompt 512, generation 128"
    echo -n "mlx-lm: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
    echo -n "rmlx compiled, fused decode kernel (default): "; b -n 3 | grep Averages
    echo -n "rmlx compiled, MLX sdpa with the mask (RMLX_FUSED_KERNELS=0): "; RMLX_FUSED_KERNELS=0 b -n 3 | grep Averages
    echo -n "rmlx op by op (RMLX_COMPILE=0): "; RMLX_COMPILE=0 b -n 3 | grep Averages
    echo -n "mlx-lm again: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
    for c in 1 0; do echo -n "host time, RMLX_COMPILE=$c: "; RMLX_PROFILE_DECODE=1 RMLX_COMPILE=$c b -n 1 | grep -m1 "per token"; done
    echo -n "primitives op by op: "; RMLX_COUNT_OPS=1 RMLX_COMPILE=0 $here/rmlx bench --plugins $here/plugins --model $dir -p 16 -g 3 -n 1 2>&1 | grep -m1 "decode step"
  done ;;
C)
  dir=$HOME/models/qwen3-0.6b-bf16
  [ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null
  for f in turbo4 q4; do echo "=== primitives, KV $f"; ops $dir "--kv-cache $f"; done
  echo "=== issue 12: 4-bit families against bf16"
  FAMS=${FAMS:-"bf16 turbo4 q4 planar4"} SKIP_OPS=1 timeout ${TC:-420} bash $here/kv-families.sh ;;
esac
date -u
} 2>&1 | tee $log
