#!/usr/bin/env python3
"""Tiny Gemma GGUFs written the way llama.cpp writes them, and mlx-lm checks
of what `rmlx convert --from-gguf` makes of them.

Usage:
  gemma_gguf.py make OUT_DIR
      For gemma, gemma2 and gemma3_text: a random mlx-lm model (hidden 64,
      2 layers, 6 for gemma3_text, float32) written as OUT_DIR/ARCH-TYPE.gguf for TYPE in f32,
      f16, q8_0, q4_0, and OUT_DIR/ARCH.json with mlx-lm's greedy tokens and
      logits (teacher-forced) for the original weights and for each TYPE's
      dequantized weights, plus a chat prompt and its reference token ids.
  gemma_gguf.py check OUT_DIR ARCH TYPE CONVERTED_DIR
      Loads CONVERTED_DIR with mlx-lm, prints JSON: the largest relative logit
      error against the original ("err_orig") and the dequantized GGUF
      weights ("err_deq"), greedy mismatches at steps with a clear margin, the
      chat prompt rendered and tokenized by the converted tokenizer, and the
      converted tokenizer's ids and decoded text for the reference strings.
  gemma_gguf.py train-tokenizer
      Re-trains tests/fixtures/gemma_gguf/tokenizer.model (SentencePiece BPE,
      byte fallback, Gemma's special-token layout).

What llama.cpp's convert_hf_to_gguf.py does for Gemma and is mirrored here:
tensor names blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down,
attn_norm,ffn_norm,post_attention_norm,post_ffw_norm,attn_q_norm,attn_k_norm},
every *norm.weight + 1, no q/k permutation, no output tensor (tied), norms
kept F32, soft-caps / sliding window / rope keys, SentencePiece vocab
(tokenizer.ggml.model "llama", scores, token types, add_space_prefix false).
"""
import json
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

import gguf  # noqa: E402
import jinja2  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.models import gemma, gemma2, gemma3_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPM = ROOT / "tests/fixtures/gemma_gguf/tokenizer.model"
TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
ARCHS = {
    "gemma": (gemma, "gemma"),
    "gemma2": (gemma2, "gemma2"),
    "gemma3_text": (gemma3_text, "gemma3"),
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "Hello there! How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you. 42 apples."},
    {"role": "user", "content": "Tell me a story about a café 🙂"},
]
PROMPTS = ["The quick brown fox jumps over", "Once upon a time, in a small village"]
STRINGS = [
    "Hello world",
    "  two  spaces\tand a tab\n\nnew lines   ",
    " leading space, numbers 12345 and 6.78",
    "naïve café, Straße, 東京, Привет 🙂👍🏽",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
]
STEPS = 8

TEXT = """The quick brown fox jumps over the lazy dog.
Once upon a time, in a small village, there lived an old baker.
Every morning he baked bread for the people of the town.
Hello there! How are you today? I am fine, thank you.
The weather is nice and the sun is shining over the hills.
Numbers like 12, 345 and 6789 appear in text from time to time.
She said that the story was about a brave little mouse.
Models learn patterns from large amounts of written language.
The river flows to the sea, and the sea is wide and deep.
In the evening the children played games in the garden.
"""


def train_tokenizer():
    import sentencepiece as spm

    SPM.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.strip().split("\n") * 20),
        model_prefix=str(SPM.with_suffix("")),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        split_by_whitespace=False,  # whole-text BPE, as llama.cpp and HF's Gemma tokenizer
        num_threads=1,
        character_coverage=1.0,
    )
    SPM.with_suffix(".vocab").unlink(missing_ok=True)


def load_spm():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SPM))


