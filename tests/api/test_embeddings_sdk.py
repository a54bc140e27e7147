"""POST /v1/embeddings through the OpenAI Python SDK's `embeddings.create`:
a string, a list of strings, token ids, float and base64 (the SDK's default
when numpy is installed: it asks for base64 and decodes the little-endian
float32 itself), against the reference vectors of the tiny BERT fixture
(tests/goldens/embeddings_ref.py -> tests/fixtures/embeddings/tiny.json)."""
import base64
import json
import subprocess

import numpy as np
import openai
import pytest

from conftest import ROOT, start_server

BERT = "bert-tiny"
GOLDEN = json.loads((ROOT / "tests/fixtures/embeddings/tiny.json").read_text())["bert"]


@pytest.fixture(scope="module")
def eoai():
    proc, base = start_server("--model", f"{BERT}={ROOT / 'tests/fixtures/models/bert-tiny-f32'}")
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def close(got, i):
    return np.max(np.abs(np.asarray(got, dtype=np.float32) - np.asarray(GOLDEN["embeddings"][i], dtype=np.float32))) < 1e-5


def test_one_string(eoai):
    r = eoai.embeddings.create(model=BERT, input=GOLDEN["texts"][0], encoding_format="float")
    assert r.object == "list" and r.model == BERT and len(r.data) == 1
    assert r.data[0].object == "embedding" and r.data[0].index == 0
    assert close(r.data[0].embedding, 0)
    n = len(GOLDEN["ids"][0])
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n, n)


def test_a_batch_in_order_with_the_sdk_default_encoding(eoai):
    # No encoding_format: the SDK asks for base64 and decodes it.
    r = eoai.embeddings.create(model=BERT, input=GOLDEN["texts"])
    assert [d.index for d in r.data] == list(range(len(GOLDEN["texts"])))
    for i, d in enumerate(r.data):
        assert close(d.embedding, i), i


def test_base64_is_little_endian_float32(eoai):
    raw = eoai.embeddings.with_raw_response.create(model=BERT, input=GOLDEN["texts"][:2], encoding_format="base64")
    body = json.loads(raw.text)
    for i, d in enumerate(body["data"]):
        v = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert v.shape == (32,) and close(v, i)


def test_token_ids(eoai):
    r = eoai.embeddings.create(model=BERT, input=[GOLDEN["ids"][1], GOLDEN["ids"][2]], encoding_format="float")
    assert close(r.data[0].embedding, 1) and close(r.data[1].embedding, 2)


def test_errors_are_openai_errors(eoai):
    with pytest.raises(openai.BadRequestError) as e:
        eoai.embeddings.create(model=BERT, input="")
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        eoai.embeddings.create(model=BERT, input="a dog", dimensions=8)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError):
        eoai.embeddings.create(model="nope", input="a dog")
