#!/usr/bin/env python3
"""Soak test: many concurrent streaming clients against one `rmlx serve`.

Starts `rmlx serve` on a loopback port with the given model, takes a greedy
(temperature 0) reference completion for each of a few prompts, then runs
CLIENTS concurrent streaming clients for DURATION seconds. A third of the
clients (the "droppers") close their connection at a random point of some
streams. Afterwards it checks and prints:

- every stream that completed is whole: it ended with a finish_reason and
  `[DONE]`, and its text equals the reference completion for its prompt;
- the KV gauges in /metrics return to idle: no blocks held by sequences
  (`rmlx_kv_blocks_used` 0) and no running or queued sequences;
- resident memory (VmRSS of the server) is flat after warm-up: the mean of
  the last tenth of the samples is within 10% of the first post-warm-up tenth.

Bounded in count and time, loopback only; exits non-zero if a check fails.

    scripts/soak.py --rmlx target/release/rmlx --model ~/.cache/rmlx/models/SmolLM2-135M-Instruct \
        --clients 64 --duration 600
"""
import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Name a colour of the rainbow.",
    "What is 12 times 12?",
    "Say hello in Spanish.",
    "Give me a synonym for happy.",
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def body(prompt, max_tokens, stream):
    return json.dumps({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })


HEADERS = {"content-type": "application/json"}


def complete(port, prompt, max_tokens):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/chat/completions", body(prompt, max_tokens, False), HEADERS)
    r = c.getresponse()
    data = json.loads(r.read())
    c.close()
    if r.status != 200:
        raise RuntimeError(f"reference request failed: {r.status} {data}")
    return data["choices"][0]["message"]["content"]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.completed = 0
        self.dropped = 0
        self.bad = []
        self.errors = []
        self.tokens = 0

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                if isinstance(v, list):
                    getattr(self, k).extend(v)
                else:
                    setattr(self, k, getattr(self, k) + v)


def stream_once(port, prompt, max_tokens, drop_after, stats, refs):
    """One streaming request; drop_after: close after that many chunks (None: read to the end)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request("POST", "/v1/chat/completions", body(prompt, max_tokens, True), HEADERS)
        r = c.getresponse()
        if r.status != 200:
            stats.add(errors=[f"status {r.status}: {r.read()[:200]!r}"])
            return
        text, finish, done, chunks = "", None, False, 0
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            ev = json.loads(payload)
            for ch in ev.get("choices", []):
                text += ch.get("delta", {}).get("content") or ""
                finish = ch.get("finish_reason") or finish
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                # Go away mid-stream: the server must cancel and free the sequence.
                c.sock.shutdown(socket.SHUT_RDWR)
                c.close()
                stats.add(dropped=1)
                return
        if not done or finish is None:
            stats.add(bad=[f"{prompt!r}: stream ended without finish/[DONE] (finish={finish}, done={done})"])
        elif text != refs[prompt]:
            stats.add(bad=[f"{prompt!r}: text differs from the reference: {text!r} vs {refs[prompt]!r}"])
        else:
            stats.add(completed=1, tokens=chunks)
    except (OSError, http.client.HTTPException) as e:
        stats.add(errors=[f"{type(e).__name__}: {e}"])
    finally:
        c.close()


def client(i, port, until, max_tokens, stats, refs, dropper, seed):
    rng = random.Random(seed + i)
    while time.time() < until:
        prompt = rng.choice(PROMPTS)
        drop = rng.randint(1, max(2, max_tokens // 2)) if dropper and rng.random() < 0.5 else None
        stream_once(port, prompt, max_tokens, drop, stats, refs)


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(rmlx_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    global MODEL_ID
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rmlx", default="target/release/rmlx")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts (default: a fifth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    ap.add_argument("serve_args", nargs="*", help="extra arguments for rmlx serve (after --)")
    a = ap.parse_args()
    MODEL_ID = os.path.basename(os.path.normpath(a.model))
    port = free_port()
    cmd = [a.rmlx, "serve", "--model", a.model, "--port", str(port), "--no-metrics-db",
           "--max-queue-depth", str(4 * a.clients)] + a.serve_args
    log = open(f"/tmp/rmlx-soak-{port}.log", "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if srv.poll() is not None:
                    sys.exit(f"rmlx serve exited: see {log.name}")
                time.sleep(0.5)
        refs = {p: complete(port, p, a.max_tokens) for p in PROMPTS}
        stats = Stats()
        t0 = time.time()
        until = t0 + a.duration
        threads = [threading.Thread(target=client, args=(i, port, until, a.max_tokens, stats, refs, i % 3 == 0, a.seed))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):
            samples.append((time.time() - t0, rss_kb(srv.pid)))
            time.sleep(min(5.0, max(0.5, a.duration / 120)))
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        # Idle again: wait for cancelled sequences to be reaped.
        m = {}
        for _ in range(60):
            m = metrics(port)
            if m.get("rmlx_kv_blocks_used", 0) == 0 and m.get("rmlx_running_sequences", 0) == 0 \
                    and m.get("rmlx_queue_depth", 0) == 0:
                break
            time.sleep(0.5)
        warm = a.warmup if a.warmup is not None else a.duration / 5
        post = [kb for (t, kb) in samples if t >= warm] or [kb for (_, kb) in samples]
        k = max(1, len(post) // 10)
        first, last = sum(post[:k]) / k, sum(post[-k:]) / k
        growth = (last - first) / first if first else 0.0
        fig = {
            "clients": a.clients, "droppers": len(range(0, a.clients, 3)), "seconds": round(elapsed, 1),
            "completed": stats.completed, "dropped": stats.dropped, "bad": len(stats.bad), "errors": len(stats.errors),
            "completed_per_s": round(stats.completed / elapsed, 2),
            "kv_blocks_used_after": m.get("rmlx_kv_blocks_used"), "running_after": m.get("rmlx_running_sequences"),
            "queue_after": m.get("rmlx_queue_depth"), "kv_blocks_cached_after": m.get("rmlx_kv_blocks_cached"),
            "rss_mb_first": round(first / 1024, 1), "rss_mb_last": round(last / 1024, 1),
            "rss_mb_max": round(max(post) / 1024, 1), "rss_growth_pct": round(100 * growth, 1),
        }
        for b in stats.bad[:10]:
            print("BAD", b)
        for e in stats.errors[:10]:
            print("ERROR", e)
        for k2, v in fig.items():
            print(f"{k2:24} {v}")
        if a.json:
            print(json.dumps(fig))
        ok = (stats.completed > 0 and not stats.bad and not stats.errors and fig["kv_blocks_used_after"] == 0
              and fig["running_after"] == 0 and abs(growth) <= 0.10 and srv.poll() is None)
        print("soak:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    sys.exit(main())
