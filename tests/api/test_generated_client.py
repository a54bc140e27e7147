"""A client generated from schemas/openapi.json by openapi-python-client
makes every call the document describes, and parses every answer into its
models (a schema that values cannot match fails here, in the generated
parsers): chat (on SmolLM2, which knows that Paris is France's capital),
then every operation against the tiny chat model."""
import importlib
import pathlib
import subprocess
import sys

import pytest

import tiny_chat
from conftest import ROOT, SMOL


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    exe = pathlib.Path(sys.executable).parent / "openapi-python-client"
    r = subprocess.run([str(exe), "generate", "--path", str(ROOT / "schemas/openapi.json"),
                        "--output-path", str(out / "rmlx_client"), "--meta", "none"],
                       capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(out))
    try:
        mods = {name: importlib.import_module(f"rmlx_client.{name}") for name in (
            "models", "api.open_ai.create_chat_completion", "api.open_ai.create_completion",
            "api.models.list_models", "api.models.retrieve_model", "api.models.load_model",
            "api.models.unload_model", "api.anthropic.create_message", "api.open_ai.create_embedding",
            "api.anthropic.count_message_tokens", "api.health.health")}
        mods["client"] = importlib.import_module("rmlx_client")
    finally:
        sys.path.remove(str(out))
    return mods


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    proc, base = tiny_chat.serve(tmp_path_factory.mktemp("tiny"))
    yield base
    tiny_chat.stop(proc)


def test_generated_client_chat(server, gen):
    m = gen["models"]
    body = m.ChatCompletionRequest.from_dict({
        "model": SMOL, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    resp = gen["api.open_ai.create_chat_completion"].sync_detailed(client=gen["client"].Client(base_url=server), body=body)
    assert resp.status_code == 200, resp.content
    assert "Paris" in resp.parsed.choices[0].message.content


def test_generated_client_makes_every_call(tiny, gen):
    m, c = gen["models"], gen["client"].Client(base_url=tiny)
    name = tiny_chat.NAME
    calls = set()

    def ok(op, **kw):
        resp = gen[op].sync_detailed(client=c, **kw)
        assert resp.status_code == 200, (op, resp.status_code, resp.content)
        assert resp.parsed is not None and not isinstance(resp.parsed, m.ErrorResponse), (op, resp.content)
        calls.add(op)
        return resp.parsed

    assert ok("api.health.health").status == "ok"
    listed = ok("api.models.list_models")
    assert sorted(x.id for x in listed.data) == sorted([name, tiny_chat.EMBED])
    assert ok("api.models.retrieve_model", id=name).id == name
    loaded = ok("api.models.load_model", id=name, body=m.LoadRequest.from_dict({"keep_alive": "5m"}))
    assert loaded.loaded and isinstance(loaded.expires_at, int)
    ok("api.models.unload_model", id=name)
    assert ok("api.models.retrieve_model", id=name).expires_at is None

    chat = ok("api.open_ai.create_chat_completion", body=m.ChatCompletionRequest.from_dict({
        "model": name, "max_tokens": 3, "stop": ["\n"], "keep_alive": 30,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "developer", "content": [{"type": "text", "text": "really"}]},
                     {"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "none"}))
    assert chat.choices[0].finish_reason.value in ("stop", "length")
    for prompt in ("hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        comp = ok("api.open_ai.create_completion", body=m.CompletionRequest.from_dict({
            "model": name, "prompt": prompt, "max_tokens": 2, "stop": "x"}))
        assert len(comp.choices) == (2 if isinstance(prompt[0], (list, str)) and not isinstance(prompt, str) else 1)
    msg = ok("api.anthropic.create_message", body=m.AnthropicMessagesRequest.from_dict({
        "model": name, "max_tokens": 3, "system": [{"type": "text", "text": "s"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}))
    assert msg.usage.output_tokens <= 3
    count = ok("api.anthropic.count_message_tokens", body=m.AnthropicCountTokensRequest.from_dict({
        "model": name, "system": "s", "messages": [{"role": "user", "content": "hi"}]}))
    assert count.input_tokens > 0
    for inp in ("hello", ["a", "b"], [2, 30, 3], [[2, 30, 3], [2, 3]]):
        emb = ok("api.open_ai.create_embedding", body=m.EmbeddingRequest.from_dict({
            "model": tiny_chat.EMBED, "input": inp, "encoding_format": "float"}))
        assert len(emb.data) == (2 if isinstance(inp[0], (list, str)) and not isinstance(inp, str) else 1)
    every = {k for k in gen if k.startswith("api.")}
    assert calls == every, every - calls


def test_typescript_client_makes_every_call(tiny):
    """The same against a TypeScript client (openapi-typescript types,
    openapi-fetch calls, type-checked by tsc, run by node's test runner);
    tests/api/ts, installed by `make dev-venv`."""
    ts = ROOT / "tests/api/ts"
    if not (ts / "node_modules").is_dir():
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ts, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    env = dict(__import__("os").environ, RMLX_BASE=tiny, RMLX_MODEL=tiny_chat.NAME, RMLX_EMBED_MODEL=tiny_chat.EMBED)
    r = subprocess.run(["npm", "test", "--silent"], cwd=ts, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "# pass 1" in r.stdout and "# fail 0" in r.stdout, r.stdout[-3000:]
