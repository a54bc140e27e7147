"""Helper for scripts/spec-real-pair.sh (dev only; needs .venv-dev's mlx-lm 0.32.2).

  spec_real_pair.py prompts                      # the prompts, one JSON object a line
  spec_real_pair.py mlx MODEL [DRAFT K] N        # mlx-lm on every prompt (stdin: prompts), JSON lines out
  spec_real_pair.py serve URL MODEL N K|0        # 8 concurrent chat requests to `rmlx serve`
  spec_real_pair.py table DIR                    # the summary table from DIR's results

mlx-lm runs in-process (`stream_generate`, the same code as `mlx_lm generate
--draft-model`), so both models load once for all prompts. Its response marks
each token `from_draft`; a round is a run of drafted tokens and one token of
the verifier, and drafts min(K, tokens left) (speculative_generate_step), which
gives the drafted count.
"""
import json
import sys
import time

CODE = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Rust function that reverses a singly linked list.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that returns the ten customers with the highest total order amount.",
]
CHAT = [
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is to a beginner.",
    "Give me three tips for writing clear commit messages.",
    "Why is the sky blue?",
]


def prompts():
    for i, p in enumerate(CODE):
        print(json.dumps({"id": f"code{i}", "kind": "code", "prompt": p}))
    for i, p in enumerate(CHAT):
        print(json.dumps({"id": f"chat{i}", "kind": "chat", "prompt": p}))


def mlx(args):
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model_path, n = args[0], int(args[-1])
    draft_path, k = (args[1], int(args[2])) if len(args) == 4 else (None, 0)
    import os

    import mlx.core as mx

    model, tok = load(model_path)
    draft = None
    if draft_path:
        draft, dtok = load(draft_path)
        if dtok.vocab_size != tok.vocab_size:
            sys.exit("draft tokenizer does not match")
    if os.environ.get("MLX_DTYPE", "float32") == "float32":
        # rmlx's CPU default; MLX's CPU float16 matmuls are far slower
        for m in (model, draft):
            if m is not None:
                m.set_dtype(mx.float32)
    sampler = make_sampler(0.0)
    for line in sys.stdin:
        p = json.loads(line)
        text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        kw = {"draft_model": draft, "num_draft_tokens": k} if draft is not None else {}
        tokens, flags, last = [], [], None
        for r in stream_generate(model, tok, ids, max_tokens=n, sampler=sampler, **kw):
            last = r
            tokens.append(r.token)
            flags.append(bool(r.from_draft))
        # stream_generate yields the EOS token's response too (text ""): it is
        # not part of the output; rmlx's --json leaves it out as well.
        if last.finish_reason == "stop" and tokens and tokens[-1] in tok.eos_token_ids:
            tokens.pop()
            flags.pop()
            eos_flag = True
        else:
            eos_flag = False
        drafted = accepted = 0
        if draft is not None:
            ntoks, start = 0, True
            for f in flags + ([False] if eos_flag else []):
                if start:
                    drafted += min(k, n - ntoks)
                    start = False
                if f:
                    accepted += 1
                else:
                    start = True
                ntoks += 1
        print(json.dumps({
            "id": p["id"], "kind": p["kind"], "tokens": tokens,
            "generation_tps": last.generation_tps, "prompt_tps": last.prompt_tps,
            "drafted_tokens": drafted, "accepted_tokens": accepted,
            "finish_reason": last.finish_reason,
        }), flush=True)


def serve(args):
    """8 concurrent chat requests (the 8 prompts); aggregate generated tokens / wall time."""
    import threading
    import urllib.request

    url, model, n, k = args[0], args[1], int(args[2]), int(args[3])
    ps = [json.loads(l) for l in sys.stdin]
    out = [None] * len(ps)

    def one(i, p):
        body = {"model": model, "messages": [{"role": "user", "content": p["prompt"]}],
                "max_tokens": n, "temperature": 0, "num_draft_tokens": k}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            out[i] = json.loads(r.read())

    t0 = time.time()
    th = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(ps)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.time() - t0
    toks = sum(o["usage"]["completion_tokens"] for o in out)
    texts = {p["id"]: o["choices"][0]["message"]["content"] for p, o in zip(ps, out)}
    print(json.dumps({"streams": len(ps), "k": k, "completion_tokens": toks, "wall_s": wall,
                      "aggregate_tps": toks / wall, "texts": texts,
                      "usage": [o["usage"] for o in out]}))


def load_lines(path):
    try:
        with open(path) as f:
            return {r["id"]: r for r in (json.loads(l) for l in f if l.strip())}
    except FileNotFoundError:
        return None


