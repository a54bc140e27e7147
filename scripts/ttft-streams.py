"""mlx-lm's side of scripts/ttft-streams.sh: how long `batch_generate` takes
to prefill N prompts of P random token ids that arrive together, and to give
their first tokens.

usage: ttft-streams.py MODEL_DIR [-n 8] [-p 512] [--trials 3]

Prints one JSON line per trial: `prompt_s` (batch_generate's own prompt time,
BatchStats.prompt_time: its prefill forwards) and `first_token_s` (from
inserting the N prompts until the generator returns their first tokens).
On the CPU the model is dequantized and cast to float32 first, as rmlx serves
it there (host/src/model/policy.rs: the backend's fast configuration); on a
GPU it runs as its files are. Dev tool only (the .venv-dev reference).
"""

import argparse
import json
import random
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import dequantize_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-n", "--streams", type=int, default=8)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()

    model, tok = load(args.model)
    cpu = mx.default_device() == mx.cpu
    if cpu:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    rng = random.Random(1)
    warm = [[rng.randrange(3, vocab) for _ in range(16)]]
    batch_ttft(model, warm)
    for t in range(args.trials):
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]
        prompt_s, first_s = batch_ttft(model, prompts)
        print(json.dumps({
            "engine": "mlx-lm batch_generate", "trial": t + 1, "streams": args.streams,
            "prompt_tokens": args.prompt_tokens, "device": "cpu" if cpu else "gpu",
            "dtype": "float32 (dequantized)" if cpu else "model",
            "prompt_s": round(prompt_s, 4), "first_token_s": round(first_s, 4),
        }), flush=True)


def batch_ttft(model, prompts):
    """(prompt time, time to the first tokens) of one batch of prompts."""
    gen = BatchGenerator(model, stop_tokens=[])
    t0 = time.perf_counter()
    gen.insert(prompts, [1] * len(prompts))
    with gen.stats() as stats:
        first = None
        while responses := gen.next_generated():
            if first is None:
                first = time.perf_counter() - t0
    gen.close()
    return stats.prompt_time, first


if __name__ == "__main__":
    main()
