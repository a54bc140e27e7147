"""Reasoning through the official SDKs: `reasoning_content` (OpenAI messages and
streamed deltas, read from the raw response and from `model_extra`), Anthropic
`thinking` blocks and `thinking_delta` events, `enable_thinking`, the thinking
budget, and json_schema / forced tool calls after the thinking block.

The test model is the default model (SmolLM2-135M-Instruct) in a temp dir with
`smollm2_think.jinja` as chat template: its generation prompt ends with
`<think>\n`, so the output starts inside the thinking block."""
import json
import os
import pathlib
import subprocess

import pytest

from conftest import ROOT, default_model, start_server

THINK = "smol-think"
CLOSE = "\n</think>\n\n"
Q = [{"role": "user", "content": "What is the capital of France?"}]
# anthropic 2.x's Messages.create() has no `temperature` argument any more; the server takes it.
GREEDY = {"temperature": 0}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def think_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-think")
    for f in default_model().iterdir():
        if f.name != "chat_template.jinja":
            os.symlink(f, d / f.name)
    (d / "chat_template.jinja").write_text((ROOT / "tests/api/smollm2_think.jinja").read_text())
    proc, base = start_server("--model", f"{THINK}={d}")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def toai(think_server):
    import openai
    return openai.OpenAI(base_url=think_server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tant(think_server):
    import anthropic
    return anthropic.Anthropic(base_url=think_server, api_key="unused", max_retries=0)


def test_openai_reasoning_content_and_budget(toai):
    n = 6
    raw = toai.chat.completions.with_raw_response.create(
        model=THINK, messages=Q, max_tokens=24, temperature=0, logprobs=True, extra_body={"thinking_budget": n})
    body = raw.http_response.json()["choices"][0]
    r = raw.parse()
    msg = r.choices[0].message
    # The SDK keeps the extension field: attribute and model_extra.
    assert msg.model_extra["reasoning_content"] == body["message"]["reasoning_content"] == msg.reasoning_content
    reasoning, content = msg.reasoning_content, msg.content
    assert reasoning and content.strip() and "think>" not in reasoning + content
    # n thinking tokens, the forced closing tag, then the answer.
    toks = [t.token for t in r.choices[0].logprobs.content]
    k = next(i for i in range(1, len(toks)) if "".join(toks[n:n + i]) == CLOSE)
    assert "".join(toks[:n]).strip() == reasoning
    assert "".join(toks[n + k:]).lstrip() == content

    # Streamed: reasoning deltas (model_extra) first, then content; the same text.
    sr, sc = "", ""
    for ch in toai.chat.completions.create(model=THINK, messages=Q, max_tokens=24, temperature=0, stream=True,
                                           extra_body={"thinking_budget": n}):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        if (d.model_extra or {}).get("reasoning_content"):
            assert not sc
            sr += d.model_extra["reasoning_content"]
        sc += d.content or ""
    assert (sr, sc) == (reasoning, content)


def test_openai_without_budget_and_thinking_off(toai):
    r = toai.chat.completions.create(model=THINK, messages=Q, max_tokens=16, temperature=0)
    m = r.choices[0].message
    # The model never closes the block here: everything it says is thinking.
    assert "Paris" in m.reasoning_content and m.content == ""
    off = toai.chat.completions.create(model=THINK, messages=Q, max_tokens=16, temperature=0,
                                       extra_body={"enable_thinking": False})
    m = off.choices[0].message
    assert (m.model_extra or {}).get("reasoning_content") is None
    assert "Paris" in m.content and m.content == m.content.lstrip()
    assert off.usage.prompt_tokens > r.usage.prompt_tokens  # the empty block is in the prompt


def test_anthropic_thinking_blocks(tant):
    kw = dict(model=THINK, max_tokens=20, extra_body=GREEDY, messages=Q, thinking={"type": "enabled", "budget_tokens": 5})
    m = tant.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"]
    thinking, text = m.content[0].thinking, m.content[1].text
    assert thinking and text.strip() and "think>" not in thinking + text
    # Streamed: thinking_delta events into block 0, then text into block 1.
    deltas = []
    with tant.messages.stream(**kw) as s:
        for ev in s:
            if ev.type == "content_block_delta":
                deltas.append((ev.index, ev.delta.type))
        final = s.get_final_message()
    assert deltas[0] == (0, "thinking_delta") and deltas[-1] == (1, "text_delta")
    assert sorted(set(deltas)) == [(0, "thinking_delta"), (1, "text_delta")]
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == (thinking, text)
    # Thinking disabled: no thinking block.
    off = tant.messages.create(model=THINK, max_tokens=16, extra_body=GREEDY, messages=Q, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and "Paris" in off.content[0].text


def test_structured_output_after_thinking(toai, tant):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": CITY}}
    r = toai.chat.completions.create(model=THINK, max_tokens=40, temperature=0, response_format=fmt,
                                     messages=[{"role": "user", "content": "Name a city, as JSON."}],
                                     extra_body={"thinking_budget": 6})
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and m.reasoning_content
    v = json.loads(m.content)
    assert set(v) == {"city"} and isinstance(v["city"], str)
    # Anthropic: thinking, then the forced tool call.
    m = tant.messages.create(model=THINK, max_tokens=60, extra_body=GREEDY, thinking={"type": "enabled", "budget_tokens": 5},
                             messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                             tools=[{"name": "get_weather", "input_schema": CITY}], tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use" and m.content[0].type == "thinking"
    use = [b for b in m.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and set(use.input) == {"city"}
