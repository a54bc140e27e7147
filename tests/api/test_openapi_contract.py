"""schemas/openapi.json is a contract that values and the server both keep:
the document validates (openapi-spec-validator), request and response values
match their schemas (unions, nullable fields, bounds), a 405 carries `Allow`,
and a schemathesis run with every check passes against the tiny chat model
(a short run here; scripts/schemathesis-full.sh runs the long one)."""
import json
import urllib.error
import urllib.request

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

import st_run
import tiny_chat
from conftest import ROOT

SPEC = ROOT / "schemas/openapi.json"


@pytest.fixture(scope="module")
def doc():
    return json.loads(SPEC.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    proc, base = tiny_chat.serve(tmp_path_factory.mktemp("tiny"))
    yield base
    tiny_chat.stop(proc)


def check(doc, name, value):
    """Errors of `value` against component `name` (refs resolved in `doc`)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return [e.message for e in OAS30Validator(schema).iter_errors(value)]


def post(base, path, body, method="POST"):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"null")


def test_document_validates(doc):
    validate(doc)


@pytest.mark.parametrize("name,value", [
    ("StopSpec", "\n"), ("StopSpec", ["a", "b"]),
    ("KeepAliveSpec", 30), ("KeepAliveSpec", "5m"), ("KeepAliveSpec", -1),
    ("PromptSpec", "hello"), ("PromptSpec", ["a", "b"]), ("PromptSpec", [1, 2]), ("PromptSpec", [[1], [2, 3]]),
    ("MessageContent", "hi"), ("MessageContent", [{"type": "text", "text": "hi"}]),
    ("ToolChoice", "auto"), ("ToolChoice", {"type": "function", "function": {"name": "f"}}),
    ("ChatMessage", {"role": "system", "content": "s"}), ("ChatMessage", {"role": "developer", "content": "s"}),
    ("ChatMessage", {"role": "assistant", "content": None}),
    ("AnthropicSystemParam", "s"), ("AnthropicSystemParam", [{"type": "text", "text": "s"}]),
    ("AnthropicMessageContentParam", "hi"), ("AnthropicMessageContentParam", [{"type": "text", "text": "hi"}]),
    ("AnthropicToolResultContent", "ok"),
])
def test_values_match_their_union(doc, name, value):
    # Before the fix these unions declared `type: object` beside the anyOf: no string or array matched.
    assert check(doc, name, value) == []


@pytest.mark.parametrize("name,value", [
    ("ChatCompletionRequest", {"model": "m", "messages": []}),
    ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}),
    ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
    ("CompletionRequest", {"model": "m", "prompt": []}),
    ("CompletionRequest", {"model": "m", "prompt": [-1]}),
    ("CompletionRequest", {"model": "m", "prompt": "x", "max_tokens": -1}),
    ("AnthropicMessagesRequest", {"model": "m", "messages": [], "max_tokens": 1}),
    ("AnthropicMessagesRequest", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
])
def test_bounds_the_server_enforces_are_declared(doc, name, value):
    assert check(doc, name, value) != []


def test_null_fields_are_nullable(doc, tiny):
    s, _, models = post(tiny, "/v1/models", None, method="GET")
    assert s == 200 and check(doc, "ModelList", models) == []
    assert any(m["expires_at"] is None for m in models["data"])
    s, _, chat = post(tiny, "/v1/chat/completions",
                      {"model": tiny_chat.NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert s == 200, chat
    assert chat["system_fingerprint"] is None and chat["choices"][0]["message"]["refusal"] is None
    assert check(doc, "ChatCompletion", chat) == []
    s, _, comp = post(tiny, "/v1/completions",
                      {"model": tiny_chat.NAME, "prompt": [1, 2, 3], "max_tokens": 0, "echo": True, "logprobs": 1})
    assert s == 200, comp
    assert comp["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert check(doc, "Completion", comp) == []
    s, _, err = post(tiny, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert s == 404 and err["error"]["code"] == "model_not_found"
    s, _, err = post(tiny, "/v1/models", None, method="GET")
    s, _, err = post(tiny, "/v1/completions", {"model": tiny_chat.NAME, "prompt": "x", "n": 2})
    assert s == 400 and err["error"]["param"] == "n" and err["error"]["code"] is None
    assert check(doc, "ErrorResponse", err) == []


def test_method_not_allowed_names_the_allowed_methods(tiny):
    s, headers, body = post(tiny, "/v1/chat/completions", None, method="GET")
    assert s == 405
    assert headers.get("allow") == "POST", headers
    s, headers, _ = post(tiny, f"/v1/models/{tiny_chat.NAME}/load", None, method="DELETE")
    assert s == 405 and headers.get("allow") == "POST", headers


def test_schemathesis_short_run(tiny, tmp_path, doc):
    """A short property-based run with every check, positive and negative
    data; the full one is scripts/schemathesis-full.sh (figures in
    docs/SERVER.md)."""
    r = st_run.run(tiny, 8, tmp_path)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    s = st_run.summary(tmp_path / "run.har", doc)
    assert s["server_errors"] == []
    documented = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
    assert documented <= set(s["per_operation"]), documented - set(s["per_operation"])


def test_a_body_that_is_not_an_object_is_refused(tiny):
    # serde fills a struct whose fields are all optional from `[]`; the schema says object.
    s, _, err = post(tiny, f"/v1/models/{tiny_chat.NAME}/load", [])
    assert s == 400 and "JSON object" in err["error"]["message"], err
    s, _, err = post(tiny, "/v1/completions", [tiny_chat.NAME, [1, 2]])
    assert s == 400, err


def test_sampling_bounds_hold_at_f64_precision(tiny):
    base = {"model": tiny_chat.NAME, "prompt": [1, 2], "max_tokens": 1}
    # just inside an open bound, f32 would round it to 0 (refused before the fix)
    s, _, body = post(tiny, "/v1/completions", dict(base, top_p=5e-324, repetition_penalty=5e-324))
    assert s == 200, body
    # just past a closed bound, f32 would round it into range (accepted before the fix)
    for field, v in (("top_p", 1.0000000000000002), ("temperature", 2.0000000000000004)):
        s, _, body = post(tiny, "/v1/completions", dict(base, **{field: v}))
        assert s == 400 and body["error"]["param"] == field, body
