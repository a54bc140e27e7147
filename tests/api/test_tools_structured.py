"""Tool-call round trips (both APIs, streamed and not) and json_schema output,
enforced by constrained decoding, with the default model."""
import json

from conftest import SMOL

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
ANT_TOOLS = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": TOOLS[0]["function"]["parameters"]}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_openai_tool_round_trip(oai):
    r = oai.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str)
    # streamed, a named tool
    stream = oai.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, max_tokens=60, stream=True,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, id_, argtext, finish = None, None, "", None
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            name = tc.function.name or name
            id_ = tc.id or id_
            argtext += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert (name, finish) == ("get_weather", "tool_calls") and id_
    assert isinstance(json.loads(argtext)["city"], str)
    # the result goes back; the model answers in text
    msgs = ASK + [c.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    r2 = oai.chat.completions.create(model=SMOL, messages=msgs, tools=TOOLS, max_tokens=30)
    assert r2.choices[0].message.content


def test_anthropic_tool_round_trip(ant):
    m = ant.messages.create(model=SMOL, max_tokens=60, messages=ASK, tools=ANT_TOOLS, tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    use = [b for b in m.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    with ant.messages.stream(model=SMOL, max_tokens=60, messages=ASK, tools=ANT_TOOLS,
                             tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    suse = [b for b in final.content if b.type == "tool_use"][0]
    assert final.stop_reason == "tool_use" and suse.name == "get_weather" and isinstance(suse.input["city"], str)
    msgs = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C"}]}]
    m2 = ant.messages.create(model=SMOL, max_tokens=30, messages=msgs, tools=ANT_TOOLS)
    assert m2.content


def test_json_schema_output_validates(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    r = oai.chat.completions.create(model=SMOL, max_tokens=200, messages=[
        {"role": "user", "content": "Describe a person named Ann aged 30 as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    v = json.loads(r.choices[0].message.content)
    assert set(v) == {"name", "age", "tags"}
    assert isinstance(v["name"], str) and isinstance(v["age"], int) and all(isinstance(t, str) for t in v["tags"])
    r = oai.chat.completions.create(model=SMOL, max_tokens=400, messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
                                    response_format={"type": "json_object"})
    # a free-form object may outrun max_tokens on this small model; a finished one parses
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")
