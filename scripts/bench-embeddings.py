#!/usr/bin/env python3
"""Embedding throughput of `rmlx serve`: sentences/sec at several concurrencies.

    python3 scripts/bench-embeddings.py [--rmlx target/debug/rmlx] [--model DIR]
        [--concurrency 1,8] [--requests 400] [--no-merge]

Starts `rmlx serve` on a free port with the model (default: all-MiniLM-L6-v2 as
`scripts/real-models.sh all-minilm-l6-v2` caches it), then for each concurrency
C runs C client threads that send one-sentence POST /v1/embeddings requests
(the 50 sentences of tests/fixtures/real/minilm-embeddings.json.gz, cycled)
until --requests are done, and prints sentences/sec and the server's
rmlx_embedding_batch_requests figures (requests per engine run). --no-merge
starts the server with RMLX_EMBED_MERGE=0 (each request runs alone) for
comparison. Standard library only; a dev tool, not part of the product.
"""
import argparse
import gzip
import json
import os
import re
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


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def metric(base, name):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    out = {}
    for suffix in ("count", "sum"):
        m = re.search(rf"^{name}_{suffix}{{[^}}]*}} (\S+)$", text, re.M)
        out[suffix] = float(m.group(1)) if m else 0.0
    return out


def run(base, model, sentences, conc, total):
    lock = threading.Lock()
    next_i = [0]
    errors = []

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            try:
                r = post(f"{base}/v1/embeddings", {"model": model, "input": sentences[i % len(sentences)]})
                assert len(r["data"]) == 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return total / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rmlx", default=str(REPO / "target/debug/rmlx"))
    ap.add_argument("--model", default=None, help="model directory (default: the cached all-MiniLM-L6-v2)")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    ap.add_argument("--no-merge", action="store_true", help="RMLX_EMBED_MERGE=0: no batching across requests")
    a = ap.parse_args()
    model_dir = a.model or subprocess.run(
        ["bash", str(REPO / "scripts/real-models.sh"), "all-minilm-l6-v2"], check=True, capture_output=True, text=True
    ).stdout.strip()
    ref = json.loads(gzip.open(REPO / "tests/fixtures/real/minilm-embeddings.json.gz").read())
    sentences = ref["sentences"]
    port = free_port()
    env = dict(os.environ)
    if a.no_merge:
        env["RMLX_EMBED_MERGE"] = "0"
    srv = subprocess.Popen(
        [a.rmlx, "serve", "--port", str(port), "--model", f"emb={model_dir}", "--preload", "emb", "--max-queue-depth", "256"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if srv.poll() is not None:
                    sys.exit("rmlx serve exited at start")
                time.sleep(0.1)
        run(base, "emb", sentences, 1, 20)  # warm-up
        print(f"model {model_dir}, {a.requests} one-sentence requests per level, merge {'off' if a.no_merge else 'on'}")
        for conc in [int(c) for c in a.concurrency.split(",")]:
            before = metric(base, "rmlx_embedding_batch_requests")
            sps = run(base, "emb", sentences, conc, a.requests)
            after = metric(base, "rmlx_embedding_batch_requests")
            runs = after["count"] - before["count"]
            per_run = (after["sum"] - before["sum"]) / runs if runs else 0.0
            print(f"concurrency {conc}: {sps:.1f} sentences/s ({per_run:.2f} requests per engine run)")
    finally:
        srv.terminate()
        srv.wait(timeout=30)


if __name__ == "__main__":
    main()
