# System-package detection for the set-up scripts (sourced, not run).
# Every check takes the file-system root as $SYSROOT (default /), so that
# host/tests/setup_sysdeps.rs can run it against a fake /usr/lib tree.

# The libclang that bindgen (clang-sys, runtime loading) really opens:
# $LIBCLANG_PATH (a directory or the file itself) when set, else the first of
# libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.* in clang-sys's
# Linux directories. clang-sys skips libclang-cpp (a different library that
# Debian ships without libclang), so this does too. Prints the path found;
# returns 1 when there is none.
find_libclang() {
  local root=${SYSROOT:-} d f
  local dirs=()
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    if [ -f "$root$LIBCLANG_PATH" ]; then echo "$root$LIBCLANG_PATH"; return 0; fi
    dirs+=("$root$LIBCLANG_PATH")
  fi
  shopt -s nullglob
  dirs+=("$root"/usr/lib/llvm-*/lib "$root"/usr/local/llvm*/lib* "$root"/usr/local/lib*/*/* \
         "$root"/usr/local/lib*/* "$root"/usr/local/lib* "$root"/usr/lib*/*/* "$root"/usr/lib*/* "$root"/usr/lib*)
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang-*.so "$d"/libclang.so.* "$d"/libclang-*.so.*; do
      case "$(basename "$f")" in *-cpp.*) continue ;; esac
      if [ -e "$f" ]; then shopt -u nullglob; echo "$f"; return 0; fi
    done
  done
  shopt -u nullglob
  return 1
}

# The Debian packages the build still needs, one per line.
missing_packages() {
  local root=${SYSROOT:-}
  have_cmd() { [ -n "${SYSROOT:-}" ] && { [ -x "$root/usr/bin/$1" ]; return; }; command -v "$1" >/dev/null; }
  have_cmd cmake || echo cmake
  have_cmd c++ || echo g++
  find_libclang >/dev/null || echo libclang-dev
  if [ "${ARCH:-$(uname -m)}" = x86_64 ] && [ ! -e "$root/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3" ]; then
    echo libopenblas0-pthread
  fi
}
