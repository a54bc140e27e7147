#!/usr/bin/env bash
# usage: spec-dflash.sh [GEN]   (from the bundle folder: rmlx, lib/, plugins/, make_model.py, make_dflash.py)
# Issue 14's `dflash` kind on a GPU: a Qwen3-4B-shaped verifier (random bf16, make_model.py 4b) with a
# random DFlash drafter of the real shape (make_dflash.py: 5 layers, block 16, 5 target layers), through
# `rmlx generate --json` without and with `--draft-kind dflash`:
#  - lossless: the greedy token ids of 4 prompts are equal (the drafter's non-causal block attention
#    and the verifier's K/V roll-back run on the device);
#  - cost: generation tokens/s with and without the drafter, with the draft counts. The random
#    drafter's blocks are all rejected, so this is speculation's worst case, not a speed-up.
# MODEL=DIR DRAFTER=DIR run another pair (e.g. the tiny fixtures qwen3-f32 / qwen3-dflash-f32);
# RMLX=BIN PLUGINS=DIR run another build.
here=$(cd "$(dirname "$0")" && pwd)
G=${1:-64}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
rmlx=${RMLX:-$here/rmlx}; plugins=${PLUGINS:-$here/plugins}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
v=${MODEL:-$HOME/models/qwen3-4b-bf16}
d=${DRAFTER:-$HOME/models/qwen3-4b-dflash}
[ -f $v/config.json ] || python3 $here/make_model.py 4b bf16 $v >/dev/null || exit 1
[ -f $d/config.json ] || python3 $here/make_dflash.py $v $d || exit 1
gen() { # prompt ids, extra args -> "ids | tps drafted accepted"
  $rmlx --plugins $plugins generate --json -m $v --prompt-tokens "$1" --max-tokens $G "${@:2}" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["tokens"], "|", round(r["generation_tps"], 1), r.get("drafted_tokens"), r.get("accepted_tokens"))'
}
ok=1
for p in "1,2,3" "100,200,30,4,5,6,7,8" "$(seq -s, 3 5 250)" "42"; do
  a=$(gen "$p"); b=$(gen "$p" --draft-kind dflash --draft-model $d)
  echo "plain tps ${a##*|} | dflash tps, drafted, accepted ${b##*|}"
  [ "${a%|*}" == "${b%|*}" ] || { ok=0; echo "DIFFER: $a || $b"; }
done
[ $ok == 1 ] && echo "DFLASH LOSSLESS OK" || echo "DFLASH LOSSLESS FAILED"
