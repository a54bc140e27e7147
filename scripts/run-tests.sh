#!/usr/bin/env bash
# Runs the test suites and ends with one summary line over all of them
# ("N passed, M failed"), since the last cargo line is often a crate with no tests.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LOG=$(mktemp)
status=0
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$LOG" || status=1
# Python API tests (official SDKs) when present.
if ls tests/api/test_*.py >/dev/null 2>&1; then
  .venv-dev/bin/python -m pytest -q tests/api 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1
fi
# Summary lines only: cargo's "test result:" and pytest's "... in 1.23s".
SUMMARY=$(grep -E '^test result: |^=*[ ]*[0-9]+ (passed|failed).* in [0-9.]+s' "$LOG")
count() { echo "$SUMMARY" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}'; }
passed=$(count passed)
failed=$(count failed)
rm -f "$LOG"
[ "$failed" = 0 ] || status=1
echo "${passed} passed, ${failed} failed"
exit $status
