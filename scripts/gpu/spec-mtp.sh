#!/usr/bin/env bash
# usage: spec-mtp.sh [PROMPT] [GEN]   (from the bundle folder: rmlx, lib/, plugins/, make_model2.py, add_mtp.py)
# Issue 14's `mtp` kind in the server on a GPU: a Qwen3.5-shaped hybrid of 2B class (random bf16
# weights, make_model2.py hybrid-2b) with a random MTP head of the real shape (add_mtp.py), served
# without and with `--draft-kind mtp`:
#  - lossless: greedy token ids of 4 prompts (/v1/completions, 32 tokens) equal, alone and 4 at once;
#  - cost: rmlx bench at 1 and 8 streams with and without the head. The random head's drafts are all
#    rejected, so every step feeds its kept token again to roll the gated-DeltaNet state back: this
#    is speculation's worst case, not a speed-up (a real checkpoint's head is needed for that).
here=$(cd "$(dirname "$0")" && pwd)
P=${1:-128}; G=${2:-64}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:$here/lib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=${MODEL:-$HOME/models/hybrid-2b-bf16-mtp}   # MODEL=DIR: a qwen3_5 checkpoint with mtp.* (e.g. the tiny fixture)
if [ ! -f $dir/mtp.safetensors ]; then
  python3 $here/make_model2.py hybrid-2b bf16 $dir >/dev/null && python3 $here/add_mtp.py $dir || exit 1
fi
start() { # port, extra args
  $here/rmlx serve --plugins $here/plugins --model $dir --host 127.0.0.1 --port $1 --no-metrics-db "${@:2}" > /tmp/spec-mtp-$1.log 2>&1 &
  echo $!
  for i in $(seq 240); do curl -sf http://127.0.0.1:$1/health >/dev/null && break; sleep 0.5; done
}
ids() { # port, prompt json -> token ids
  curl -s http://127.0.0.1:$1/v1/completions -H 'content-type: application/json' \
    -d "{\"prompt\": $2, \"max_tokens\": 32, \"temperature\": 0}" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["token_ids"], r["usage"].get("drafted_tokens"), r["usage"].get("accepted_tokens"))'
}
plain=$(start 8160); mtp=$(start 8161 --draft-kind mtp --num-draft-tokens 3)
ok=1
prompts=("[1, 2, 3]" "[100, 200, 30, 4, 5, 6, 7, 8]" "[$(seq -s, 3 5 250)]" "[42]")
for p in "${prompts[@]}"; do
  a=$(ids 8160 "$p"); b=$(ids 8161 "$p")
  [ "${b%]*}]" == "${a%]*}]" ] && echo "alone equal: ${b##*]}" || { ok=0; echo "ALONE DIFFER: $a | $b"; }
done
i=0; for p in "${prompts[@]}"; do (ids 8161 "$p" > /tmp/spec-mtp-b-$i) & i=$((i+1)); done; wait
i=0; for p in "${prompts[@]}"; do
  a=$(ids 8160 "$p"); b=$(cat /tmp/spec-mtp-b-$i)
  [ "${b%]*}]" == "${a%]*}]" ] && echo "batched equal: ${b##*]}" || { ok=0; echo "BATCHED DIFFER: $a | $b"; }
  i=$((i+1))
done
[ $ok == 1 ] && echo "LOSSLESS OK" || echo "LOSSLESS FAILED"
for port in 8160 8161; do
  echo "--- bench port $port ($([ $port == 8161 ] && echo mtp || echo plain))"
  $here/rmlx bench --url http://127.0.0.1:$port -p $P -g $G --concurrency 1,8 2>&1 | tail -4
done
curl -s http://127.0.0.1:8161/metrics | grep rmlx_spec_
kill $plain $mtp; wait 2>/dev/null
grep -i "error\|panick" /tmp/spec-mtp-8161.log | head -5
exit 0
