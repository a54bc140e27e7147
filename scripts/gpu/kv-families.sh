#!/usr/bin/env bash
# usage: [FAMS="bf16 turbo4 ..."] [SKIP_OPS=1] kv-families.sh [PROMPT] [GEN]   (from the bundle folder: rmlx, lib/, plugins/, kvq-test, make_model.py)
# On the GPU machine, after sourcing the MLX CUDA installer:
#  1. the fused decode kernels against the composed path (kv-quant's and kv-dense's tests, on the GPU);
#  2. Qwen3-0.6B bf16 random weights: mlx-lm batch 1 and batch_generate 8 as the baseline;
#  3. rmlx bench in-process (batch 1) and rmlx serve at 1 and 8 streams, per KV family:
#     bf16 (the dense default), turbo4 and turbo3 (fused kernel), turbo4 with RMLX_FUSED_KERNELS=0
#     (composed), q8 and q4 (affine, quantized matmuls), fp8; NAME:noencode keeps the fused decode
#     but encodes with composed ops (RMLX_FUSED_ENCODE=0).
here=$(cd "$(dirname "$0")" && pwd)
P=${1:-512}; G=${2:-128}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "=== 1. fused kernel check (every family's decode kernel against its composed path)"
$here/kvq-test fused --nocapture 2>&1 | grep -E "fused kernels|worst|test result|panicked|rror" | head -20
$here/kvd-test --nocapture 2>&1 | grep -E "fused kernels|test result|panicked|rror" | head -20
dir=$HOME/models/qwen3-0.6b-bf16
[ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null || exit 1
echo "=== 2. mlx-lm, qwen3-0.6b bf16, prompt $P, generation $G"
echo -n "mlx-lm b1: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b 1 -n 3 2>&1 | grep Averages
echo -n "mlx-lm batch_generate b8: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b 8 -n 3 2>&1 | grep Averages
[ -n "$SKIP_OPS" ] || {
echo "=== 2b. MLX primitives per decode step (RMLX_COUNT_OPS=1; op by op, so each is one dispatch) and fused projections A/B"
for f in 1 0; do
  echo -n "fused linears $f: "; RMLX_FUSED_LINEARS=$f RMLX_COUNT_OPS=1 RMLX_COMPILE=0 $here/rmlx bench --plugins $here/plugins --model $dir -p 16 -g 3 -n 1 2>&1 | grep -m1 "decode step"
  echo -n "rmlx b1 fused linears $f: "; RMLX_FUSED_LINEARS=$f $here/rmlx bench --plugins $here/plugins --model $dir -p $P -g $G -n 3 2>&1 | grep Averages
done
}
echo "=== 3. rmlx per KV family"
port=8123
for fam in ${FAMS:-bf16 turbo4 turbo4:composed turbo3 q8 q4 fp8}; do
  name=${fam%%:*}; env=""
  case $fam in *:composed) env="RMLX_FUSED_KERNELS=0";; *:noencode) env="RMLX_FUSED_ENCODE=0";; esac
  echo "--- $fam"
  echo -n "rmlx b1: "; env $env $here/rmlx bench --plugins $here/plugins --kv-cache $name --model $dir -p $P -g $G -n 3 2>&1 | grep Averages
  env $env RMLX_COUNT_OPS=1 $here/rmlx serve --plugins $here/plugins --kv-cache $name --model $dir --host 127.0.0.1 --port $port --no-metrics-db > /tmp/serve-$name.log 2>&1 &
  pid=$!
  for i in $(seq 120); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.5; done
  $here/rmlx bench --url http://127.0.0.1:$port -p $P -g $G --concurrency 1,8 2>&1 | tail -3
  echo "kv bytes per block (16 tokens, every layer): $(curl -s http://127.0.0.1:$port/metrics | grep '^rmlx_kv_group_block_bytes' | awk '{print $2}' | tr '\n' ' ')"
  kill $pid; wait $pid 2>/dev/null
  grep "server decode step" /tmp/serve-$name.log | cut -c1-400
  port=$((port + 1))
done
exit 0
