#!/usr/bin/env bash
# usage: run10.sh   (from the bundle folder) — the tenth session's one GPU call, in order of need:
#  1. the fused KV encode / fp8 decode kernels against their composed paths (kvq-test fused);
#  2. the hybrid-2b (Qwen3.5 shape) with the fused gated-DeltaNet kernel (moe-hybrid.sh: gdn-test,
#     mlx-lm b1/b8, rmlx b1 fused and composed, rmlx serve 1 and 8 streams with batched state prefill);
#  3. Qwen3-0.6B bf16 serving with the server's defaults and the step profile (serve-profile.sh).
# Each part has its own time limit; everything is also written to $OUT/run10.txt when $OUT is set.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
log=${OUT:-/tmp}/run10.txt
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "=== 1. kv-quant fused kernels (encode, decode, fp8)"
timeout ${T1:-60} $here/kvq-test fused --nocapture 2>&1 | grep -E "fused|worst|differ|test result|panicked|rror" | head -30
echo "=== 2. hybrid"
timeout ${T2:-200} bash $here/moe-hybrid.sh hybrid-2b bf16
echo "=== 3. serving profile"
timeout ${T3:-190} bash $here/serve-profile.sh 0.6b bf16
} 2>&1 | tee $log
