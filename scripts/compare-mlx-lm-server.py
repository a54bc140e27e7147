#!/usr/bin/env python3
"""rmlx serve vs mlx_lm.server on the same model directory, driven by the same
`rmlx bench --url` (same text prompts of exact token counts, greedy, EOS
suppressed with logit_bias so both generate the full length; the reports
carry the token counts each server actually produced).

For each server: start it on a free port, run concurrency levels (default 1
and 8) and the shared-prefix pair (default 2,000 tokens), stop it. Prints the
two side by side and saves both JSON reports and the table in --out.

  .venv-dev/bin/python scripts/compare-mlx-lm-server.py [--model DIR]
      [--rmlx target/release/rmlx] [-p 128] [-g 64] [--concurrency 1,8]
      [--shared-prefix 2000] [--out target/bench-compare] [--only rmlx|mlx-lm]

mlx_lm.server (0.32.2) takes only text prompts, has no ignore_eos, and batches
requests continuously when they carry no seed: --decode-concurrency 32 and
--prompt-concurrency 8 (its defaults, named here) let all 8 streams prefill
together and decode in one batch. rmlx serve runs with its defaults
(--max-running 16, --prefill-chunk 512, prefix cache on).
"""
import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain(stream, log):
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()


def wait_ready(proc, url, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def run_server(name, cmd, url, bench_args, out_dir):
    log = open(out_dir / f"{name}-server.log", "wb")
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=drain, args=(proc.stdout, log), daemon=True).start()
    try:
        wait_ready(proc, url)
        full = bench_args + ["--url", url, "--server-pid", str(proc.pid), "--json"]
        print(f"[{name}] {' '.join(full)}", file=sys.stderr)
        r = subprocess.run(full, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"rmlx bench against {name} failed:\n{r.stderr}")
        doc = json.loads(r.stdout)
        try:  # rmlx's counters (prefix-cache hits, step times) for the record
            with urllib.request.urlopen(url + "/metrics", timeout=10) as m:
                (out_dir / f"{name}-metrics.txt").write_bytes(m.read())
        except OSError:
            pass
        (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2))
        return doc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fmt(v, d=2):
    return "n/a" if v is None else f"{v:.{d}f}"


def table(docs):
    names = list(docs)
    rows = []
    head = ["metric"] + names
    levels = {n: {l["concurrency"]: l for l in docs[n]["levels"]} for n in names}
    concs = sorted({c for n in names for c in levels[n]})
    for c in concs:
        for key, label, d in [
            ("ttft_p50_s", "TTFT p50 s", 3),
            ("ttft_p95_s", "TTFT p95 s", 3),
            ("stream_decode_tps_mean", "decode tok/s per stream (mean)", 2),
            ("stream_decode_tps_min", "decode tok/s per stream (min)", 2),
            ("aggregate_decode_tps", "aggregate decode tok/s", 2),
            ("requests_per_s", "requests/s", 3),
        ]:
            rows.append([f"{c} streams: {label}"] + [fmt(levels[n].get(c, {}).get(key), d) for n in names])
        rows.append([f"{c} streams: tokens generated/expected"]
                    + [f"{levels[n][c]['generated_tokens']}/{levels[n][c]['expected_tokens']}" if c in levels[n] else "n/a" for n in names])
        rows.append([f"{c} streams: prompt tokens (server's count)"]
                    + [str(levels[n].get(c, {}).get("prompt_tokens_reported")) for n in names])
        rows.append([f"{c} streams: peak RSS MB"]
                    + [fmt((levels[n].get(c, {}).get("peak_rss_bytes") or 0) / 1e6 or None, 0) for n in names])
    for n in names:
        if docs[n].get("shared_prefix"):
            break
    else:
        n = None
    if n:
        for key, label, d in [("ttft_first_s", "TTFT first s", 3), ("ttft_second_s", "TTFT second s", 3), ("ratio", "second/first", 3)]:
            rows.append([f"shared prefix: {label}"] + [fmt((docs[m].get("shared_prefix") or {}).get(key), d) for m in names])
        rows.append(["shared prefix: prompt tokens"] + [str((docs[m].get("shared_prefix") or {}).get("prompt_tokens_reported")) for m in names])
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |",
             "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(r)) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the default model)")
    ap.add_argument("--rmlx", default=str(REPO / "target/release/rmlx"))
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--shared-prefix", type=int, default=2000)
    ap.add_argument("--out", default=str(REPO / "target/bench-compare"))
    ap.add_argument("--only", choices=["rmlx", "mlx-lm"])
    ap.add_argument("--rmlx-args", default="", help="extra `rmlx serve` arguments, e.g. '--dequantize'")
    a = ap.parse_args()
    model = a.model or subprocess.run(["bash", str(REPO / "scripts/default-model.sh"), a.rmlx],
                                      capture_output=True, text=True, check=True).stdout.strip()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = [a.rmlx, "bench", "--tokenizer", model, "-p", str(a.p), "-g", str(a.g), "--concurrency", a.concurrency]
    if a.shared_prefix:
        bench += ["--shared-prefix", str(a.shared_prefix)]
    docs = {}
    if a.only in (None, "rmlx"):
        port = free_port()
        docs["rmlx"] = run_server("rmlx", [a.rmlx, "serve", "--host", "127.0.0.1", "--port", str(port), "--model", model] + a.rmlx_args.split(),
                                  f"http://127.0.0.1:{port}", bench, out)
    if a.only in (None, "mlx-lm"):
        port = free_port()
        py = str(REPO / ".venv-dev/bin/python") if (REPO / ".venv-dev/bin/python").exists() else sys.executable
        docs["mlx_lm.server"] = run_server(
            "mlx-lm", [py, "-m", "mlx_lm.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                       "--decode-concurrency", "32", "--prompt-concurrency", "8", "--log-level", "WARNING"],
            f"http://127.0.0.1:{port}", bench + ["--model", "default_model"], out)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, model {model}, "
              f"prompt {a.p} tokens, generation {a.g}, shared prefix {a.shared_prefix}, load average {' '.join(load)}")
    text = header + "\n\n" + table(docs)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
