"""Gemma 4 images through the OpenAI and Anthropic SDKs (issue 15), against
`rmlx serve` on the tiny random Gemma 4 vision fixture
(tests/fixtures/models/gemma4-vision-tiny, with the tokenizer, chat
template and processor_config.json scripts/dev/gemma4_serve_golden.py
wrote). The golden (tests/fixtures/goldens/gemma4-vision-serve) is what
mlx-vlm 0.7.10's processor and `stream_generate` made of the same chats:
two images of different sizes (37x23 -> 3 soft tokens, 61x5 -> 6), the
prompt length, the greedy tokens and each step's top-5 log-probs."""
import base64
import json
import re
import subprocess
import threading

import anthropic
import openai
import pytest

from conftest import ROOT, rmlx_bin

MODEL = ROOT / "tests/fixtures/models/gemma4-vision-tiny"
GOLDEN = json.loads((ROOT / "tests/fixtures/goldens/gemma4-vision-serve/golden.json").read_text())
VOCAB = json.loads((MODEL / "tokenizer.json").read_text())["model"]["vocab"]
NAME = "gemma4"


@pytest.fixture(scope="module")
def base():
    proc = subprocess.Popen(
        [str(rmlx_bin()), "serve", "--port", "0", "--model", f"{NAME}={MODEL}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    url, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise RuntimeError("rmlx serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def b64(name: str) -> str:
    return base64.b64encode((ROOT / "tests/fixtures/images" / name).read_bytes()).decode()


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_gemma4_images_through_both_sdks(base, case):
    g = GOLDEN["cases"][case]
    parts = g["parts"]
    oai = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(p)}} if p.endswith(".png")
           else {"type": "text", "text": p} for p in parts]
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=NAME, max_tokens=GOLDEN["steps"], temperature=0, logprobs=True,
                                  top_logprobs=5, messages=[{"role": "user", "content": oai}])
    assert r.usage.prompt_tokens == len(g["prompt_ids"])
    steps = r.choices[0].logprobs.content
    assert [VOCAB[t.token] for t in steps] == g["tokens"]
    for got, want in zip(steps, g["top5"]):
        assert [VOCAB[t.token] for t in got.top_logprobs] == [w[0] for w in want]
        assert max(abs(t.logprob - w[1]) for t, w in zip(got.top_logprobs, want)) < 1e-4

    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(p)}}
              if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    a = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": blocks}]
    m = a.messages.create(model=NAME, max_tokens=GOLDEN["steps"], messages=msgs, extra_body={"temperature": 0})
    assert m.usage.input_tokens == len(g["prompt_ids"])
    assert m.content[0].text == r.choices[0].message.content
    assert a.messages.count_tokens(model=NAME, messages=msgs).input_tokens == len(g["prompt_ids"])
