"""The official openai SDK against rmlx serve."""
import json
import subprocess

import openai
import pytest

from conftest import ROOT, SMOL, TINY, default_model, rmlx_bin

Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == [SMOL, TINY]
    assert oai.models.retrieve(TINY).id == TINY


def test_chat_plain(oai):
    r = oai.chat.completions.create(model=SMOL, messages=Q, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_equals_plain(oai):
    plain = oai.chat.completions.create(model=SMOL, messages=Q, max_tokens=24).choices[0].message.content
    stream = oai.chat.completions.create(model=SMOL, messages=Q, max_tokens=24, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_chat_logprobs_and_stop(oai):
    r = oai.chat.completions.create(model=SMOL, messages=Q, max_tokens=24, logprobs=True, top_logprobs=3, stop=["Paris"])
    c = r.choices[0]
    assert "Paris" not in c.message.content
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in c.logprobs.content)


def test_greedy_equals_rmlx_generate(oai):
    prompt = "Write one sentence about the sea."
    out = subprocess.run([str(rmlx_bin()), "generate", "--model", str(default_model()), "--chat", "--json",
                          "--prompt", prompt, "--temperature", "0", "--max-tokens", "40"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    cli = json.loads(out.stdout)
    r = oai.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0)
    assert r.choices[0].message.content == cli["text"]


def test_completions_token_ids_and_logprobs(oai):
    r = oai.completions.create(model=TINY, prompt=[1, 5, 9], max_tokens=6, logprobs=2)
    c = r.choices[0]
    assert len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs[0]) == 2
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 6
    many = oai.completions.create(model=TINY, prompt=[[1, 5, 9], [1, 2]], max_tokens=3)
    assert [c.index for c in many.choices] == [0, 1]
    streamed = list(oai.completions.create(model=TINY, prompt=[1, 5, 9], max_tokens=6, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
    text = oai.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in text.choices[0].text


def test_same_seed_same_output(oai):
    kw = dict(model=SMOL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=1.0, seed=1234)
    a = oai.chat.completions.create(**kw).choices[0].message.content
    b = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_errors_are_sdk_exceptions(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=Q)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=SMOL, messages=Q, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=TINY, prompt=[1] * 600)
    assert "512" in e.value.message and "600" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_auth_and_queue_errors():
    from conftest import start_server
    proc, base = start_server("--api-key", "sekret", "--max-queue-depth", "0")
    try:
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list()] == [SMOL, TINY]
        stream = good.completions.create(model=TINY, prompt=[1, 2], max_tokens=400, stream=True)
        next(iter(stream))  # the engine is busy now
        with pytest.raises(openai.RateLimitError):
            good.completions.create(model=TINY, prompt=[1, 2], max_tokens=1)
        stream.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
