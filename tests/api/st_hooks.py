"""Schemathesis hooks for the contract run (tests/api/test_openapi_contract.py,
scripts/schemathesis-full.sh; loaded with SCHEMATHESIS_HOOKS=st_hooks).

The OpenAPI document states every rule that a static OpenAPI 3.0 schema can
state (types, bounds, lengths, counts). What it cannot state depends on the
served model or ties two fields together; for schema-valid (positive) cases
these hooks steer the generated request inside those rules, and leave
negative cases as generated (only `model` is pointed at the served model, so
that a mutation is judged by validation rather than by a 404):

- plugin-dependent: `kv_cache` family names (the installed KV plugins' names,
  ones that fit the tiny model; unknown names are a 400 by design);
- served without drafters: `draft_kind` is left out (a kind the model is not
  served with is a 400 by design, and the contract server has none);
- model-dependent: the model id, token ids below the vocabulary, the prompt
  within the context (earliest turns dropped, long strings clipped), `logit_bias` keys that are token ids, images (the
  model reads text only), JSON Schemas / regexes / grammars that compile;
- cross-field: `top_logprobs` needs `logprobs`, a named `tool_choice` names a
  tool in `tools`, `max_tokens: 0` on completions needs `echo`;
- speed: `max_tokens` at most 4 (the test's time, not a server limit);
- bytes: stop strings of at most 256 bytes (the schema counts characters);
- embeddings go to the embedding model (`RMLX_ST_EMBED_MODEL`): token ids
  below its vocabulary, token lists within its 24 tokens, no `dimensions`
  (it declares no Matryoshka truncation), no `task`/`prompt_name` and no
  image items (it has no task adapters and no vision tower).
"""
import os

import schemathesis

MODEL = os.environ.get("RMLX_ST_MODEL", "tiny-chat")
VOCAB = int(os.environ.get("RMLX_ST_VOCAB", "256"))
MAX_TOKENS = 4
EMBED_MODEL = os.environ.get("RMLX_ST_EMBED_MODEL", "tiny-embed")
EMBED_VOCAB = int(os.environ.get("RMLX_ST_EMBED_VOCAB", "83"))
EMBED_TOKENS = 24
# The tiny model's context is 512 tokens and its tokenizer one token per
# byte: prompts are kept under this many bytes (the template adds a few).
PROMPT_BYTES = 320
TEXT_PART = {"type": "text", "text": "hi"}


def _is_positive(case) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.generation.mode.is_positive


def _clip_bytes(s, n=256):
    if not isinstance(s, str):
        return s
    b = s.encode()[:n]
    return b.decode(errors="ignore")


def _token(t):
    return t % VOCAB if isinstance(t, int) and t >= 0 else t


def _fix_parts(parts, image_types):
    if not isinstance(parts, list):
        return parts
    out = []
    for p in parts:
        if isinstance(p, dict) and p.get("type") in image_types:
            out.append(dict(TEXT_PART))
        elif isinstance(p, dict) and p.get("type") == "tool_result":
            p = dict(p)
            p["content"] = _fix_parts(p.get("content"), image_types)
            out.append(p)
        else:
            out.append(p)
    return out


