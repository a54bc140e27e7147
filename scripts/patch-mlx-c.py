#!/usr/bin/env python3
"""Adapts mlx-c 0.7's sources (a scratch copy) to build on Linux against MLX 0.32.3+.

1. mlx/c/half.h: upstream defines float16_t/bfloat16_t only on ARM; rmlx's
   replacement (kernels/mlxc/half.h) also defines them on x86-64.
2. mlx/c/ops.cpp: MLX 0.32.3 added `global_scale` to gather_qmm before
   `sorted_indices`; pass std::nullopt for it when the installed header has it.
Usage: patch-mlx-c.py MLX_C_DIR MLX_INCLUDE_DIR
"""
import pathlib
import re
import shutil
import sys

src, include = map(pathlib.Path, sys.argv[1:3])
root = pathlib.Path(__file__).resolve().parent.parent
shutil.copy(root / "kernels/mlxc/half.h", src / "mlx/c/half.h")

ops_h = (include / "mlx/ops.h").read_text()
decl = ops_h[ops_h.index("array gather_qmm("):]
decl = decl[: decl.index(";")]
if "global_scale" in decl:
    ops = src / "mlx/c/ops.cpp"
    text = ops.read_text()
    start = text.index('extern "C" int mlx_gather_qmm(')
    end = text.index('extern "C"', start + 10)
    body = text[start:end]
    new, n = re.subn(r"std::string\(mode\),(\s*)sorted_indices,",
                     r"std::string(mode),\1std::nullopt,\1sorted_indices,", body)
    if n != 1:
        sys.exit("patch-mlx-c: gather_qmm call not found in mlx/c/ops.cpp")
    ops.write_text(text[:start] + new + text[end:])
print("patch-mlx-c: patched", src)
