#!/usr/bin/env python3
"""Long-context KV memory and multi-turn prefix reuse, measured through `rmlx serve`.

Dev script (stdlib only; run by scripts/long-context-kv.sh, which builds nothing).

  kv     MODEL_DIR N [N ...]   one server per context length N: a prompt of N token
         ids + GEN generated tokens (N + GEN within the model's positions); polls /metrics while it runs and prints the
         most blocks each layer group held (rmlx_kv_group_blocks_used), the most
         bytes charged to the KV budget (rmlx_kv_used_bytes), the most MLX memory in use between
         steps, what every layer
         keeping every block would hold (full-group blocks x the bytes of a block
         in every layer), MLX's peak memory and the process's peak RSS (VmHWM).
  chat   MODEL_DIR             a 4-turn conversation, token ids, growing context
         (turn k's prompt = turn k-1's prompt + its answer + a new user message),
         once with the prefix cache and once without (--no-prefix-cache): per turn
         the prompt tokens, the hit tokens (rmlx_prefix_cache_hit_tokens_total),
         the tokens prefilled and the TTFT (first streamed token, client side).

Environment: RMLX (binary, default target/debug/rmlx), PORT (default 18552),
GEN (generated tokens, default 4), VOCAB (token ids drawn below it, default
30000; the hybrid fixtures need 256), TURN (tokens a user turn adds, default
1024), FIRST (first turn's tokens, default TURN), BUDGET (default 8GB),
SERVE_ARGS (more `rmlx serve` flags), AB=1 (kv: also run each N with
RMLX_KV_WINDOW_GROUPS=0, every layer keeping every block, and compare outputs),
CACHE=1 (kv: prefix cache on, as `rmlx serve` defaults; off otherwise).
Output: one JSON object per measurement on stdout, progress on stderr.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

RMLX = os.environ.get("RMLX", "target/debug/rmlx")
PORT = int(os.environ.get("PORT", "18552"))
GEN = int(os.environ.get("GEN", "4"))
VOCAB = int(os.environ.get("VOCAB", "30000"))
BUDGET = os.environ.get("BUDGET", "8GB")
URL = f"http://127.0.0.1:{PORT}"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ids(n, k):
    """n token ids, varied by k; BOS (2) first for k == 0 only (Gemma's)."""
    lo = 100 if VOCAB > 1000 else 3
    return [((i * 7919 + 13 + k * 104729) % (VOCAB - lo)) + lo for i in range(n)]


class Server:
    def __init__(self, model_dir, extra=(), env=None):
        args = [RMLX, "serve", "--model", f"m={model_dir}", "--port", str(PORT), "--no-metrics-db",
                "--kv-budget", BUDGET, *extra, *os.environ.get("SERVE_ARGS", "").split()]
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(args, env=e, stdout=subprocess.DEVNULL, stderr=open("/tmp/long-context-kv.serve.log", "a"))
        for _ in range(600):
            try:
                urllib.request.urlopen(URL + "/health", timeout=2).read()
                return
            except Exception:
                if self.p.poll() is not None:
                    raise SystemExit(f"rmlx serve exited ({self.p.returncode}); see /tmp/long-context-kv.serve.log")
                time.sleep(0.2)
        raise SystemExit("rmlx serve did not come up")

    def hwm(self):
        """Peak resident set of the server process (bytes)."""
        for line in open(f"/proc/{self.p.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def metrics():
    text = urllib.request.urlopen(URL + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.match(r'^(\w+)(?:\{(.*)\})?\s+(\S+)$', line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def get(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(prompt, max_tokens):
    """Streams a completion; returns (token ids, TTFT s, total s)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    req = urllib.request.Request(URL + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.time()
    ttft, out = None, []
    try:
        r = urllib.request.urlopen(req, timeout=3600)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"HTTP {e.code}: {e.read().decode()[:500]}")
    with r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            for ch in ev.get("choices", []):
                got = ch.get("token_ids") or []
                if (got or ch.get("text")) and ttft is None:
                    ttft = time.time() - t0
                out.extend(got)
    return out, ttft, time.time() - t0


def kv(model_dir, ns):
    ab = os.environ.get("AB") == "1"
    for n in ns:
        runs = [("1", None)] + ([("0", None)] if ab else [])
        outs = {}
        for split, _ in runs:
            cache = os.environ.get("CACHE") == "1"
            srv = Server(model_dir, [] if cache else ["--no-prefix-cache"], {"RMLX_KV_WINDOW_GROUPS": split})
            peak = {"full": 0, "window": 0, "used_bytes": 0, "active": 0, "last": None}
            done = threading.Event()

            def poll():
                while not done.is_set():
                    try:
                        m = metrics()
                    except Exception:
                        time.sleep(0.2)
                        continue
                    for g in ("full", "window"):
                        peak[g] = max(peak[g], get(m, "rmlx_kv_group_blocks_used", model="m", group=g))
                    peak["used_bytes"] = max(peak["used_bytes"], get(m, "rmlx_kv_used_bytes"))
                    peak["active"] = max(peak["active"], get(m, "rmlx_memory_active_bytes"))
                    if get(m, "rmlx_running_sequences"):
                        # The last sample while the sequence runs (decoding, once prefilled).
                        peak["last"] = [int(get(m, "rmlx_kv_group_blocks_used", model="m", group=g)) for g in ("full", "window")] + [int(get(m, "rmlx_kv_used_bytes"))]
                    time.sleep(0.2)

            th = threading.Thread(target=poll)
            th.start()
            log(f"[kv] N={n} window groups={split} ...")
            try:
                toks, ttft, total = complete([2] + ids(n - 1, 0), GEN)
            finally:
                done.set()
                th.join()
                if sys.exc_info()[0] is not None:
                    srv.stop()
            m = metrics()
            fb = get(m, "rmlx_kv_group_block_bytes", model="m", group="full")
            wb = get(m, "rmlx_kv_group_block_bytes", model="m", group="window")
            rec = {
                "what": "kv", "tokens": n, "generated": len(toks), "window_groups": split == "1", "prefix_cache": cache,
                "prefill_s": round(ttft, 1), "total_s": round(total, 1),
                "full_blocks_max": int(peak["full"]), "window_blocks_max": int(peak["window"]),
                "full_block_bytes": int(fb), "window_block_bytes": int(wb),
                "kv_used_bytes_max": int(peak["used_bytes"]),
                "last_sample_full_window_bytes": peak["last"],
                "every_layer_every_block_bytes": int(peak["full"] * (fb + wb)),
                # MLX's peak is set while the model loads (1.5 GiB for Gemma-3-270M),
                # so the most memory in use while the request ran is polled too.
                "mlx_active_max_bytes": int(peak["active"]),
                "mlx_peak_bytes": int(get(m, "rmlx_memory_peak_bytes")),
                "process_peak_rss_bytes": srv.hwm(),
                "load": os.getloadavg()[0],
            }
            outs[split] = toks
            srv.stop()
            print(json.dumps(rec), flush=True)
        if ab:
            print(json.dumps({"what": "kv-ab", "tokens": n, "same_output": outs["1"] == outs["0"]}), flush=True)


def chat(model_dir):
    turn = int(os.environ.get("TURN", "1024"))
    first = int(os.environ.get("FIRST", str(turn)))
    for cache in (True, False):
        srv = Server(model_dir, [] if cache else ["--no-prefix-cache"])
        prompt = ([2] if VOCAB > 1000 else []) + ids(first, 1)
        for k in range(4):
            before = metrics()
            toks, ttft, total = complete(prompt, GEN)
            after = metrics()
            hit = get(after, "rmlx_prefix_cache_hit_tokens_total", model="m") - get(before, "rmlx_prefix_cache_hit_tokens_total", model="m")
            print(json.dumps({
                "what": "chat", "prefix_cache": cache, "turn": k + 1, "prompt_tokens": len(prompt),
                "hit_tokens": int(hit), "prefilled_tokens": len(prompt) - int(hit),
                "ttft_s": round(ttft, 3), "total_s": round(total, 3), "answer": toks,
                # After the turn: blocks the prefix cache keeps per group, bytes charged.
                "cached_full_window": [int(get(after, "rmlx_kv_group_blocks_cached", model="m", group=g)) for g in ("full", "window")],
                "kv_used_bytes": int(get(after, "rmlx_kv_used_bytes")),
                "load": os.getloadavg()[0],
            }), flush=True)
            prompt = prompt + toks + ids(turn, k + 2)
        srv.stop()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("kv", "chat"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "kv":
        kv(sys.argv[2], [int(x) for x in sys.argv[3:]] or [2048])
    else:
        chat(sys.argv[2])
