#!/usr/bin/env bash
# usage: final3.sh MODEL QUANT   batch 1 (mlx-lm vs rmlx bench) and serving at 1, 8, 8 (warm) streams
# against mlx-lm's batch_generate at batch 8; prompt 512, generation 128.
here=$(cd "$(dirname "$0")" && pwd)
name=$1; q=$2; dir=$HOME/models/qwen3-$name-$q
[ -f $dir/config.json ] || python3 $here/make_model.py $name $q $dir >/dev/null || exit 1
echo "=== qwen3-$name $q, prompt 512, generation 128"
echo -n "mlx-lm b1: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
echo -n "rmlx   b1: "; $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep Averages
echo -n "mlx-lm batch_generate b8: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 8 -n 3 2>&1 | grep Averages
$here/rmlx --plugins $here/plugins serve --model $dir --host 127.0.0.1 --port 8123 --no-metrics-db > /tmp/serve.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 0.5; done
$here/rmlx bench --url http://127.0.0.1:8123 -p 512 -g 128 --concurrency 1,8,8 2>&1 | tail -4
kill $pid; wait $pid 2>/dev/null
exit 0