def _fit_messages(body, key="messages"):
    """Drops the earliest turns until the conversation's text fits the
    context (one token per byte, plus the template's tags)."""
    msgs = body.get(key)
    if not isinstance(msgs, list):
        return
    def text(c):
        if isinstance(c, str):
            return len(c.encode())
        if isinstance(c, list):
            return sum(text(p.get("text")) + text(p.get("thinking")) + text(p.get("content"))
                       for p in c if isinstance(p, dict))
        return 0

    size = lambda m: (text(m.get("content")) if isinstance(m, dict) else 0) + 16
    budget = PROMPT_BYTES - text(body.get("system")) - 16
    while len(msgs) > 1 and sum(size(m) for m in msgs) > budget:
        msgs.pop(0)
    for m in msgs:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m["content"] = _clip_bytes(m["content"], PROMPT_BYTES // 2)
        elif isinstance(m, dict) and isinstance(m.get("content"), list) and m["content"]:
            share = PROMPT_BYTES // 2 // len(m["content"])
            for part in m["content"]:
                for k in ("text", "thinking", "content"):
                    if isinstance(part, dict) and isinstance(part.get(k), str):
                        part[k] = _clip_bytes(part[k], share)
    if isinstance(body.get("system"), str):
        body["system"] = _clip_bytes(body["system"], PROMPT_BYTES // 4)


def _cap(body, *keys):
    for k in keys:
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
            body[k] = MAX_TOKENS


def _steer_openai(body, path):
    _cap(body, "max_tokens", "max_completion_tokens")
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(i % VOCAB): v for i, v in enumerate(body["logit_bias"].values())}
    stop = body.get("stop")
    if isinstance(stop, str):
        body["stop"] = _clip_bytes(stop)
    elif isinstance(stop, list):
        body["stop"] = [_clip_bytes(s) for s in stop]
    rf = body.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict):
            rf["json_schema"]["schema"] = {"type": "object"}
        elif rf.get("type") == "regex":
            rf["regex"] = "[a-z]{1,8}"
        elif rf.get("type") == "grammar":
            rf["grammar"] = 'start: "yes" | "no"'
    if path.endswith("/chat/completions"):
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        tools = body.get("tools") or []
        for t in tools:
            if isinstance(t, dict) and isinstance(t.get("function"), dict):
                t["function"]["parameters"] = {"type": "object"}
        tc = body.get("tool_choice")
        names = [t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        if isinstance(tc, dict) and tc.get("function", {}).get("name") not in names:
            body["tool_choice"] = "auto"
        elif tc in ("required",) and not names:
            body["tool_choice"] = "auto"
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                m["content"] = _fix_parts(m.get("content"), {"image_url"})
        _fit_messages(body)
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            for k in ("messages", "add_generation_prompt", "bos_token", "eos_token", "tools"):
                kwargs.pop(k, None)
    if path.endswith("/v1/completions"):
        p = body.get("prompt")
        if isinstance(p, list):
            p = [[_token(t) for t in x][:PROMPT_BYTES] if isinstance(x, list) else _token(x) for x in p]
            body["prompt"] = [_clip_bytes(x, PROMPT_BYTES) if isinstance(x, str) else x for x in p][:PROMPT_BYTES]
        elif isinstance(p, str):
            body["prompt"] = _clip_bytes(p, PROMPT_BYTES)
        if body.get("max_tokens") == 0 and not body.get("echo"):
            body["max_tokens"] = 1


def _steer_anthropic(body):
    _cap(body, "max_tokens")
    if isinstance(body.get("stop_sequences"), list):
        body["stop_sequences"] = [_clip_bytes(s) for s in body["stop_sequences"]]
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            m["content"] = _fix_parts(m.get("content"), {"image"})
    _fit_messages(body)
    tools = body.get("tools") or []
    for t in tools:
        if isinstance(t, dict):
            t["input_schema"] = {"type": "object"}
    names = [t.get("name") for t in tools if isinstance(t, dict)]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        if tc.get("type") == "tool" and tc.get("name") not in names:
            tc["type"] = "auto"
        elif tc.get("type") == "any" and not names:
            tc["type"] = "auto"


# KV families the tiny model (head_dim 16) takes; the affine ones need 32.
KV_FAMILIES = ["f32", "fp8", "turbo4", "planar4"]


def _steer_kv(body):
    kv = body.get("kv_cache")
    pick = lambda v: v if v in (None, "auto") else KV_FAMILIES[len(str(v)) % len(KV_FAMILIES)]
    if isinstance(kv, str):
        body["kv_cache"] = pick(kv)
    elif isinstance(kv, dict):
        body["kv_cache"] = {k: pick(v) for k, v in kv.items() if k in ("k", "v")}


def _steer_embeddings(body):
    body.pop("dimensions", None)
    # Multi-task (jina-v4) extensions and image items: the embedding model
    # has no task adapters and no vision tower (both are 400s there).
    body.pop("task", None)
    body.pop("prompt_name", None)
    inp = body.get("input")
    if isinstance(inp, list) and any(isinstance(x, dict) for x in inp):
        body["input"] = ["text" for _ in inp]
    ids = lambda x: [t % EMBED_VOCAB if isinstance(t, int) and t >= 0 else t for t in x][:EMBED_TOKENS]
    inp = body.get("input")
    if isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp):
        body["input"] = [ids(x) for x in inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
        body["input"] = ids(inp)


@schemathesis.hook
def map_case(context, case):
    body = case.body
    embeddings = case.path == "/v1/embeddings"
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = EMBED_MODEL if embeddings else MODEL
    if isinstance(body, dict) and "model" not in body and _is_positive(case):
        # Two models are served: `model` may not be left out.
        body["model"] = EMBED_MODEL if embeddings else MODEL
    if case.path_parameters and "id" in case.path_parameters and _is_positive(case):
        case.path_parameters["id"] = MODEL
    if not _is_positive(case) or not isinstance(body, dict):
        return case
    _steer_kv(body)
    body.pop("draft_kind", None)
    if embeddings:
        _steer_embeddings(body)
    elif case.path.startswith("/v1/messages"):
        _steer_anthropic(body)
    else:
        _steer_openai(body, case.path)
    return case