def vocab(sp):
    """tokens, scores, llama.cpp token types; HF-special tokens become CONTROL."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = 2
        elif sp.is_control(i):
            t = 3
        elif sp.is_unused(i):
            t = 5
        elif sp.is_byte(i):
            t = 6
        else:
            t = 1
        if tokens[-1] in ("<start_of_turn>", "<end_of_turn>"):
            t = 3  # special in Gemma's tokenizer_config.json -> CONTROL in llama.cpp
        types.append(t)
    return tokens, scores, types


def model_args(arch, n_vocab):
    base = dict(
        model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, vocab_size=n_vocab,
        num_key_value_heads=1 if arch == "gemma" else 2,
    )
    if arch == "gemma2":
        base.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    query_pre_attn_scalar=16.0)
    if arch == "gemma3_text":
        # mlx-lm's gemma3_text needs at least sliding_window_pattern layers, and
        # llama.cpp fixes the pattern at 6 (5 sliding layers, then a global one).
        base.update(num_hidden_layers=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                    query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=6,
                    max_position_embeddings=512, rope_scaling={"rope_type": "linear", "factor": 8.0})
    return base


def make_model(arch, args, seed):
    mod = ARCHS[arch][0]
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(args))
    params = []
    for k, v in tree_flatten(model.parameters()):
        scale = 0.3 if k.endswith("norm.weight") else 0.08
        params.append((k, mx.random.normal(v.shape) * scale))
    model.update(tree_unflatten(params))
    if arch == "gemma3_text":
        model.tie_word_embeddings = True
        model.pop("lm_head")
    mx.eval(model.parameters())
    return model


def logits_of(model, ids):
    out = model(mx.array([ids], dtype=mx.int32))
    return np.array(out[0].astype(mx.float32))


def greedy(model, prompt):
    ids = list(prompt)
    for _ in range(STEPS):
        ids.append(int(np.argmax(logits_of(model, ids)[-1])))
    lg = logits_of(model, ids[:-1])[len(prompt) - 1:]
    return ids[len(prompt):], lg


def record(model, prompts, tokens=None):
    """Teacher-forced logits for prompt + tokens (greedy tokens if None)."""
    out = []
    for i, p in enumerate(prompts):
        if tokens is None:
            toks, lg = greedy(model, p)
        else:
            toks = tokens[i]
            lg = logits_of(model, p + toks[:-1])[len(p) - 1:]
        margins = [float(np.sort(r)[-1] - np.sort(r)[-2]) for r in lg]
        out.append({"prompt": p, "tokens": toks, "margins": margins,
                    "logits": [[float(v) for v in r] for r in lg]})
    return out


def gguf_name(k):
    k = k.removeprefix("model.")
    if k == "embed_tokens.weight":
        return "token_embd.weight"
    if k == "norm.weight":
        return "output_norm.weight"
    parts = k.split(".")
    layer, rest = parts[1], ".".join(parts[2:])
    names = {
        "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
        "pre_feedforward_layernorm.weight": "ffn_norm",
        "post_feedforward_layernorm.weight": "post_ffw_norm",
        "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
    }
    if rest == "post_attention_layernorm.weight":
        return f"blk.{layer}.ffn_norm.weight" if ARCH_CUR == "gemma" else f"blk.{layer}.post_attention_norm.weight"
    return f"blk.{layer}.{names[rest]}.weight"


ARCH_CUR = None


def write_gguf(path, arch, args, weights, qtype, sp):
    """Returns the dequantized weights (what the GGUF holds, norm offset removed)."""
    global ARCH_CUR
    ARCH_CUR = arch
    name = ARCHS[arch][1]
    w = gguf.GGUFWriter(str(path), name)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(args.get("max_position_embeddings", 8192))
    w.add_embedding_length(args["hidden_size"])
    w.add_block_count(args["num_hidden_layers"])
    w.add_feed_forward_length(args["intermediate_size"])
    w.add_head_count(args["num_attention_heads"])
    w.add_head_count_kv(args["num_key_value_heads"])
    w.add_layer_norm_rms_eps(args["rms_norm_eps"])
    w.add_key_length(args["head_dim"])
    w.add_value_length(args["head_dim"])
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[[k for k, v in TYPES.items() if v == qtype][0]])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(args["attn_logit_softcapping"])
        w.add_final_logit_softcapping(args["final_logit_softcapping"])
        w.add_sliding_window(4096)
    if arch == "gemma3_text":
        w.add_rope_freq_base(args["rope_theta"])
        w.add_sliding_window(args["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args["rope_scaling"]["factor"])
    tokens, scores, types = vocab(sp)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(sp.pad_id())
    w.add_eot_token_id(sp.piece_to_id("<end_of_turn>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)
    deq = {}
    for k, v in weights.items():
        a = np.array(v.astype(mx.float32))
        if k.endswith("norm.weight"):
            w.add_tensor(gguf_name(k), (a + 1).astype(np.float32))
            deq[k] = a
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(k), a)
            deq[k] = a
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(k), a.astype(np.float16))
            deq[k] = a.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name(k), q, raw_dtype=qtype)
            deq[k] = gguf.quants.dequantize(q, qtype).reshape(a.shape).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


def chat_reference(sp):
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
        messages=MESSAGES, bos_token="", add_generation_prompt=True)
    ids = [sp.bos_id()] + sp.encode(text)
    return "<bos>" + text, ids


def make(out):
    out.mkdir(parents=True, exist_ok=True)
    sp = load_spm()
    n_vocab = sp.get_piece_size()
    prompts = [sp.encode(p) for p in PROMPTS]
    chat_text, chat_ids = chat_reference(sp)
    for seed, arch in enumerate(ARCHS):
        args = model_args(arch, n_vocab)
        model = make_model(arch, args, seed)
        weights = dict(tree_flatten(model.parameters()))
        ref = record(model, prompts)
        golden = {"arch": arch, "args": args, "original": ref, "dequantized": {},
                  "chat": {"messages": MESSAGES, "text": chat_text, "ids": chat_ids},
                  "strings": [[t, sp.encode(t)] for t in STRINGS]}
        for tname, qtype in TYPES.items():
            deq = write_gguf(out / f"{arch}-{tname}.gguf", arch, args, weights, qtype, sp)
            m2 = make_model(arch, args, seed)
            m2.load_weights(list((k, mx.array(v)) for k, v in deq.items()))
            golden["dequantized"][tname] = record(m2, prompts, [c["tokens"] for c in ref])
        (out / f"{arch}.json").write_text(json.dumps(golden))
        print(f"[gemma_gguf] {arch}: {len(TYPES)} GGUFs", file=sys.stderr)


def rel_err(ours, want):
    ours, want = np.array(ours), np.array(want)
    return float(np.max(np.abs(ours - want)) / max(np.max(np.abs(want)), 1e-6))


def check(out, arch, tname, dst):
    from mlx_lm.utils import load

    golden = json.loads((out / f"{arch}.json").read_text())
    model, tok = load(str(dst))
    model.set_dtype(mx.float32)
    report = {"err_orig": 0.0, "err_deq": 0.0, "greedy_mismatch": [], "greedy_orig_mismatch": []}
    for ref, deq in zip(golden["original"], golden["dequantized"][tname]):
        p, toks = ref["prompt"], ref["tokens"]
        lg = logits_of(model, p + toks[:-1])[len(p) - 1:]
        for step, row in enumerate(lg):
            report["err_orig"] = max(report["err_orig"], rel_err(row, ref["logits"][step]))
            report["err_deq"] = max(report["err_deq"], rel_err(row, deq["logits"][step]))
            got = int(np.argmax(row))
            if deq["margins"][step] > 1e-3 and got != int(np.argmax(deq["logits"][step])):
                report["greedy_mismatch"].append([p, step, got])
            if ref["margins"][step] > 1e-3 and got != toks[step]:
                report["greedy_orig_mismatch"].append([p, step, got])
    msgs = golden["chat"]["messages"]
    report["chat_text"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    report["chat_ids"] = [int(i) for i in ids]
    report["decoded"] = tok.decode(golden["chat"]["ids"][1:])
    report["strings"] = [[tok.encode(t, add_special_tokens=False), tok.decode(ids)] for t, ids in golden["strings"]]
    print(json.dumps(report))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make" and len(sys.argv) == 3:
        make(Path(sys.argv[2]))
    elif cmd == "check" and len(sys.argv) == 6:
        check(Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5]))
    elif cmd == "train-tokenizer":
        train_tokenizer()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
