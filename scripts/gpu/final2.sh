#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
serve_bench() { # dir env...
  local dir=$1; shift
  env "$@" $here/rmlx --plugins $here/plugins serve --model $dir --host 127.0.0.1 --port 8123 --no-metrics-db > /tmp/serve.log 2>&1 &
  local pid=$!
  for i in $(seq 240); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 0.5; done
  $here/rmlx bench --url http://127.0.0.1:8123 -p 512 -g 128 --concurrency 1,8 2>&1 | tail -3
  kill $pid; wait $pid 2>/dev/null; true
}
d06=$HOME/models/qwen3-0.6b-bf16
echo "=== 0.6b bf16 serve, RMLX_COMPILE=0 (op by op)"; serve_bench $d06 RMLX_COMPILE=0
name=4b; q=bf16; dir=$HOME/models/qwen3-$name-$q
[ -f $dir/config.json ] || python3 $here/make_model.py $name $q $dir >/dev/null || exit 1
echo "=== qwen3-4b bf16 batch 1"
echo -n "mlx-lm: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
echo -n "rmlx compiled: "; $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep Averages
echo -n "rmlx op by op: "; RMLX_COMPILE=0 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep Averages
echo -n "mlx-lm batch_generate b8: "; python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 8 -n 2 2>&1 | grep Averages
echo "=== 4b bf16 serve (compiled)"; serve_bench $dir RMLX_COMPILE=1
echo "=== 4b bf16 serve (op by op)"; serve_bench $dir RMLX_COMPILE=0
exit 0