def table(args):
    import os

    d = args[0]
    runs = [
        ("rmlx", "none", "rmlx-base.jsonl"),
        ("rmlx", "K (adaptive from K)", "rmlx-k.jsonl"),
        ("rmlx", "default (adaptive from 3)", "rmlx-default.jsonl"),
        ("mlx-lm", "none", "mlx-base.jsonl"),
        ("mlx-lm", "K (fixed)", "mlx-k.jsonl"),
    ]
    res = {f: load_lines(os.path.join(d, f)) for _, _, f in runs}
    # tokens/round: generated tokens per verifier forward (each round emits
    # its kept drafts and one token of the verifier), hardware-independent
    print(f"{'engine':7} {'drafter':26} {'prompts':7} {'accepted/drafted':>17} {'rate':>6} {'tok/round':>9} {'tok/s':>7} {'speed-up':>8}")
    for kind in ("code", "chat", "all"):
        base_tps = {}
        for eng, label, f in runs:
            r = res[f]
            if r is None:
                continue
            rows = [v for v in r.values() if kind == "all" or v["kind"] == kind]
            if not rows:
                continue
            dr = sum(v.get("drafted_tokens") or 0 for v in rows)
            ac = sum(v.get("accepted_tokens") or 0 for v in rows)
            # tok/s: mean of the per-prompt generation rates
            tps = sum(v["generation_tps"] for v in rows) / len(rows)
            if label == "none":
                base_tps[eng] = tps
            rate = f"{ac / dr:.2f}" if dr else "-"
            ntok = sum(len(v["tokens"]) for v in rows)
            rounds = ntok - ac
            tpr = f"{ntok / rounds:.2f}" if dr and rounds else "1.00"
            ad = f"{ac}/{dr}" if dr else "-"
            su = f"{tps / base_tps[eng]:.2f}x" if eng in base_tps else "-"
            print(f"{eng:7} {label:26} {kind:7} {ad:>17} {rate:>6} {tpr:>9} {tps:7.2f} {su:>8}")
    print()
    # per prompt, the drafted runs side by side (tokens per verifier forward)
    a, b = res["rmlx-k.jsonl"], res["mlx-k.jsonl"]
    if a and b:
        print(f"{'prompt':7} {'rmlx acc/drafted':>17} {'tok/round':>9} {'mlx-lm acc/drafted':>19} {'tok/round':>9}")
        for i in a:
            if i not in b:
                continue
            row = []
            for v in (a[i], b[i]):
                n, ac, dr = len(v["tokens"]), v["accepted_tokens"], v["drafted_tokens"]
                row += [f"{ac}/{dr}", f"{n / max(n - ac, 1):.2f}"]
            print(f"{i:7} {row[0]:>17} {row[1]:>9} {row[2]:>19} {row[3]:>9}")
        print()

    def same(a, b):
        if not res[a] or not res[b]:
            return None
        common = [i for i in res[a] if i in res[b]]
        return common, [i for i in common if res[a][i]["tokens"] != res[b][i]["tokens"]]

    checks = [
        ("rmlx greedy == rmlx --draft-model K (lossless)", "rmlx-base.jsonl", "rmlx-k.jsonl", True),
        ("rmlx greedy == rmlx --draft-model default K (lossless)", "rmlx-base.jsonl", "rmlx-default.jsonl", True),
        ("mlx-lm greedy == mlx-lm --draft-model K", "mlx-base.jsonl", "mlx-k.jsonl", False),
        ("rmlx greedy == mlx-lm greedy", "rmlx-base.jsonl", "mlx-base.jsonl", False),
        ("rmlx greedy == mlx-lm --draft-model K", "rmlx-base.jsonl", "mlx-k.jsonl", False),
    ]
    bad = False
    for name, a, b, must in checks:
        got = same(a, b)
        if got is None:
            print(f"{name}: not run")
            continue
        common, diff = got
        if diff:
            # where the first difference is, per prompt
            where = []
            for i in diff:
                x, y = res[a][i]["tokens"], res[b][i]["tokens"]
                j = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), min(len(x), len(y)))
                where.append(f"{i}@{j}")
            print(f"{name}: DIFFERS on {len(diff)}/{len(common)} prompts (first differing token: {', '.join(where)})")
            bad = bad or must
        else:
            print(f"{name}: identical on {len(common)} prompts")
    for f in ("serve-base.json", "serve-spec.json"):
        p = os.path.join(d, f)
        if os.path.exists(p):
            s = json.load(open(p))
            extra = ""
            u = s["usage"]
            dr = sum((x.get("drafted_tokens") or 0) for x in u)
            ac = sum((x.get("accepted_tokens") or 0) for x in u)
            if dr:
                extra = f", accepted/drafted {ac}/{dr} = {ac / dr:.2f}"
            print(f"rmlx serve, {s['streams']} streams, num_draft_tokens {s['k']}: {s['completion_tokens']} tokens in "
                  f"{s['wall_s']:.1f} s = {s['aggregate_tps']:.2f} tok/s aggregate{extra}")
    a, b = os.path.join(d, "serve-base.json"), os.path.join(d, "serve-spec.json")
    if os.path.exists(a) and os.path.exists(b):
        sa, sb = json.load(open(a)), json.load(open(b))
        print(f"rmlx serve speed-up with the drafter: {sb['aggregate_tps'] / sa['aggregate_tps']:.2f}x; "
              f"texts identical: {sa['texts'] == sb['texts']}")
        bad = bad or sa["texts"] != sb["texts"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"prompts": lambda a: prompts(), "mlx": mlx, "serve": serve, "table": table}[cmd](rest)
