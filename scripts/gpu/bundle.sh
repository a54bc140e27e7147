#!/usr/bin/env bash
# usage: scripts/gpu/bundle.sh OUT.tar.xz
# Builds what the GPU runs need (release rmlx and plugins, libmlxc.so, and the
# fused-kernel test binaries of kv-quant, kv-dense and rmlx-nn's gated DeltaNet:
# kvq-test, kvd-test, gdn-test) and packs them with the
# drivers in scripts/gpu/ (and scripts/ttft-streams.*) as one folder `b/`, xz-compressed (~10 MB), to carry
# in the last call after the MLX CUDA wheel's parts (docs/PERF.md, "How to
# reproduce on the GPU machine").
set -euo pipefail
out=$(realpath "${1:?usage: bundle.sh OUT.tar.xz}")
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export CARGO_INCREMENTAL=0
cargo build --release --workspace
bash scripts/stage-plugins.sh release >/dev/null
# The test binaries: the path of each is the line cargo prints for it.
kvq=$(cargo test --release -p rmlx-kv-quant --lib --no-run 2>&1 | grep -o '[^ (]*deps/rmlx_kv_quant-[0-9a-f]*' | tail -1)
kvd=$(cargo test --release -p rmlx-kv-dense --test fused --no-run 2>&1 | grep -o '[^ (]*deps/fused-[0-9a-f]*' | tail -1)
gdn=$(cargo test --release -p rmlx-nn --test gated_delta_fused --no-run 2>&1 | grep -o '[^ (]*deps/gated_delta_fused-[0-9a-f]*' | tail -1)
tmp=$(mktemp -d)
mkdir -p "$tmp/b/lib" "$tmp/b/plugins"
cp target/release/rmlx "$tmp/b/"
cp target/release/plugins/*.so "$tmp/b/plugins/"
cp -L .mlx/py/mlx/lib/libmlxc.so "$tmp/b/lib/"
cp "$kvq" "$tmp/b/kvq-test"
cp "$kvd" "$tmp/b/kvd-test"
cp "$gdn" "$tmp/b/gdn-test"
strip "$tmp/b/rmlx" "$tmp/b/kvq-test" "$tmp/b/kvd-test" "$tmp/b/gdn-test" "$tmp/b/plugins/"*.so "$tmp/b/lib/libmlxc.so" || true
cp scripts/gpu/*.sh scripts/gpu/*.py "$tmp/b/"
cp scripts/ttft-streams.sh scripts/ttft-streams.py "$tmp/b/"
tar -C "$tmp" -cf - b | xz -T2 -6 > "$out"
rm -rf "$tmp"
ls -la "$out"
