#!/usr/bin/env bash
# usage: moe-hybrid.sh NAME QUANT [PROMPT] [GEN]   NAME: 30b-a3b (q4) or hybrid-2b (bf16); from the bundle folder
# mlx-lm batch 1 and batch_generate 8 against rmlx bench (batch 1) and rmlx serve at 1 and 8 streams,
# on random weights of the shape (make_model2.py); first, the fused gated DeltaNet kernel's numerics (gdn-test).
here=$(cd "$(dirname "$0")" && pwd)
name=$1; q=$2; P=${3:-512}; G=${4:-128}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
echo "=== gated DeltaNet kernel check (gdn-test: the fused recurrence against the composed path)"
$here/gdn-test --nocapture 2>&1 | grep -E "fused kernels|worst|test result|panicked|rror" | head -20
dir=$HOME/models/$name-$q
t0=$(date +%s)
[ -f $dir/config.json ] || python3 $here/make_model2.py $name $q $dir >/dev/null || exit 1
echo "=== $name $q, prompt $P, generation $G (model made in $(( $(date +%s) - t0 )) s, $(du -sh $dir | cut -f1))"
echo -n "mlx-lm b1: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b 1 -n 3 2>&1 | grep Averages
echo -n "mlx-lm batch_generate b8: "; python3 -m mlx_lm.benchmark --model $dir -p $P -g $G -b 8 -n 3 2>&1 | grep Averages
echo -n "rmlx b1: "; $here/rmlx bench --plugins $here/plugins --model $dir -p $P -g $G -n 3 2>&1 | grep -E "Averages|rror"
case $name in hybrid*) echo -n "rmlx b1, composed DeltaNet (RMLX_FUSED_KERNELS=0): "
  RMLX_FUSED_KERNELS=0 $here/rmlx bench --plugins $here/plugins --model $dir -p $P -g $G -n 3 2>&1 | grep -E "Averages|rror";; esac
$here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port 8140 --no-metrics-db > /tmp/serve-$name.log 2>&1 &
pid=$!
for i in $(seq 240); do curl -sf http://127.0.0.1:8140/health >/dev/null && break; sleep 0.5; done
$here/rmlx bench --url http://127.0.0.1:8140 -p $P -g $G --concurrency 1,8 2>&1 | tail -3
kill $pid; wait $pid 2>/dev/null
exit 0
