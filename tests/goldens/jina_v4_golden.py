"""Golden of jina-embeddings-v4's text path (issue 15): a tiny random model in the
published checkpoint's layout and the embeddings its published definition gives.

The model: transformers' Qwen2_5_VLForConditionalGeneration with a tiny random
config (text: hidden 32, 2 layers, 4 heads, 2 KV heads, head_dim 8, vocab 256,
M-RoPE sections [2, 1, 1]; a 1-block vision tower, hidden 16, that the
text path never runs), float32, saved with save_pretrained (weights as
`model.*` and `visual.*`), plus what jina-embeddings-v4 adds:
- config.json: architectures [JinaEmbeddingsV4Model], task_names
  [retrieval, text-matching, code], matryoshka_dims [8, 16, 32],
  multi_vector_projector_dim 8, single_vector_pool_strategy mean;
- `multi_vector_projector.{weight,bias}` (Linear hidden -> 8);
- adapters/adapter_config.json (PEFT LoraConfig: r 4, lora_alpha 8, the
  target-module regex of the published adapters) and
  adapters/adapter_model.safetensors: per task, random LoRA A [r, in] and
  B [out, r] for q/k/v/o/gate/up/down of every language-model layer and the
  projector, named as PEFT saves the published MultiAdapterLinear modules:
  `base_model.model.<module>.lora_{A,B}.<task>.weight`, <module> as the
  live model names it (`model.language_model.layers.0.self_attn.q_proj`,
  while the base weights are stored as `model.layers.0...`, the published
  layout);
- tokenizer.json: the tiny 256-token BPE of tests/fixtures/tokenizers/tiny256
  (no special tokens added, as Qwen2's tokenizer adds none).

The reference follows modeling_jina_embeddings_v4.py / custom_lora_module.py
(read, not copied): text gets the prefix "Query: " or "Passage: " by
prompt_name ("Query: " for both under text-matching); every targeted linear
computes base(x) + (alpha / r) * B(A(x)) with the task's A, B; the language
model's last hidden states (after the final norm) are mean-pooled over the
attention mask and L2-normalised; a Matryoshka `truncate_dim` keeps the first
values and normalises again. A batch of texts of different lengths runs
padded (right) with its attention mask, as the processor pads it.

Writes tests/fixtures/models/jina-v4-tiny/ (the model directory) and
tests/fixtures/embeddings/jina_v4_tiny.json: for each task and prompt name,
the texts' token ids and their embeddings at full size and at 16.

Run: .venv-dev/bin/python tests/goldens/jina_v4_golden.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "models" / "jina-v4-tiny"
REF = ROOT / "tests" / "fixtures" / "embeddings" / "jina_v4_tiny.json"
TOK = ROOT / "tests" / "fixtures" / "tokenizers" / "tiny256" / "tokenizer.json"

TASKS = ["retrieval", "text-matching", "code"]
PREFIX = {"query": "Query", "passage": "Passage"}
R, ALPHA = 4, 8
MATRYOSHKA = [8, 16, 32]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = [
    "What is the weather in Paris today?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris",
    '{"name": "Ada", "city": "Paris"}',
    "A man is eating food.",
]


def build():
    torch.manual_seed(0)
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           vision_start_token_id=250, vision_end_token_id=251, image_token_id=252,
                           video_token_id=253)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    proj = torch.nn.Linear(32, 8)
    with torch.no_grad():
        proj.weight.copy_(torch.randn_like(proj.weight) * 0.2)
        proj.bias.copy_(torch.randn_like(proj.bias) * 0.1)
    return model, proj


def lora_weights(model, proj):
    """{module: {task: (A [r, in], B [out, r])}} for every targeted linear."""
    g = torch.Generator().manual_seed(1)
    out = {}
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS and "visual" not in n]
    mods.append(("multi_vector_projector", proj))
    for n, m in mods:
        out[n] = {t: (torch.randn(R, m.in_features, generator=g) * 0.2,
                      torch.randn(m.out_features, R, generator=g) * 0.2) for t in TASKS}
    return out


def save(model, proj, lora):
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    # The projector beside the language model, as the published checkpoint holds it.
    from safetensors.torch import load_file
    st = load_file(OUT / "model.safetensors")
    st["multi_vector_projector.weight"] = proj.weight.detach().clone()
    st["multi_vector_projector.bias"] = proj.bias.detach().clone()
    st = {k: v.contiguous() for k, v in st.items()}
    save_file(st, OUT / "model.safetensors", metadata={"format": "pt"})
    for f in OUT.glob("model.safetensors.index.json"):
        f.unlink()
    # config.json in the published checkpoint's form (transformers 4.52):
    # the text keys at the top level, `rope_scaling` {type mrope,
    # mrope_section} and `rope_theta`, `vision_config` nested.
    saved = json.loads((OUT / "config.json").read_text())
    text = dict(saved["text_config"])
    rope = text.pop("rope_parameters")
    for k in ["model_type", "layer_types", "bos_token_id", "eos_token_id", "pad_token_id"]:
        text.pop(k, None)
    cfg = {"architectures": ["JinaEmbeddingsV4Model"], "model_type": "qwen2_5_vl"}
    cfg.update(text)
    cfg.update({
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        # transformers 4.52 names the tower's config `qwen2_5_vl` (5.x: `qwen2_5_vl_vision`).
        "vision_config": {**{k: v for k, v in saved["vision_config"].items() if k != "rope_parameters"}, "model_type": "qwen2_5_vl"},
        "vision_start_token_id": 250, "vision_end_token_id": 251, "image_token_id": 252, "video_token_id": 253,
        "torch_dtype": "float32",
        "task_names": TASKS,
        "matryoshka_dims": MATRYOSHKA,
        "truncate_dim": None,
        "multi_vector_projector_dim": 8,
        "single_vector_pool_strategy": "mean",
    })
    (OUT / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (OUT / "generation_config.json").unlink(missing_ok=True)
    ad = OUT / "adapters"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": R, "lora_alpha": ALPHA,
        "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "target_modules": "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(single_vector_projector|multi_vector_projector).*$)",
        "exclude_modules": ".*visual.*",
        "base_model_name_or_path": "jinaai/jina-embeddings-v4",
    }, indent=2) + "\n")
    tensors = {}
    for n, per in lora.items():
        for t, (a, b) in per.items():
            tensors[f"base_model.model.{n}.lora_A.{t}.weight"] = a.contiguous()
            tensors[f"base_model.model.{n}.lora_B.{t}.weight"] = b.contiguous()
    save_file(tensors, ad / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(TOK, OUT / "tokenizer.json")
    (OUT / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "unk_token": "<unk>", "model_max_length": 512}, indent=1) + "\n")


def embed(model, lora, task, ids_list):
    """The published single-vector embedding of token-id rows under `task`."""
    hooks = []
    scale = ALPHA / R
    mods = dict(model.named_modules())
    for n, per in lora.items():
        if n not in mods:
            continue
        a, b = per[task]

        def hook(mod, inp, out, a=a, b=b):
            return out + scale * (inp[0] @ a.T) @ b.T

        hooks.append(mods[n].register_forward_hook(hook))
    try:
        L = max(len(r) for r in ids_list)
        ids = torch.zeros(len(ids_list), L, dtype=torch.long)
        mask = torch.zeros(len(ids_list), L, dtype=torch.long)
        for i, r in enumerate(ids_list):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D], after the norm
            m = mask.unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            full = torch.nn.functional.normalize(pooled, dim=-1)
            short = torch.nn.functional.normalize(full[:, :16], dim=-1)
        return full.numpy(), short.numpy()
    finally:
        for hk in hooks:
            hk.remove()


def main():
    model, proj = build()
    lora = lora_weights(model, proj)
    save(model, proj, lora)
    tok = Tokenizer.from_file(str(TOK))
    cases = []
    for task in TASKS:
        for pn in ["query", "passage"]:
            prefix = PREFIX[pn] if task != "text-matching" else PREFIX["query"]
            texts = [f"{prefix}: {t}" for t in TEXTS]
            ids = [tok.encode(t).ids for t in texts]
            full, short = embed(model, lora, task, ids)
            # Each row alone equals its row in the padded batch.
            alone, _ = embed(model, lora, task, ids[2:3])
            assert np.abs(alone[0] - full[2]).max() < 1e-5
            cases.append({"task": task, "prompt_name": pn, "ids": ids,
                          "full": [[round(float(x), 8) for x in v] for v in full],
                          "dims16": [[round(float(x), 8) for x in v] for v in short]})
    # The base model alone (no adapter) differs: the adapters matter.
    base = embed(model, {}, "retrieval", cases[0]["ids"])[0]
    assert np.abs(base - np.array(cases[0]["full"])).max() > 1e-2
    REF.write_text(json.dumps({"texts": TEXTS, "matryoshka_dims": MATRYOSHKA, "cases": cases}) + "\n")
    print("wrote", OUT, REF)


if __name__ == "__main__":
    main()
