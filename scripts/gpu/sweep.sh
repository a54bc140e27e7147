#!/usr/bin/env bash
# usage: sweep.sh MODEL QUANT OPS...   decode tok/s under MLX_MAX_OPS_PER_BUFFER values
here=$(cd "$(dirname "$0")" && pwd)
name=$1; q=$2; shift 2; dir=$HOME/models/qwen3-$name-$q
[ -f $dir/config.json ] || python3 $here/make_model.py $name $q $dir >/dev/null || exit 1
for ops in "$@"; do
  echo "=== qwen3-$name $q MLX_MAX_OPS_PER_BUFFER=$ops"
  echo -n "mlx-lm:        "; MLX_MAX_OPS_PER_BUFFER=$ops python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep Averages
  echo -n "rmlx compiled: "; MLX_MAX_OPS_PER_BUFFER=$ops RMLX_PROFILE_DECODE=1 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep -E "Averages|per token" | tail -2 | tr '\n' ' '; echo
  echo -n "rmlx op-by-op: "; MLX_MAX_OPS_PER_BUFFER=$ops RMLX_COMPILE=0 RMLX_PROFILE_DECODE=1 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep -E "Averages|per token" | tail -2 | tr '\n' ' '; echo
done
