"""A tiny chat model for API tests: the random-weights llama-f32 fixture
(vocabulary 256, context 512) with a byte-level tokenizer and a small chat
template, so that every route (chat, messages, completions with text) runs on
a model that answers in milliseconds.

Token ids 0..253 are bytes (GPT-2's byte-to-character table, no merges); 254
and 255, bytes that never occur in UTF-8, are `<s>` and `</s>`."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/llama-f32"
NAME = "tiny-chat"
VOCAB = 256
CONTEXT = 512
# Served beside it for /v1/embeddings: the tiny BERT of
# tests/goldens/embeddings_ref.py (WordPiece vocabulary of 83, 24 tokens).
EMBED = "tiny-embed"
EMBED_DIR = ROOT / "tests/fixtures/models/bert-tiny-f32"
EMBED_VOCAB = 83
EMBED_TOKENS = 24

TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<{{ m['role'] }}>"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json() -> dict:
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(254)}
    vocab["<s>"] = 254
    vocab["</s>"] = 255
    special = lambda i, t: {"id": i, "content": t, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(254, "<s>"), special(255, "</s>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def build(dest: pathlib.Path) -> pathlib.Path:
    """Writes the model into `dest`/tiny-chat and returns that directory."""
    d = dest / NAME
    d.mkdir(parents=True, exist_ok=True)
    for f in BASE.iterdir():
        link = d / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": TEMPLATE,
    }))
    return d


def serve(tmp: pathlib.Path, *extra: str):
    """`rmlx serve` of the tiny chat model (and the tiny embedder, `EMBED`)
    on an ephemeral port: (process, base URL)."""
    import re
    import subprocess
    import threading

    from conftest import rmlx_bin

    model = build(tmp)
    proc = subprocess.Popen([str(rmlx_bin()), "serve", "--port", "0", "--model", str(model),
                             "--model", f"{EMBED}={EMBED_DIR}", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("rmlx serve did not start:\n" + "".join(lines))


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()
