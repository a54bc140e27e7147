#!/usr/bin/env bash
# usage: bench.sh MODEL QUANT  (models cached in $HOME/models)
set -u
here=$(cd "$(dirname "$0")" && pwd)
name=$1; q=$2; dir=$HOME/models/qwen3-$name-$q
[ -f $dir/config.json ] || python3 $here/make_model.py $name $q $dir >/dev/null || exit 1
echo "=== qwen3-$name $q: mlx-lm b1"
python3 -m mlx_lm.benchmark --model $dir -p 512 -g 128 -b 1 -n 3 2>&1 | grep -E "Trial|Averages"
echo "=== qwen3-$name $q: rmlx bench (compiled step)"
RMLX_PROFILE_DECODE=1 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep -E "Trial|Averages|per token" | tail -6
echo "=== qwen3-$name $q: rmlx bench (RMLX_COMPILE=0, op by op)"
RMLX_COMPILE=0 RMLX_PROFILE_DECODE=1 $here/rmlx --plugins $here/plugins bench --model $dir -p 512 -g 128 -n 3 2>&1 | grep -E "Trial|Averages|per token" | tail -6
