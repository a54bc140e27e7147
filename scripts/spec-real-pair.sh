#!/usr/bin/env bash
# Speculative decoding on the real pair of issue 14: Qwen2.5-Coder-0.5B-Instruct
# drafting for Qwen2.5-Coder-1.5B-Instruct, rmlx against mlx-lm on the same
# converted files. Dev script (docs/SPECULATIVE.md, "Real pair on CPU").
#
#   bash scripts/spec-real-pair.sh [OUT_DIR]     # default /tmp/spec-real-pair
#
# Needs:
#   - the converted models, ~/.cache/rmlx/real-models/qwen2.5-coder-{0.5b,1.5b}-instruct
#     (RMLX_CACHE_DIR overrides ~/.cache/rmlx): bash scripts/real-models.sh
#     qwen2.5-coder-0.5b (and -1.5b), then `rmlx convert --from-gguf` as in
#     tests/goldens/README.md ("Real models");
#   - an rmlx binary (RMLX, default target/debug/rmlx) with its plugins staged
#     (bash scripts/stage-plugins.sh debug), and MLX's libraries (LD_LIBRARY_PATH
#     defaults to .mlx/py/mlx/lib:.mlx/py/mlx_cpu.libs);
#   - .venv-dev with mlx-lm 0.32.2 (bash scripts/dev-venv.sh).
#
# Settings (environment): N (tokens generated per prompt, default 128), K
# (draft tokens, default 3, mlx-lm's CLI default and rmlx's starting length),
# PORT (default 8791), RUNS (which runs, default
# "rmlx-base rmlx-k rmlx-default mlx-base mlx-k serve"), SERVE_N (tokens per
# stream for the 8-stream server run, default N).
#
# Every run is greedy (temperature 0) through the models' own chat template,
# on 8 prompts (4 code, 4 chat: scripts/dev/spec_real_pair.py).
#   rmlx-base     rmlx generate, no drafter
#   rmlx-k        rmlx generate --draft-model 0.5B --num-draft-tokens K
#                 (rmlx's draft length starts at K and then follows the
#                 measured acceptance, 1 to 2K; the CLI has no fixed length)
#   rmlx-default  rmlx generate --draft-model 0.5B (starts at 3), skipped when K=3
#   mlx-base      mlx-lm stream_generate, no drafter
#   mlx-k         mlx-lm stream_generate with draft_model, num_draft_tokens K (fixed)
#   serve         rmlx serve --draft-model 0.5B, the 8 prompts as 8 concurrent
#                 chat requests, once with num_draft_tokens 0 (no speculation)
#                 and once with K; aggregate tokens/s (mlx_lm.server does not
#                 speculate in a batch, so there is no mlx-lm column)
# mlx-lm runs in process (the same stream_generate as `mlx_lm generate
# --draft-model`) with `model.set_dtype(float32)` on both models, like
# tests/goldens/real_qwen25_goldens.py: on MLX's CPU backend float16 matmuls
# are ~8x slower than float32, and rmlx's CPU default is float32 too
# (`--dtype auto`). Set MLX_DTYPE=model to keep the files' own float16.
#
# Prints the table (acceptance = accepted/drafted, generation tokens/s as the
# mean over prompts, speed-up over no drafter) and the checks: rmlx's greedy
# output with a drafter must equal its output without (exit 1 otherwise);
# whether rmlx's equals mlx-lm's is reported. Results stay in OUT_DIR
# (*.jsonl, one line per prompt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/spec-real-pair}
N=${N:-128}
K=${K:-3}
PORT=${PORT:-8791}
SERVE_N=${SERVE_N:-$N}
RUNS=${RUNS:-"rmlx-base rmlx-k rmlx-default mlx-base mlx-k serve"}
RMLX=${RMLX:-$ROOT/target/debug/rmlx}
PY=$ROOT/.venv-dev/bin/python
HELP=$ROOT/scripts/dev/spec_real_pair.py
MODELS=${RMLX_CACHE_DIR:-$HOME/.cache/rmlx}/real-models
BIG=$MODELS/qwen2.5-coder-1.5b-instruct
SMALL=$MODELS/qwen2.5-coder-0.5b-instruct
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-$ROOT/.mlx/py/mlx/lib:$ROOT/.mlx/py/mlx_cpu.libs}

