#!/usr/bin/env python3
"""Measures every KV-cache family on a real model for docs/KV_QUANT.md.

    python3 scripts/kv-quant-table.py --model DIR [--text FILE] [--families f32,q8,...]
        [--context 512] [--windows 2] [--gen-tokens 128] [--out FILE.json]

Runs only the rmlx binary (target/release/rmlx, else target/debug/rmlx):
- `rmlx eval ppl --baseline --json`: perplexity, its ratio to the dense
  family, mean next-token KL and top-1 agreement (teacher-forced over the
  text), and bytes per token measured from the pool's arrays;
- `rmlx bench --json` (in-process, random prompt of --bench-prompt tokens):
  decode tokens per second against the dense family, in the same run.
Prints one Markdown row per family (and a JSON file with --out), with the
machine, commit and date.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FAMILIES = "f32,fp8,q8,q4,q2,turbo4,turbo3,turbo2,turbo4q,planar4,planar3,iso4,iso3,rotor4,rotor3,q8/turbo4,q8/turbo3,q8/q4"


def rmlx(given=None):
    if given:
        return given
    for p in ("target/release/rmlx", "target/debug/rmlx"):
        if (ROOT / p).exists():
            return str(ROOT / p)
    sys.exit("build rmlx first (make build)")


def kv_flags(fam):
    if "/" in fam:
        k, v = fam.split("/")
        return ["--kv-cache-k", k, "--kv-cache-v", v]
    return ["--kv-cache", fam]


def run_json(args):
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--families", default=DEFAULT_FAMILIES)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--bench-prompt", type=int, default=512, help="prompt tokens before the timed decode")
    ap.add_argument("--out")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed bench")
    ap.add_argument("--rmlx", help="the rmlx binary (its plugins/ beside it) [default: target/release, else target/debug]")
    a = ap.parse_args()
    bin_ = rmlx(a.rmlx)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, MLX CPU backend"
    print(f"<!-- {Path(a.model).name}: {machine}; commit {commit}; {when}; text {a.text}, "
          f"{a.windows} windows of {a.context} tokens; decode {a.gen_tokens} tokens after a {a.bench_prompt}-token prompt -->")
    rows = []
    base_tps = None
    for fam in a.families.split(","):
        ev = run_json([bin_, "eval", "ppl", "-m", a.model, "--file", a.text, "--context", str(a.context),
                       "--max-windows", str(a.windows), "--baseline", "--json", *kv_flags(fam)])
        gen = {} if a.no_speed else run_json([bin_, "bench", "--model", a.model, "-p", str(a.bench_prompt), "-g", str(a.gen_tokens),
                        "-n", "2", "--json", *kv_flags(fam)])
        tps = gen.get("generation_tps")
        if fam in ("f32", "f16", "bf16") and tps:
            base_tps = tps
        row = {"family": fam, **{k: ev.get(k) for k in ("ppl", "baseline_ppl", "ppl_ratio", "kl", "top1_agreement", "kv_bytes_per_token", "error")},
               "generation_tps": tps, "gen_error": gen.get("error")}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| family | bytes/token | 4k ctx | 32k ctx | ppl | ppl ratio | mean KL | top-1 agree | decode tok/s | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            print(f"| `{r['family']}` | error: {r['error']} |||||||||")
            continue
        b = r["kv_bytes_per_token"] or 0
        tps = r["generation_tps"] or float("nan")
        rel = tps / base_tps if base_tps else float("nan")
        print(f"| `{r['family']}` | {b:,.0f} | {b * 4096 / 2**20:,.1f} MiB | {b * 32768 / 2**20:,.0f} MiB | "
              f"{r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | {tps:.1f} | {rel:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "machine": machine, "commit": commit, "date": when, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
