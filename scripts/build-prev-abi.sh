#!/usr/bin/env bash
# Builds the test plugin that stands for a third party's plugin built against
# the previous plugin ABI (tests/plugins/prev-abi: its own workspace, with a
# frozen copy of rmlx-plugin-api 3.0), into the main target directory, and
# stages it with the other test plugins. Run by `make build`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${1:-debug}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
flag=(); [ "$PROFILE" = release ] && flag=(--release)
# The copy's lock file follows the main one, so shared dependencies are
# built once for both workspaces.
# prev-abi: plugin-api 3.0; prev-abi-3.6: plugin-api 3.6 (before 3.7's
# ForwardCtx::positions).
EXT=so; [ "$(uname)" = Darwin ] && EXT=dylib
mkdir -p "$TARGET/$PROFILE/test-plugins"
for crate in prev-abi:rmlx_test_prev_abi prev-abi-3.6:rmlx_test_prev_abi_36; do
  dir=${crate%%:*} lib=${crate##*:}
  cp "$ROOT/Cargo.lock" "$ROOT/tests/plugins/$dir/Cargo.lock"
  CARGO_TARGET_DIR=$TARGET ${CARGO:-cargo} build "${flag[@]}" --quiet \
    --manifest-path "$ROOT/tests/plugins/$dir/Cargo.toml"
  cp "$TARGET/$PROFILE/lib$lib.$EXT" "$TARGET/$PROFILE/test-plugins/"
done
