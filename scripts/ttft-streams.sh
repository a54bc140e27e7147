#!/usr/bin/env bash
# usage: scripts/ttft-streams.sh MODEL_DIR [STREAMS=8] [PROMPT=512] [GEN=32] [TRIALS=2]
# Issue 16's TTFT target: N streams whose prompts arrive together, time to first token
# through `rmlx serve` (rmlx bench --url: p50/p95 over the N requests) against mlx-lm
# `batch_generate`'s time to prefill the same number of prompts of the same length on the
# same model files (scripts/ttft-streams.py: its BatchStats.prompt_time, and the time to its
# first tokens). Trials alternate mlx-lm and rmlx so both see the same machine load.
# The server runs with RMLX_STEP_PROFILE=1: the steps that prefilled are printed (how many
# forwards the N prompts took, and whether decode steps came between them).
#
# Runs from the repository (target/release/rmlx, else target/debug/rmlx; the dev venv's
# mlx-lm) or from the GPU bundle folder (./rmlx, ./plugins, ./lib; python3 with mlx-lm):
#   python3 make_model.py 0.6b bf16 ~/models/qwen3-0.6b-bf16 && bash ttft-streams.sh ~/models/qwen3-0.6b-bf16
# env: RMLX (binary), PY (python with mlx-lm), WARM (rmlx passes not counted first: default 1
# on a GPU, where the first pass pays MLX's JIT for the batch's shapes; 0 on a CPU), PORT.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
M=${1:?usage: ttft-streams.sh MODEL_DIR [STREAMS] [PROMPT] [GEN] [TRIALS]}
N=${2:-8}; P=${3:-512}; G=${4:-32}; T=${5:-2}
PORT=${PORT:-8170}
gpu=0; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu=1
WARM=${WARM:-$gpu}
if [ -x "$here/rmlx" ]; then
  # The GPU bundle.
  RMLX=${RMLX:-$here/rmlx}; plugins=(--plugins "$here/plugins"); PY=${PY:-python3}
  export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$here/lib
else
  root=$(cd "$here/.." && pwd)
  # The newer of the release and dev builds.
  RMLX=${RMLX:-$(ls -t "$root"/target/{release,debug}/rmlx 2>/dev/null | head -1)}
  plugins=(); PY=${PY:-$root/.venv-dev/bin/python}
  export LD_LIBRARY_PATH=$root/.mlx/py/mlx/lib:$root/.mlx/py/mlx_cpu.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # rmlx's MLX finds OpenBLAS in .mlx/py/mlx_cpu.libs (scripts/install-mlx.sh); the venv's
  # mlx wheel its reference BLAS, ~6x slower. Give mlx-lm the same BLAS: the venv's mlx
  # package with libmlx.so beside a link to that folder (its RPATH is $ORIGIN/../../mlx_cpu.libs).
  site=$("$PY" -c 'import mlx, os; print(os.path.dirname(list(mlx.__path__)[0]))' 2>/dev/null)
  if [ $gpu = 0 ] && [ -n "$site" ] && [ -L "$root/.mlx/py/mlx_cpu.libs/$(ls "$site/mlx_cpu.libs" | grep libblas | head -1)" ]; then
    shim=$(mktemp -d); trap 'rm -rf "$shim"' EXIT
    mkdir -p "$shim/mlx/lib"
    for e in "$site"/mlx/*; do [ "$(basename "$e")" = lib ] || ln -s "$e" "$shim/mlx/"; done
    cp "$site/mlx/lib/libmlx.so" "$shim/mlx/lib/"
    ln -s "$root/.mlx/py/mlx_cpu.libs" "$shim/mlx_cpu.libs"
    export PYTHONPATH=$shim${PYTHONPATH:+:$PYTHONPATH}
    echo "mlx-lm: the venv's mlx with rmlx's BLAS ($(readlink "$root/.mlx/py/mlx_cpu.libs/$(ls "$site/mlx_cpu.libs" | grep libblas | head -1)"))"
  fi
fi
[ $gpu = 1 ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "$N streams, prompts of $P tokens arriving together, generation $G; $T trial(s); model $M; rmlx $RMLX"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
log=$(mktemp); out=$(mktemp)
# No prefix cache: every pass sends the same seeded prompts (rmlx bench), and each must prefill whole.
RMLX_STEP_PROFILE=1 "$RMLX" serve "${plugins[@]}" --model "$M" --host 127.0.0.1 --port "$PORT" --no-metrics-db --no-prefix-cache > "$log" 2>&1 &
pid=$!
for i in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
pass() {
  local mark; mark=$(wc -l < "$log")
  "$RMLX" bench --url "http://127.0.0.1:$PORT" -p "$P" -g "$G" --concurrency "$N" --json 2>/dev/null > "$out.json"
  "$PY" -c 'import json,sys; l=json.load(open(sys.argv[1]))["levels"][0]; print("rmlx serve: TTFT p50 %.3f s p95 %.3f s, aggregate decode %.1f tok/s" % (l["ttft_p50_s"], l["ttft_p95_s"], l["aggregate_decode_tps"] or 0))' "$out.json" | tee -a "$out"
  tail -n +"$((mark + 1))" "$log" | grep "^step" | grep -v "prefill=0/" | head -8 | sed 's/^/    /'
  echo "    load: $(cut -d' ' -f1-3 /proc/loadavg)"
}
for w in $(seq "$WARM"); do echo "--- rmlx warm-up pass (not counted)"; pass > /dev/null; : > "$out"; done
for t in $(seq "$T"); do
  echo "--- trial $t"
  "$PY" "$here/ttft-streams.py" "$M" -n "$N" -p "$P" --trials 1 2>/dev/null | tee -a "$out" | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); print("mlx-lm batch_generate: prefill %.3f s, first tokens %.3f s (%s)" % (d["prompt_s"], d["first_token_s"], d["dtype"]))'
  pass
done
kill $pid; wait $pid 2>/dev/null
grep -iE "panicked|error" "$log" | head -3
echo "=== medians over $T trial(s)"
"$PY" - "$out" <<'PY'
import json, re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
mlx = [json.loads(l) for l in lines if l.startswith("{")]
r = [tuple(map(float, re.findall(r"p(?:50|95) ([0-9.]+)", l))) for l in lines if l.startswith("rmlx serve")]
if not mlx or not r:
    sys.exit("no result (see above)")
pre = statistics.median(d["prompt_s"] for d in mlx)
first = statistics.median(d["first_token_s"] for d in mlx)
p50 = statistics.median(x[0] for x in r)
p95 = statistics.median(x[1] for x in r)
print(f"mlx-lm batch_generate prefill {pre:.3f} s (first tokens {first:.3f} s)")
print(f"rmlx serve TTFT p50 {p50:.3f} s, p95 {p95:.3f} s: p50 / batch_generate prefill = {p50 / pre:.2f}, p95 / prefill = {p95 / pre:.2f}")
PY
rm -f "$log" "$out" "$out.json"
exit 0
