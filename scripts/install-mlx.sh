#!/usr/bin/env bash
# Installs MLX for Linux (the pinned mlx-cpu wheel) and builds mlx-c from the
# pinned crates.io mlx-sys crate as a shared libmlxc.so, all under .mlx/ in the
# repo. Idempotent: a stamp records what was built. Run by `make mlx`.
#
# Layout afterwards (MLX_PREFIX = .mlx/py/mlx, the wheel's own layout):
#   .mlx/py/mlx/lib/libmlx.so      MLX (CPU backend; CUDA is swapped in via LD_LIBRARY_PATH)
#   .mlx/py/mlx/lib/libmlxc.so     mlx-c 0.7 + the rmlx error bus
#   .mlx/py/mlx/include/mlx/...    MLX and mlx-c headers
#   .mlx/py/mlx_cpu.libs/          the wheel's BLAS/LAPACK (OpenBLAS swapped in when present)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MLX_VERSION=${MLX_VERSION:-0.32.4}
MLXSYS_VERSION=0.7.0
DEST=$ROOT/.mlx
PREFIX=$DEST/py/mlx
HASH=$(cat "$0" "$ROOT"/scripts/lib/sysdeps.sh "$ROOT"/kernels/mlxc/*.* "$ROOT"/kernels/mlxc/compat/* "$ROOT"/scripts/patch-mlx-c.py | sha256sum | cut -c1-16)
STAMP=$DEST/stamp-$MLX_VERSION-$MLXSYS_VERSION-$HASH
if [ -f "$STAMP" ] && [ -f "$PREFIX/lib/libmlxc.so" ]; then exit 0; fi

log() { echo "[make mlx] $*"; }

# 1. System packages: cmake for mlx-c, libclang for bindgen, OpenBLAS for speed.
# shellcheck source=lib/sysdeps.sh
. "$ROOT/scripts/lib/sysdeps.sh"
mapfile -t missing < <(missing_packages)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
find_libclang >/dev/null || { log "no libclang that bindgen can load (libclang.so, libclang-*.so.1 or LIBCLANG_PATH)"; exit 1; }

mkdir -p "$DEST/dl"
# 2. The MLX wheel, unpacked as-is (its libmlx.so finds its BLAS through $ORIGIN).
if [ ! -f "$PREFIX/lib/libmlx.so" ] || [ ! -f "$DEST/py/.mlx-$MLX_VERSION" ]; then
  log "downloading mlx-cpu==$MLX_VERSION"
  rm -rf "$DEST/py"
  python3 -m pip download --quiet --no-deps --only-binary=:all: "mlx-cpu==$MLX_VERSION" -d "$DEST/dl"
  mkdir -p "$DEST/py"
  python3 -m zipfile -e "$DEST"/dl/mlx_cpu-"$MLX_VERSION"-*.whl "$DEST/py"
  touch "$DEST/py/.mlx-$MLX_VERSION"
fi

# 3. OpenBLAS in place of the wheel's reference BLAS (about 6x faster f32 matmul here).
if [ "${RMLX_OPENBLAS:-1}" = 1 ] && [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
  for lib in "$DEST"/py/mlx_cpu.libs/libblas-*.so.* "$DEST"/py/mlx_cpu.libs/liblapack-*.so.*; do
    [ -L "$lib" ] && continue
    mv "$lib" "$lib.reference"
    case "$lib" in
      *libblas-*) ln -s /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 "$lib" ;;
      *liblapack-*) ln -s /usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3 "$lib" ;;
    esac
  done
  log "using Debian OpenBLAS for MLX's BLAS"
fi

# 4. mlx-c sources from the pinned mlx-sys crate (fetched by cargo, unpacked here).
SRC=$DEST/src/mlx-sys-$MLXSYS_VERSION
if [ ! -d "$SRC/src/mlx-c" ]; then
  log "fetching mlx-sys $MLXSYS_VERSION for its mlx-c sources"
  tmp=$(mktemp -d)
  mkdir -p "$tmp/src" && echo 'fn main(){}' > "$tmp/src/main.rs"
  printf '[package]\nname="fetch-mlx-sys"\nversion="0.0.0"\nedition="2021"\n[dependencies]\nmlx-sys={version="=%s",default-features=false}\n' "$MLXSYS_VERSION" > "$tmp/Cargo.toml"
  (cd "$tmp" && cargo fetch --quiet)
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/mlx-sys-"$MLXSYS_VERSION".crate | head -n1)
  mkdir -p "$DEST/src"
  tar -xzf "$crate" -C "$DEST/src"
  rm -rf "$tmp"
fi
WORK=$DEST/build/mlx-c
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r "$SRC/src/mlx-c/." "$WORK/"
python3 "$ROOT/scripts/patch-mlx-c.py" "$WORK" "$PREFIX/include"

# 5. Build and install libmlxc.so beside libmlx.so.
log "building libmlxc.so (mlx-c $MLXSYS_VERSION against MLX $MLX_VERSION)"
cmake -S "$ROOT/kernels/mlxc" -B "$DEST/build/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DMLXC_SOURCE_DIR="$WORK" -DMLX_DIR="$PREFIX/share/cmake/MLX" \
  -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_LIBDIR=lib >"$DEST/build/cmake.log" 2>&1 \
  || { tail -n 40 "$DEST/build/cmake.log"; exit 1; }
cmake --build "$DEST/build/cmake" -j "$(nproc)" >>"$DEST/build/cmake.log" 2>&1 \
  || { grep -m 20 -B2 -A8 'error' "$DEST/build/cmake.log"; exit 1; }
cmake --install "$DEST/build/cmake" >>"$DEST/build/cmake.log" 2>&1
rm -f "$DEST"/stamp-*
touch "$STAMP"
log "MLX ready in $PREFIX"
