#!/usr/bin/env bash
# usage: final.sh MODEL QUANT [b8]   batch-1 (and with b8: 8-stream serving vs batch_generate)
here=$(cd "$(dirname "$0")" && pwd)
name=$1; q=$2; dir=$HOME/models/qwen3-$name-$q
[ -f $dir/config.json ] || python3 $here/make_model.py $name $q $dir >/dev/null || exit 1
echo "=== qwen3-$name $q batch 1, prompt 512, generation 128"
echo -n "mlx-lm (MLX defaults):          "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
echo -n "mlx-lm (MLX_MAX_OPS_PER_BUFFER=100): "; MLX_MAX_OPS_PER_BUFFER=100 python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
echo -n "rmlx (defaults):                "; RMLX_PROFILE_DECODE=1 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep -E "Averages|per token" | tail -2 | tr '\n' ' '; echo
[ "${3:-}" = b8 ] || exit 0
echo "=== qwen3-$name $q 8 concurrent, prompt 512, generation 128"
echo -n "mlx-lm batch_generate b8 (MLX defaults): "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 8 -n 3 2>&1 | grep Averages
$here/rmlx --plugins $here/plugins serve --model $dir --host 127.0.0.1 --port 8123 --no-metrics-db > /tmp/serve.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 0.5; done
$here/rmlx bench --url http://127.0.0.1:8123 -p 512 -g 128 --concurrency 1,8 2>&1 | tail -25
kill $pid; wait $pid 2>/dev/null
