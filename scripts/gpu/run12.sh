#!/usr/bin/env bash
# usage: run12.sh A|B|C   (from the bundle folder) — the twelfth session's GPU calls, in order of need.
#  A: the fused kernels' numerics (kvq-test, kvd-test, gdn-test); issue 13's hybrid row (moe-hybrid.sh
#     hybrid-2b bf16: fused gated DeltaNet, batched state prefill); issue 16's 0.6B rows (issue16.sh).
#  B: issue 16's 4B rows; issue 13's Qwen3-30B-A3B q4 row (moe-hybrid.sh 30b-a3b q4).
#  C: issue 12's rotated families with the fused encode (kv-families.sh turbo4 turbo3 fp8, and turbo4
#     with RMLX_FUSED_ENCODE=0); issue 14's mtp and dflash kinds on the device.
# Everything is also written to $OUT/run12-PART.txt when $OUT is set.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
part=${1:?A, B or C}
log=${OUT:-/tmp}/run12-$part.txt
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
case $part in
A)
  echo "=== fused kernels against the composed paths"
  timeout 60 $here/kvq-test fused --nocapture 2>&1 | grep -E "fused|worst|differ|test result|panicked|rror" | head -20
  timeout 40 $here/kvd-test --nocapture 2>&1 | grep -E "fused kernels|test result|panicked|rror" | head -10
  echo "=== issue 13: hybrid"
  timeout ${TA2:-210} bash $here/moe-hybrid.sh hybrid-2b bf16
  echo "=== issue 16: 0.6B rows"
  ONLY="0.6b-bf16 0.6b-q4" timeout ${TA3:-270} bash $here/issue16.sh ;;
B)
  echo "=== issue 16: 4B rows"
  ONLY="4b-bf16 4b-q4" timeout ${TB1:-200} bash $here/issue16.sh
  echo "=== issue 13: Qwen3-30B-A3B q4"
  timeout ${TB2:-340} bash $here/moe-hybrid.sh 30b-a3b q4 ;;
C)
  echo "=== issue 12: rotated families, fused encode"
  FAMS="turbo4 turbo4:noencode turbo3 fp8" SKIP_OPS=1 timeout ${TC1:-300} bash $here/kv-families.sh
  echo "=== issue 14: mtp and dflash on the device"
  timeout ${TC3:-130} bash $here/spec-mtp.sh
  timeout ${TC4:-110} bash $here/spec-dflash.sh ;;
esac
date -u
} 2>&1 | tee $log
