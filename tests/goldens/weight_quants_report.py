#!/usr/bin/env python3
"""The numbers in docs/WEIGHT_QUANTS.md: for each weight format, SmolLM2-135M
converted by `rmlx convert`, its size, bits per weight, quality (mean KL of
the next-token distributions against the unquantized model over a fixed
text) and rmlx's decode speed.

Usage: weight_quants_report.py RMLX_BIN SOURCE_MODEL_DIR WORK_DIR

The reference is SOURCE dequantized to float16 by `rmlx convert --quant f16`
(the default model comes from a Q4_1 GGUF, so there is no better original on
this machine); every other format is re-quantized from that reference. KL is
computed by mlx-lm on the converted files, twice: with the model as stored
(float16 activations) and with every floating parameter, scales and biases
included, cast to float32 (the same weights, float32 compute). Decode speed
is `rmlx bench`, by default prompt 32, 32 generated tokens, 1 trial after
the warm-up (set RMLX_REPORT_BENCH to other `rmlx bench` arguments, or to 0 to
skip it: on a loaded 2-core machine it dominates the run). With
RMLX_REPORT_BENCH_FROM=MODEL.gguf the speed is measured on that GGUF converted
by `rmlx convert --from-gguf` with the row's arguments (the files users get:
float32 norms, so float32 activations) instead of on the re-quantized f16
reference, whose float16 norms keep activations float16 (MLX's CPU affine
`quantized_matmul` is very slow there). Prints the machine,
the date and a Markdown table. RMLX_REPORT_FORMATS="label,label" measures only those rows (in
that order; the reference is always made).
"""
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when "
    "Johannes Gutenberg combined movable metal type, oil-based inks and a "
    "screw press adapted from wine making. Books became cheaper, literacy "
    "spread, and ideas travelled faster than ever before. Scientists could "
    "share their results, reformers their pamphlets, and merchants their "
    "price lists. Within fifty years, presses operated in more than two "
    "hundred cities across Europe, and millions of volumes had been printed. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)

FORMATS = [
    # (label, rmlx convert arguments)
    ("f16 (reference)", ["--quant", "f16"]),
    ("bf16", ["--quant", "bf16"]),
    ("affine q8 g64", ["--quant", "q8"]),
    ("affine q6 g64", ["--quant", "q6"]),
    ("affine q4 g64", ["--quant", "q4"]),
    ("affine q4 g32", ["--quant", "q4:32"]),
    ("affine q3 g64", ["--quant", "q3"]),
    ("mxfp8", ["--quant", "mxfp8"]),
    ("mxfp4", ["--quant", "mxfp4"]),
    ("nvfp4", ["--quant", "nvfp4"]),
    ("mixed q4 + q8 embed + q6 v/down", ["--quant", "q4", "--layer", "embed_tokens=q8",
                                         "--layer", "v_proj=q6", "--layer", "down_proj=q6"]),
]


def logprobs(model, tokens, f32):
    if f32:
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    lg = model(mx.array(tokens)[None])[0].astype(mx.float32)
    return lg - mx.logsumexp(lg, axis=-1, keepdims=True)


BENCH = os.environ.get("RMLX_REPORT_BENCH", "-p 32 -g 32 -n 1").split()
BENCH_FROM = os.environ.get("RMLX_REPORT_BENCH_FROM")


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    rmlx, src, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    dirs = {}
    ref_dir = work / "f16"
    only = [x.strip() for x in os.environ.get("RMLX_REPORT_FORMATS", "").split(",") if x.strip()]
    formats = [f for f in FORMATS if f[0].startswith("f16")]
    formats += [f for label in only for f in FORMATS if f[0] == label and not label.startswith("f16")] if only \
        else [f for f in FORMATS if not f[0].startswith("f16")]
    for label, args in formats:
        name = "-".join(label.replace("(", "").replace(")", "").replace("+", "").replace("/", " ").split())
        d = work / name
        base = src if label.startswith("f16") else ref_dir
        if not d.exists():
            subprocess.run([rmlx, "convert", "--quiet", "--model", str(base), "--output", str(d), *args], check=True)
        if label.startswith("f16"):
            ref_dir = d
        dirs[label] = d
    _, tok = load(str(ref_dir))
    tokens = tok.encode(TEXT)
    refs = {}
    for f32 in (False, True):
        m, _ = load(str(ref_dir))
        refs[f32] = logprobs(m, tokens, f32)
    rows = []
    for label, d in dirs.items():
        size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        m, _ = load(str(d))
        n_params = 0
        for _, mod in m.named_modules():
            if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                n_params += mod.weight.shape[0] * mod.weight.shape[1] * 32 // mod.bits
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                n_params += mod.weight.size
        lin_bytes = sum(v.nbytes for k, v in tree_flatten(m.parameters()) if "norm" not in k)
        kls = []
        for f32 in (False, True):
            lp = logprobs(m, tokens, f32)
            ref = refs[f32]
            kl = (mx.exp(ref) * (ref - lp)).sum(axis=-1).mean().item()
            kls.append(kl)
            if not f32:
                m, _ = load(str(d))
        if BENCH == ["0"]:
            tps, b = None, {}
        else:
            bd = d
            if BENCH_FROM:
                bd = work / f"gguf-{d.name}"
                if not bd.exists():
                    subprocess.run([rmlx, "convert", "--quiet", "--from-gguf", "--model", BENCH_FROM,
                                    "--output", str(bd), *dict(formats)[label]], check=True)
            bench = subprocess.run([rmlx, "bench", "--model", str(bd), *BENCH, "--json"],
                                   check=True, capture_output=True, text=True).stdout
            b = json.loads(bench.strip().splitlines()[-1])
            tps = b.get("generation_tps")
        print(f"| {label} | {lin_bytes * 8 / n_params:.3f} | {size / 2**20:.1f} | {kls[0]:.5f} | {kls[1]:.5f} | {tps} |",
              file=sys.stderr, flush=True)
        rows.append((label, lin_bytes * 8 / n_params, size / 2**20, kls[0], kls[1], tps, b))
    print(f"{datetime.date.today().isoformat()}, {cpu_name()} ({os.cpu_count()} cores), "
          f"{platform.system()} {platform.machine()}, mlx {mx.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"text: {len(tokens)} tokens, bench: {' '.join(BENCH)}\n")
    print("| format | bits/weight (Linear+Embedding) | weights MiB | mean KL, f16 compute | mean KL, f32 compute | rmlx decode tok/s |")
    print("|---|---|---|---|---|---|")
    for label, bpw, mib, k16, k32, tps, b in rows:
        t = f"{tps:.1f}" if isinstance(tps, (int, float)) else "–"
        print(f"| {label} | {bpw:.3f} | {mib:.1f} | {k16:.5f} | {k32:.5f} | {t} |")


if __name__ == "__main__":
    main()
