#!/usr/bin/env bash
# The full property-based run of the HTTP API from schemas/openapi.json:
# schemathesis with every check, positive and negative data, against the tiny
# chat model (tests/api/tiny_chat.py). Needs `make build dev-venv`.
#
#   bash scripts/schemathesis-full.sh            # 100 examples per operation and phase
#   MAX_EXAMPLES=300 bash scripts/schemathesis-full.sh
#
# Prints schemathesis's summary and a count of the requests it sent (per
# operation, per status class, and every 5xx); exits non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$(mktemp -d -t rmlx-st-XXXXXX)}
exec .venv-dev/bin/python tests/api/st_run.py --max-examples "${MAX_EXAMPLES:-100}" --seed "${SEED:-1}" --out "$OUT"
