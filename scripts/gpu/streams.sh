#!/usr/bin/env bash
# usage: streams.sh [PROMPT] [GEN]   (from the bundle folder: rmlx, lib/, plugins/, make_model.py)
# Issue 16's serving rows on one GPU call, Qwen3-0.6B bf16 random weights:
#  - mlx-lm `batch_generate` at 8 and 32 (mlx_lm.benchmark -b N): prefill and decode rates;
#  - rmlx serve at 1, 8 and 32 streams arriving together (rmlx bench --url): TTFT and aggregate
#    decode, with batched prefill (the default) and with RMLX_BATCHED_PREFILL=0.
# The TTFT row compares rmlx's p50 time to first token at 8 streams with the time mlx-lm's batch
# prefill takes for the same 8 prompts (8 * PROMPT / its prompt_tps).
here=$(cd "$(dirname "$0")" && pwd)
P=${1:-512}; G=${2:-128}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=$HOME/models/qwen3-0.6b-bf16
[ -f $dir/config.json ] || python3 $here/make_model.py 0.6b bf16 $dir >/dev/null || exit 1
for b in 8 32; do
  echo -n "mlx-lm batch_generate b$b: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b $b -n 2 2>&1 | grep Averages
done
port=8150
for bp in 1 0; do
  echo "--- rmlx serve, RMLX_BATCHED_PREFILL=$bp"
  RMLX_BATCHED_PREFILL=$bp $here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port $port --no-metrics-db > /tmp/serve-$bp.log 2>&1 &
  pid=$!
  for i in $(seq 120); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.5; done
  $here/rmlx bench --url http://127.0.0.1:$port -p $P -g $G --concurrency 1,8,32 2>&1 | tail -4
  kill $pid; wait $pid 2>/dev/null
  port=$((port + 1))
done
exit 0
