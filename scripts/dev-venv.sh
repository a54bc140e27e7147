#!/usr/bin/env bash
# Creates the Python dev environment .venv-dev/ at the repo root (git-ignored).
# It is for tests only (golden fixtures from mlx-lm, API-client tests); rmlx
# never needs Python at run time. Idempotent: a stamp file records the pins,
# and a second run with the same pins does nothing.
#
#   bash scripts/dev-venv.sh            # create / update
#   .venv-dev/bin/python tests/goldens/make_goldens.py
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv-dev
PY=${PYTHON:-python3}

# Pins. On Linux the `mlx` wheel is only the Python front end; the `cpu` extra
# pulls the matching `mlx-cpu` wheel (libmlx.so for the CPU backend). On macOS
# the extra is a no-op and `mlx-metal` comes in instead.
PINS=(
  "mlx[cpu]==0.32.4"
  "mlx-lm==0.32.2"
  "numpy"
  "openai"
  "anthropic"
  "pytest"
  "openapi-python-client"
  "gguf"
  # the OpenAPI document's contract tests (tests/api/test_openapi_contract.py)
  "schemathesis==4.32.5"
  "openapi-spec-validator==0.9.0"
)
STAMP=$VENV/.rmlx-dev-stamp
WANT=$(printf '%s\n' "${PINS[@]}" "$(cat "$0" | sha256sum | cut -c1-16)")

log() { echo "[dev-venv] $*"; }

# The TypeScript client test (tests/api/ts, `npm ci` from the Makefile) needs
# node and npm; Debian's packages do (node 18+).
if ! command -v npm >/dev/null 2>&1; then
  log "npm not found; installing nodejs and npm"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ] \
   && "$VENV/bin/python" -c 'import mlx.core, mlx_lm' >/dev/null 2>&1; then
  log "up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv without ensurepip unless python3-venv is installed.
    log "python3 -m venv failed; installing python3-venv"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  log "created $VENV ($("$VENV/bin/python" --version 2>&1))"
fi

log "installing: ${PINS[*]}"
"$VENV/bin/python" -m pip install -q "${PINS[@]}"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import mlx.core as mx
for p in ("mlx", "mlx-lm", "numpy", "openai", "anthropic", "pytest", "openapi-python-client", "gguf",
          "schemathesis", "openapi-spec-validator"):
    print(f"[dev-venv]   {p}=={md.version(p)}")
mx.set_default_device(mx.cpu)
assert mx.sum(mx.ones((4,))).item() == 4.0
EOF
printf '%s\n' "$WANT" > "$STAMP"
log "ready: $VENV/bin/python"
