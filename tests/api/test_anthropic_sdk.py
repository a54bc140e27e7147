"""The official anthropic SDK against rmlx serve."""
import anthropic
import pytest

from conftest import SMOL

Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_messages_plain(ant):
    m = ant.messages.create(model=SMOL, max_tokens=32, messages=Q, metadata={"user_id": "u1"})
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


def test_messages_streamed(ant):
    plain = ant.messages.create(model=SMOL, max_tokens=32, messages=Q)
    with ant.messages.stream(model=SMOL, max_tokens=32, messages=Q) as s:
        types = [e.type for e in s]
        final = s.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == "end_turn"
    raw = list(ant.messages.create(model=SMOL, max_tokens=3, messages=Q, stream=True))
    assert [e.type for e in raw[:2]] == ["message_start", "content_block_start"]
    assert [e.type for e in raw[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw[-2].delta.stop_reason == "max_tokens"


def test_count_tokens(ant):
    kw = dict(model=SMOL, system="You are a helpful assistant.", messages=Q)
    n = ant.messages.count_tokens(**kw).input_tokens
    m = ant.messages.create(max_tokens=4, **kw)
    assert n == m.usage.input_tokens


def test_stop_sequences_and_top_k(ant):
    m = ant.messages.create(model=SMOL, max_tokens=32, messages=Q, stop_sequences=["Paris"],
                           extra_body={"top_k": 1, "temperature": 0.5})
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris"
    assert "Paris" not in m.content[0].text


def test_errors_are_sdk_exceptions(ant):
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.create(model="no-such-model", max_tokens=8, messages=Q)
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model=SMOL, max_tokens=8, messages=Q, extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
