#!/usr/bin/env bash
# usage: run12.sh A|B|C   (from the bundle folder) — the twelfth session's GPU calls, in order of need.
#  A: the fused kernels' numerics (kvq-test, kvd-test, gdn-test); issue 13's hybrid row (moe-hybrid.sh
#     hybrid-2b bf16: fused gated DeltaNet, batched state prefill); issue 12's 4-bit families against
#     the bf16 baseline at 1 and 8 streams with the fused encode and decode (kv-families.sh).
#  B: issue 13's Qwen3-30B-A3B q4 row (moe-hybrid.sh 30b-a3b q4); issue 16's 0.6B bf16 rows (issue16.sh).
#  C: issue 16's other rows (0.6B q4, 4B bf16 and q4); issue 14's mtp kind on the device (spec-mtp.sh).
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
  echo "=== issue 13: hybrid (and the gated DeltaNet kernel check)"
  timeout ${TA1:-220} bash $here/moe-hybrid.sh hybrid-2b bf16
  echo "=== issue 12: 4-bit families against bf16, fused encode and decode (and the kernel checks)"
  FAMS=${FAMS:-"bf16 q4 turbo4 planar4 iso4 rotor4"} SKIP_OPS=1 timeout ${TA2:-330} bash $here/kv-families.sh ;;
B)
  echo "=== issue 13: Qwen3-30B-A3B q4"
  timeout ${TB1:-370} bash $here/moe-hybrid.sh 30b-a3b q4
  echo "=== issue 16: 0.6B bf16 rows"
  ONLY="0.6b-bf16" timeout ${TB2:-200} bash $here/issue16.sh ;;
C)
  echo "=== issue 16: 0.6B q4, 4B rows"
  ONLY="0.6b-q4 4b-bf16 4b-q4" timeout ${TC1:-330} bash $here/issue16.sh
  echo "=== issue 14: mtp on the device"
  timeout ${TC2:-200} bash $here/spec-mtp.sh ;;
esac
date -u
} 2>&1 | tee $log
