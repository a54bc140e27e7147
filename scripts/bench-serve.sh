#!/usr/bin/env bash
# Thin wrapper: the server benchmark is `rmlx bench --url` (docs/CLI.md).
#   scripts/bench-serve.sh URL [rmlx bench flags: --concurrency 1,8 -p 128 -g 64 --json ...]
#   env RMLX: the rmlx binary (default target/release/rmlx)
set -euo pipefail
URL=${1:?usage: bench-serve.sh URL [rmlx bench --url flags]}
shift
exec "${RMLX:-$(dirname "$0")/../target/release/rmlx}" bench --url "$URL" "$@"