log() { echo "[spec-real-pair] $*" >&2; }
die() { log "$*"; exit 2; }

for d in "$BIG" "$SMALL"; do
  [ -f "$d/model.safetensors" ] && [ -f "$d/config.json" ] ||
    die "missing converted model $d (bash scripts/real-models.sh $(basename "$d" -instruct), then rmlx convert --from-gguf: tests/goldens/README.md, \"Real models\")"
done
[ -x "$RMLX" ] || die "no rmlx binary at $RMLX (cargo build -p rmlx, then bash scripts/stage-plugins.sh debug)"
[ -d "$(dirname "$RMLX")/plugins" ] || die "no plugins beside $RMLX (bash scripts/stage-plugins.sh debug)"
[ -x "$PY" ] && "$PY" -c "import mlx_lm" 2>/dev/null || die "no mlx-lm in $ROOT/.venv-dev (bash scripts/dev-venv.sh)"

mkdir -p "$OUT"
"$PY" "$HELP" prompts > "$OUT/prompts.jsonl"
{ echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git -C "$ROOT" rev-parse --short HEAD)"; echo "N=$N K=$K SERVE_N=$SERVE_N";
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"; echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

want() { [[ " $RUNS " == *" $1 "* ]]; }

# rmlx_gen FILE [rmlx generate flags]: one `rmlx generate --json` per prompt.
rmlx_gen() {
  local file=$1; shift
  : > "$OUT/$file"
  while IFS= read -r line; do
    local id kind prompt
    id=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$line")
    kind=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["kind"])' "$line")
    prompt=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["prompt"])' "$line")
    log "$file $id"
    "$RMLX" generate --model "$BIG" --chat --prompt "$prompt" --max-tokens "$N" --temp 0 --json "$@" |
      "$PY" -c 'import json,sys; r=json.load(sys.stdin); r.update(id=sys.argv[1], kind=sys.argv[2]); r.pop("prompt_tokens", None); print(json.dumps(r))' "$id" "$kind" >> "$OUT/$file"
  done < "$OUT/prompts.jsonl"
}

want rmlx-base && rmlx_gen rmlx-base.jsonl
want rmlx-k && rmlx_gen rmlx-k.jsonl --draft-model "$SMALL" --num-draft-tokens "$K"
if want rmlx-default; then
  if [ "$K" = 3 ]; then log "rmlx-default: the same run as rmlx-k (K=3 is the default)"; else rmlx_gen rmlx-default.jsonl --draft-model "$SMALL"; fi
fi
want mlx-base && { log "mlx-base"; MLX_DTYPE=${MLX_DTYPE:-float32} "$PY" "$HELP" mlx "$BIG" "$N" < "$OUT/prompts.jsonl" > "$OUT/mlx-base.jsonl"; }
want mlx-k && { log "mlx-k"; MLX_DTYPE=${MLX_DTYPE:-float32} "$PY" "$HELP" mlx "$BIG" "$SMALL" "$K" "$N" < "$OUT/prompts.jsonl" > "$OUT/mlx-k.jsonl"; }

if want serve; then
  log "serve: rmlx serve --draft-model, 8 streams, $SERVE_N tokens each"
  "$RMLX" serve --model "$BIG" --draft-model "$SMALL" --num-draft-tokens "$K" --port "$PORT" > "$OUT/serve.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log" >&2; die "rmlx serve exited"; }
    sleep 1
  done
  ID=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
  # warm-up: one short request loads the weights (lazily) before the timed runs
  curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"$ID\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4,\"num_draft_tokens\":$K}" >/dev/null
  "$PY" "$HELP" serve "http://127.0.0.1:$PORT" "$ID" "$SERVE_N" 0 < "$OUT/prompts.jsonl" > "$OUT/serve-base.json"
  "$PY" "$HELP" serve "http://127.0.0.1:$PORT" "$ID" "$SERVE_N" "$K" < "$OUT/prompts.jsonl" > "$OUT/serve-spec.json"
  kill $SERVER 2>/dev/null || true
  wait $SERVER 2>/dev/null || true
  trap - EXIT
fi

echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
cat "$OUT/env.txt"
"$PY" "$HELP" table "$OUT"
