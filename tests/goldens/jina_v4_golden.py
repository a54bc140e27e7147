"""Golden of jina-embeddings-v4's text path (issue 15): a tiny random model in the
published checkpoint's layout and the embeddings its published definition gives.

The model: transformers' Qwen2_5_VLForConditionalGeneration with a tiny random
config (text: hidden 32, 2 layers, 4 heads, 2 KV heads, head_dim 8, vocab 256,
M-RoPE sections [2, 1, 1]; the vision tower of
scripts/dev/qwen2_5_vl_golden.py's sizes: 2 blocks, hidden 16, windows of
8 pixels with block 1 full attention, patch 2, merge 2), float32, saved with
save_pretrained (weights as `model.*` and `visual.*`), plus what
jina-embeddings-v4 adds:
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
- preprocessor_config.json: Qwen2VLImageProcessor (patch 2, temporal patch
  2, merge 2, min/max pixels 64 / 1024, CLIP mean/std), as
  scripts/dev/qwen2_5_vl_golden.py's;
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

Images (process_images / get_single_vector_embeddings): the document
`<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the
image.<|im_end|>\n` with the placeholder expanded to the merged grid's
count, no prefix; the tiny tokenizer has no special tokens, so the ids are
the text pieces' ids around `vision_start_token_id`, `image_token_id` x T and
`vision_end_token_id` (the real tokenizer splits at those special tokens, so
that is how it tokenizes the whole document). transformers' image processor
makes the pixels and grid, the model's own get_rope_index the positions;
the embedding is the mean of the last hidden states from the vision_start
token to the vision_end token inclusive, L2-normalised (and truncated to 16,
normalised again). tests/fixtures/images/qwa24x16.png and qwb24x16.png:
24 x 16, no resize, grid (1, 8, 12), 24 placeholders.

Writes tests/fixtures/models/jina-v4-tiny/ (the model directory) and
tests/fixtures/embeddings/jina_v4_tiny.json: for each task and prompt name,
the texts' token ids and their embeddings at full size and at 16; under
`images`, per task, each image's document ids and embeddings.

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
IMAGES = ["qwa24x16.png", "qwb24x16.png"]
IMG_DIR = ROOT / "tests" / "fixtures" / "images"
VSTART, VEND, IMG = 250, 251, 252
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "min_pixels": 64,
    "max_pixels": 1024,
    "patch_size": 2,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
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
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                  fullatt_block_indexes=[1], hidden_act="silu")
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
    (OUT / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
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


def image_doc(tok, tokens):
    """The image document's ids with `tokens` placeholders."""
    before = tok.encode("<|im_start|>user\n").ids
    after = tok.encode("Describe the image.<|im_end|>\n").ids
    return before + [VSTART] + [IMG] * tokens + [VEND] + after


def embed_image(model, lora, task, tok, path):
    """The published single-vector embedding of one image under `task`."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"})
    img = Image.open(path).convert("RGB")
    px = proc(images=[img], return_tensors="pt")
    grid = px["image_grid_thw"]
    t = int(grid[0].prod()) // 4
    ids = image_doc(tok, t)
    hooks = []
    mods = dict(model.named_modules())
    for n, per in lora.items():
        if n not in mods:
            continue
        a, b = per[task]

        def hook(mod, inp, out, a=a, b=b):
            return out + (ALPHA / R) * (inp[0] @ a.T) @ b.T

        hooks.append(mods[n].register_forward_hook(hook))
    try:
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        with torch.no_grad():
            types = (x == IMG).int()  # transformers 5: image tokens are type 1
            pos, _ = model.model.get_rope_index(input_ids=x, mm_token_type_ids=types, image_grid_thw=grid,
                                                attention_mask=mask)
            h = model.model(input_ids=x, attention_mask=mask, pixel_values=px["pixel_values"].float(),
                            image_grid_thw=grid, position_ids=pos, mm_token_type_ids=types).last_hidden_state  # [1, L, D]
            s, e = ids.index(VSTART), ids.index(VEND)
            pooled = h[0, s:e + 1].mean(0, keepdim=True)
            full = torch.nn.functional.normalize(pooled, dim=-1)
            short = torch.nn.functional.normalize(full[:, :16], dim=-1)
    finally:
        for hk in hooks:
            hk.remove()
    return ids, [int(v) for v in grid[0]], pos[:, 0].tolist(), full[0].numpy(), short[0].numpy()


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
    images = []
    for task in TASKS:
        for name in IMAGES:
            ids, grid, pos, full, short = embed_image(model, lora, task, tok, IMG_DIR / name)
            images.append({"task": task, "image": name, "ids": ids, "grid": grid, "positions": pos,
                           "full": [round(float(x), 8) for x in full],
                           "dims16": [round(float(x), 8) for x in short]})
    # The adapters and the image both matter.
    assert np.abs(np.array(images[0]["full"]) - np.array(images[2]["full"])).max() > 1e-2
    assert np.abs(np.array(images[0]["full"]) - np.array(images[1]["full"])).max() > 1e-2
    REF.write_text(json.dumps({"texts": TEXTS, "matryoshka_dims": MATRYOSHKA, "cases": cases,
                               "images": images}) + "\n")
    print("wrote", OUT, REF)


if __name__ == "__main__":
    main()
