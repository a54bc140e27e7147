"""Images through the OpenAI and Anthropic SDKs (issue 15), against
`rmlx serve --config rmlx.toml` serving the tiny random Gemma 3 vision
fixture (tests/fixtures/models/gemma3-vision-tiny) copied beside a
word-level tokenizer and a Gemma-3-style chat template (the fixture has
neither). The config file's `[server.images] allowed_dirs` lets file://
URLs read one directory."""
import base64
import struct
import json
import pathlib
import re
import shutil
import subprocess
import threading
import zlib

import anthropic
import openai
import pytest

from conftest import ROOT, rmlx_bin

FIXTURE = ROOT / "tests/fixtures/models/gemma3-vision-tiny"
NAME = "vision"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }} "
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<start_of_image>{% elif p.type == 'text' %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn> {% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)
SPECIAL = {0: "<pad>", 1: "<bos>", 2: "<eos>", 3: "<unk>", 256: "<start_of_image>", 257: "<end_of_image>",
           258: "<start_of_turn>", 259: "<end_of_turn>", 262: "<image_soft_token>"}
WORDS = ["user", "model", "what", "is", "in", "this", "picture"]
# bos, <start_of_turn>, user, 5 words, boi + 4 placeholders + eoi, <end_of_turn>,
# <start_of_turn>, model
PROMPT_TOKENS = 17


def tokenizer_json() -> dict:
    vocab = {s: i for i, s in SPECIAL.items()}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    for i in range(4 + len(WORDS), 300):
        if i not in SPECIAL:
            vocab[f"w{i}"] = i
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in SPECIAL.items()]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def png(rgb) -> bytes:
    """A 20x12 RGB PNG of colour `rgb` with a white diagonal, written with
    zlib and struct (no imaging library in the test environment)."""
    w, h = 20, 12
    rows = []
    for y in range(h):
        row = bytearray([0])  # filter type 0 (none)
        for x in range(w):
            row += bytes((255, 255, 255)) if (x == y) else bytes(rgb)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    model = d / NAME
    model.mkdir()
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"]:
        shutil.copy(FIXTURE / f, model / f)
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "chat_template": TEMPLATE}))
    pics = d / "pictures"
    pics.mkdir()
    (pics / "red.png").write_bytes(png([200, 30, 30]))
    cfg = d / "rmlx.toml"
    cfg.write_text(f"[server.images]\nallowed_dirs = [{json.dumps(str(pics))}]\nmax_bytes = 100000\n")
    proc = subprocess.Popen(
        [str(rmlx_bin()), "serve", "--config", str(cfg), "--port", "0", "--model", str(model)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    base, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            base = m.group(1)
            break
    if base is None:
        proc.kill()
        raise RuntimeError("rmlx serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    yield base, pics
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


def oai_chat(base, url, **kw):
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    return c.chat.completions.create(model=NAME, max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}], **kw)


def test_openai_and_anthropic_sdks_send_images(vision):
    base, pics = vision
    red = png([200, 30, 30])
    r = oai_chat(base, data_url(red))
    assert r.usage.prompt_tokens == PROMPT_TOKENS
    text = r.choices[0].message.content
    # The same pixels read from an allowed directory (config file's allowed_dirs).
    r2 = oai_chat(base, (pics / "red.png").as_uri())
    assert r2.choices[0].message.content == text
    a = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    m = a.messages.create(model=NAME, max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(red).decode()}}]}])
    assert m.usage.input_tokens == PROMPT_TOKENS
    assert m.content[0].text == text


def test_bad_images_are_400s_naming_the_part(vision):
    base, _ = vision
    with pytest.raises(openai.BadRequestError) as e:
        oai_chat(base, "data:image/png;base64,@@@")
    assert e.value.body["param"] == "messages[0].content[1]"
    # Over the config file's max_bytes (100000).
    with pytest.raises(openai.BadRequestError) as e:
        oai_chat(base, data_url(b"\x89PNG" + bytes(150000)))
    assert e.value.body["param"] == "messages[0].content[1]"
    assert "limit" in e.value.body["message"]
    a = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model=NAME, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "file:///etc/hostname"}}]}])
    assert "messages[0].content[0]" in str(e.value)
