#!/usr/bin/env bash
# Long-context KV memory of a sliding-window model and multi-turn prefix
# reuse, measured through `rmlx serve` (docs/KV_CACHE.md, "Sliding-window
# memory, measured"; docs/MODELS.md, Gemma 3). Builds nothing: run
# `cargo build -p rmlx && bash scripts/stage-plugins.sh debug` first.
#
#   bash scripts/long-context-kv.sh [kv|chat|hybrid|all] [N ...]
#     kv      Gemma-3-270M (scripts/real-models.sh), one prompt of N tokens
#             each (default 2048 8192 16384 32764: 32,768 positions) + GEN tokens: per layer
#             group the most blocks held, bytes charged, MLX / process peaks
#             (AB=1: also with RMLX_KV_WINDOW_GROUPS=0, outputs compared)
#     chat    Gemma-3-270M, 4 turns of TURN tokens, prefix cache on and off
#     hybrid  the tiny qwen3_5-f32 fixture (gated DeltaNet + attention), the
#             same 4-turn chat in its 256-token vocabulary and 512 positions
#
# Env: GEMMA (model dir, default ~/.cache/rmlx/real-models/gemma-3-270m),
# RMLX, PORT, GEN, TURN, FIRST, BUDGET, SERVE_ARGS, AB, CACHE
# (scripts/long-context-kv.py). One JSON line per measurement on stdout.
# Time on 2 shared CPU cores (2026-12-07): kv 2k 0.5-1 min, 8k 2-4, 16k 4,
# 32,764 13 (AB doubles); chat 4 min; hybrid seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-$ROOT/.mlx/py/mlx/lib:$ROOT/.mlx/py/mlx_cpu.libs}
export RMLX=${RMLX:-$ROOT/target/debug/rmlx}
GEMMA=${GEMMA:-$HOME/.cache/rmlx/real-models/gemma-3-270m}
WHAT=${1:-all}
shift || true
PY=python3
[ -x "$ROOT/.venv-dev/bin/python" ] && PY=$ROOT/.venv-dev/bin/python
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
case $WHAT in
  kv) [ $# -gt 0 ] || set -- 2048 8192 16384 32764
      "$PY" scripts/long-context-kv.py kv "$GEMMA" "$@" ;;
  chat) "$PY" scripts/long-context-kv.py chat "$GEMMA" ;;
  hybrid) VOCAB=256 TURN=${TURN:-96} FIRST=${FIRST:-128} "$PY" scripts/long-context-kv.py chat "$ROOT/tests/fixtures/models/qwen3_5-f32" ;;
  all) "$0" kv "$@"; "$0" chat; "$0" hybrid ;;
  *) echo "usage: $0 [kv|chat|hybrid|all] [N ...]" >&2; exit 2 ;;
esac
