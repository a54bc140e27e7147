#!/usr/bin/env bash
# Copies the built plugin cdylibs beside the binary: target/PROFILE/plugins/
# (the default plugin directory) and the test-only ones to test-plugins/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${1:-debug}
DIR=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
EXT=so; [ "$(uname)" = Darwin ] && EXT=dylib
mkdir -p "$DIR/plugins" "$DIR/test-plugins"
rm -f "$DIR"/plugins/*."$EXT" "$DIR"/test-plugins/*."$EXT"
n=0
for f in "$DIR"/librmlx_arch_*."$EXT" "$DIR"/librmlx_wquant_*."$EXT" "$DIR"/librmlx_kv_*."$EXT" "$DIR"/librmlx_draft_*."$EXT"; do
  [ -e "$f" ] || continue
  cp "$f" "$DIR/plugins/"; n=$((n+1))
done
for f in "$DIR"/librmlx_test_*."$EXT"; do
  [ -e "$f" ] && cp "$f" "$DIR/test-plugins/"
done
echo "[stage-plugins] $n plugins in $DIR/plugins"
