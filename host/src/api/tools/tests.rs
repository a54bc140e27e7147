use serde_json::{json, Value};

use super::*;

/// What a response parsed to: the text, and (name, arguments) per call.
#[derive(Debug, PartialEq)]
struct Parsed {
    text: String,
    calls: Vec<(String, Value)>,
}

/// Checks the event stream is well formed and folds it into a [`Parsed`].
fn fold(events: &[ToolEvent]) -> Parsed {
    let mut text = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut open: Option<usize> = None;
    let mut ids = std::collections::HashSet::new();
    for e in events {
        match e {
            ToolEvent::Text(t) => {
                assert!(open.is_none(), "text inside a call: {events:?}");
                text.push_str(t);
            }
            ToolEvent::CallStart { index, id, name } => {
                assert!(open.is_none(), "nested call: {events:?}");
                assert_eq!(*index, calls.len(), "indices count from 0: {events:?}");
                assert!(ids.insert(id.clone()), "ids unique");
                assert!(!id.is_empty());
                calls.push((name.clone(), String::new()));
                open = Some(*index);
            }
            ToolEvent::CallArgs { index, delta } => {
                assert_eq!(open, Some(*index), "args outside their call: {events:?}");
                calls[*index].1.push_str(delta);
            }
            ToolEvent::CallEnd { index } => {
                assert_eq!(open, Some(*index));
                open = None;
            }
        }
    }
    assert!(open.is_none(), "unterminated call: {events:?}");
    let calls = calls
        .into_iter()
        .map(|(n, a)| {
            let v: Value = serde_json::from_str(&a)
                .unwrap_or_else(|e| panic!("arguments of {n} not JSON ({e}): {a:?}"));
            (n, v)
        })
        .collect();
    Parsed { text, calls }
}

fn run_chunks(format: ToolFormat, tools: Option<&Value>, chunks: &[&str]) -> Vec<ToolEvent> {
    let mut p = format.parser();
    if let Some(t) = tools {
        p.set_tools(t);
    }
    let mut ev = Vec::new();
    for c in chunks {
        ev.extend(p.feed(c));
    }
    ev.extend(p.finish());
    ev
}

/// Parses `input` whole, split at every char boundary into two pieces, and char by char;
/// all must agree. Returns the parse.
fn parse_all_ways(format: ToolFormat, tools: Option<&Value>, input: &str) -> Parsed {
    let whole = fold(&run_chunks(format, tools, &[input]));
    let chars: Vec<String> = input.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(fold(&run_chunks(format, tools, &refs)), whole, "char by char");
    for (i, _) in input.char_indices().skip(1) {
        let (a, b) = input.split_at(i);
        assert_eq!(
            fold(&run_chunks(format, tools, &[a, b])),
            whole,
            "split at {i}: {a:?} | {b:?}"
        );
    }
    whole
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "extra": {"type": "object"}
                },
                "required": ["city"]
            }
        }
    }, {
        "type": "function",
        "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "content": {"type": "string"}}}}
    }])
}

#[test]
fn detects_formats_from_templates() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers");
    let tpl = |m: &str| -> String {
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(m).join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        cfg["chat_template"].as_str().unwrap().to_owned()
    };
    assert_eq!(detect_format(&tpl("qwen3")), ToolFormat::Hermes);
    assert_eq!(detect_format(&tpl("gemma3")), ToolFormat::GemmaToolCode);
    let llama = std::fs::read_to_string(dir.join("llama3_1/chat_template.jinja")).unwrap();
    assert_eq!(detect_format(&llama), ToolFormat::Llama3Json);
    assert_eq!(
        detect_format("{{'<tool_call>\\n<function=' + name + '>'}}"),
        ToolFormat::Qwen3Coder
    );
    assert_eq!(detect_format("[TOOL_CALLS] {{ calls|tojson }}"), ToolFormat::MistralV3);
    assert_eq!(
        detect_format("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}"),
        ToolFormat::Mistral
    );
    assert_eq!(detect_format("<start_function_call>"), ToolFormat::FunctionGemma);
    assert_eq!(detect_format("<|tool_call> <tool_call|>"), ToolFormat::Gemma4);
    assert_eq!(detect_format("{{ messages }}"), ToolFormat::Hermes);
    assert_eq!(parser_for_template(&llama).format(), ToolFormat::Llama3Json);
}

#[test]
fn hermes_single_and_parallel_calls() {
    let input = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"FR\\\"\", \"days\": 3, \"extra\": {\"a\": [1, {\"b\": \"}\"}]}}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"東京\"}}\n</tool_call>";
    let p = parse_all_ways(ToolFormat::Hermes, None, input);
    assert_eq!(p.text, "Let me check.\n");
    assert_eq!(
        p.calls,
        vec![
            (
                "get_weather".into(),
                json!({"city": "Paris \"FR\"", "days": 3, "extra": {"a": [1, {"b": "}"}]}})
            ),
            ("get_weather".into(), json!({"city": "東京"})),
        ]
    );
}

#[test]
fn hermes_streams_text_and_arguments_early() {
    let mut p = ToolFormat::Hermes.parser();
    // Plain text passes through at once; only a possible marker prefix is held.
    assert_eq!(p.feed("Hello <tool"), vec![ToolEvent::Text("Hello ".into())]);
    assert_eq!(p.feed("s are fun"), vec![ToolEvent::Text("<tools are fun".into())]);
    assert!(p.feed("<tool_call>\n{\"name\": \"f").is_empty());
    let ev = p.feed("\", \"arguments\": {\"x\": ");
    assert!(matches!(&ev[0], ToolEvent::CallStart { index: 0, name, .. } if name == "f"));
    assert_eq!(
        ev[1],
        ToolEvent::CallArgs {
            index: 0,
            delta: "{\"x\": ".into()
        }
    );
    assert_eq!(
        p.feed("1}}"),
        vec![
            ToolEvent::CallArgs {
                index: 0,
                delta: "1}".into()
            },
            ToolEvent::CallEnd { index: 0 }
        ]
    );
    assert!(p.feed("\n</tool_call>").is_empty());
    assert_eq!(p.feed(" done"), vec![ToolEvent::Text(" done".into())]);
    assert!(p.finish().is_empty());
}

#[test]
fn hermes_arguments_first_string_args_and_missing_args() {
    let input = "<tool_call>{\"arguments\": {\"q\": 1}, \"name\": \"search\"}</tool_call><tool_call>{\"name\": \"a\", \"arguments\": \"{\\\"k\\\": true}\"}</tool_call><tool_call>{\"name\": \"noargs\"}</tool_call>";
    let p = parse_all_ways(ToolFormat::Hermes, None, input);
    assert_eq!(p.text, "");
    assert_eq!(
        p.calls,
        vec![
            ("search".into(), json!({"q": 1})),
            ("a".into(), json!({"k": true})),
            ("noargs".into(), json!({})),
        ]
    );
}

#[test]
fn hermes_malformed_and_unterminated() {
    // Not JSON inside the tags: passed on as text.
    let p = parse_all_ways(ToolFormat::Hermes, None, "a<tool_call>oops</tool_call>b");
    assert_eq!(p.text, "a<tool_call>oops</tool_call>b");
    assert!(p.calls.is_empty());
    // Output cut off inside the arguments: the call is closed.
    let ev = run_chunks(
        ToolFormat::Hermes,
        None,
        &["<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1"],
    );
    assert!(matches!(ev.last(), Some(ToolEvent::CallEnd { index: 0 })));
    // Cut off before the name: text.
    let p = parse_all_ways(ToolFormat::Hermes, None, "x <tool_call>{\"na");
    assert_eq!(p.text, "x <tool_call>{\"na");
    // A lone marker prefix at the end is text.
    let p = parse_all_ways(ToolFormat::Hermes, None, "a <tool_ca");
    assert_eq!(p.text, "a <tool_ca");
}

#[test]
fn qwen3_coder_xml_typed_by_schema() {
    let tools = weather_tools();
    let input = "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n5\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=extra>\n{\"a\": [1, 2]}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/x.rs\n</parameter>\n<parameter=content>\nfn main() {\n    if a < b { println!(\"<hi>\\n\"); }\n}\n\n</parameter>\n</function>\n</tool_call>";
    let p = parse_all_ways(ToolFormat::Qwen3Coder, Some(&tools), input);
    assert_eq!(p.text, "I'll look.\n");
    assert_eq!(
        p.calls,
        vec![
            (
                "get_weather".into(),
                json!({"city": "New York", "days": 5, "metric": true, "extra": {"a": [1, 2]}})
            ),
            (
                "write_file".into(),
                json!({"path": "/tmp/x.rs", "content": "fn main() {\n    if a < b { println!(\"<hi>\\n\"); }\n}\n"})
            ),
        ]
    );
    // Without a schema, values stay strings (null is null).
    let p = parse_all_ways(
        ToolFormat::Qwen3Coder,
        None,
        "<tool_call>\n<function=f>\n<parameter=n>\n5\n</parameter>\n<parameter=z>\nnull\n</parameter>\n</function>\n</tool_call>",
    );
    assert_eq!(p.calls, vec![("f".into(), json!({"n": "5", "z": null}))]);
}

#[test]
fn qwen3_coder_streams_string_parameters() {
    let mut p = ToolFormat::Qwen3Coder.parser();
    p.set_tools(&weather_tools());
    let mut ev = p.feed("<tool_call>\n<function=write_file>\n<parameter=content>\nline 1\n");
    ev.extend(p.feed("line 2"));
    let args: String = ev
        .iter()
        .filter_map(|e| match e {
            ToolEvent::CallArgs { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(args, "{\"content\": \"line 1\\nline 2");
    let ev = p.feed("\n</parameter>\n</function>\n</tool_call>");
    assert_eq!(ev.last(), Some(&ToolEvent::CallEnd { index: 0 }));
}

#[test]
fn qwen3_coder_unwrapped_function_and_hermes_mix() {
    // Qwen3-Coder sometimes drops the <tool_call> wrapper.
    let p = parse_all_ways(
        ToolFormat::Qwen3Coder,
        None,
        "ok <function=f>\n<parameter=a>\nx\n</parameter>\n</function> end",
    );
    assert_eq!(p.text, "ok  end");
    assert_eq!(p.calls, vec![("f".into(), json!({"a": "x"}))]);
    // The <tool_call> parser reads a JSON body whichever format was picked.
    let p = parse_all_ways(
        ToolFormat::Qwen3Coder,
        None,
        "<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>",
    );
    assert_eq!(p.calls, vec![("g".into(), json!({}))]);
}

#[test]
fn llama3_json_calls() {
    let tools = weather_tools();
    let p = parse_all_ways(
        ToolFormat::Llama3Json,
        Some(&tools),
        "\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}; {\"type\": \"function\", \"name\": \"write_file\", \"parameters\": {\"path\": \"a\"}}",
    );
    assert_eq!(p.text, "");
    assert_eq!(
        p.calls,
        vec![
            ("get_weather".into(), json!({"city": "Rome"})),
            ("write_file".into(), json!({"path": "a"})),
        ]
    );
    let p = parse_all_ways(
        ToolFormat::Llama3Json,
        None,
        "<|python_tag|>{\"name\": \"f\", \"arguments\": {\"x\": [1]}}",
    );
    assert_eq!(p.calls, vec![("f".into(), json!({"x": [1]}))]);
    // Text, then a tagged call.
    let p = parse_all_ways(
        ToolFormat::Llama3Json,
        None,
        "Sure. <|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
    );
    assert_eq!(p.text, "Sure. ");
    assert_eq!(p.calls, vec![("f".into(), json!({}))]);
    // Built-in tool call syntax.
    let p = parse_all_ways(
        ToolFormat::Llama3Json,
        None,
        "<|python_tag|>brave_search.call(query=\"weather in SF\")",
    );
    assert_eq!(
        p.calls,
        vec![("brave_search".into(), json!({"query": "weather in SF"}))]
    );
}

#[test]
fn llama3_json_answers_are_text() {
    let tools = weather_tools();
    // A JSON answer (not a call) stays text.
    for input in [
        "{\"city\": \"Paris\", \"name\": \"x\"}",
        "{\"name\": \"Bob\", \"age\": 3}",
        "The answer is {\"name\": \"get_weather\"}",
        "{}",
    ] {
        let p = parse_all_ways(ToolFormat::Llama3Json, Some(&tools), input);
        assert_eq!(p.text, input);
        assert!(p.calls.is_empty(), "{input}");
    }
}

#[test]
fn mistral_v3_array() {
    let p = parse_all_ways(
        ToolFormat::MistralV3,
        None,
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"f\", \"arguments\": {}}]",
    );
    assert_eq!(p.text, "");
    assert_eq!(
        p.calls,
        vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("f".into(), json!({})),
        ]
    );
}

#[test]
fn mistral_args_format() {
    let p = parse_all_ways(
        ToolFormat::Mistral,
        None,
        "Checking.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\", \"n\": [1, \"]\"]}[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{}",
    );
    assert_eq!(p.text, "Checking.");
    assert_eq!(
        p.calls,
        vec![
            ("get_weather".into(), json!({"city": "Paris", "n": [1, "]"]})),
            ("f".into(), json!({})),
        ]
    );
    let ev = run_chunks(ToolFormat::Mistral, None, &["[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{}"]);
    assert!(matches!(&ev[0], ToolEvent::CallStart { id, .. } if id == "abc123XYZ"));
    let ev = run_chunks(ToolFormat::Mistral, None, &["[TOOL_CALLS]f[ARGS]{}"]);
    assert!(matches!(&ev[0], ToolEvent::CallStart { id, .. } if id.len() == 9));
    // Not a call: text.
    let p = parse_all_ways(ToolFormat::Mistral, None, "[TOOL_CALLS] hello there");
    assert!(p.calls.is_empty());
    assert!(p.text.contains("hello there"));
}

#[test]
fn gemma_tool_code() {
    let p = parse_all_ways(
        ToolFormat::GemmaToolCode,
        None,
        "Let me see.\n```tool_code\nget_weather(city=\"Paris\", days=3, metric=True, tags=['a', \"b\"], opts={'x': None})\n```\nMore ```python\nx\n```",
    );
    assert_eq!(p.text, "Let me see.\n\nMore ```python\nx\n```");
    assert_eq!(
        p.calls,
        vec![(
            "get_weather".into(),
            json!({"city": "Paris", "days": 3, "metric": true, "tags": ["a", "b"], "opts": {"x": null}})
        )]
    );
    let p = parse_all_ways(
        ToolFormat::GemmaToolCode,
        None,
        "```tool_code\nprint(f(a=1.5))\ng(b='it\\'s')\n```",
    );
    assert_eq!(
        p.calls,
        vec![("f".into(), json!({"a": 1.5})), ("g".into(), json!({"b": "it's"}))]
    );
}

#[test]
fn function_gemma_and_gemma4() {
    let p = parse_all_ways(
        ToolFormat::FunctionGemma,
        None,
        "<start_function_call>call:get_weather{city:<escape>Paris, FR<escape>,days:3,metric:true}<end_function_call>",
    );
    assert_eq!(
        p.calls,
        vec![(
            "get_weather".into(),
            json!({"city": "Paris, FR", "days": 3, "metric": true})
        )]
    );
    let p = parse_all_ways(
        ToolFormat::Gemma4,
        None,
        "ok<|tool_call>call:f{a:<|\"|>x}y<|\"|>,b:{c:[1,2]}}<tool_call|>",
    );
    assert_eq!(p.text, "ok");
    assert_eq!(p.calls, vec![("f".into(), json!({"a": "x}y", "b": {"c": [1, 2]}}))]);
}

#[test]
fn plain_text_is_untouched_by_every_parser() {
    let text = "Just text with { braces } and <tags> and [brackets] ``` fences, 東京.";
    for f in [
        ToolFormat::Hermes,
        ToolFormat::Qwen3Coder,
        ToolFormat::MistralV3,
        ToolFormat::Mistral,
        ToolFormat::GemmaToolCode,
        ToolFormat::FunctionGemma,
        ToolFormat::Gemma4,
        ToolFormat::Llama3Json,
    ] {
        let p = parse_all_ways(f, None, text);
        assert_eq!(p.text, text, "{f:?}");
        assert!(p.calls.is_empty());
    }
}

#[test]
fn python_literals() {
    assert_eq!(
        pyargs::parse_literal("{'a': (1, -2.5e3), \"b\": [True, None, 'x\\ny']}").unwrap(),
        json!({"a": [1, -2500.0], "b": [true, null, "x\ny"]})
    );
    assert_eq!(pyargs::parse_literal("'''tri\"ple'''").unwrap(), json!("tri\"ple"));
    assert!(pyargs::parse_literal("foo").is_err());
    assert_eq!(
        pyargs::parse_calls("[a(x=1), b.call(y='z')]").unwrap(),
        vec![("a".into(), json!({"x": 1})), ("b".into(), json!({"y": "z"}))]
    );
}

#[test]
fn anthropic_ids_look_like_anthropics() {
    let id = anthropic_id();
    assert!(id.starts_with("toolu_") && id.len() == 6 + 24, "{id}");
    assert!(id[6..].bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
    assert!(is_anthropic_id(&id));
    assert_ne!(anthropic_id(), anthropic_id());
    // Every format's calls get one, streamed or whole; text and arguments pass through.
    for (f, out) in [
        (ToolFormat::Hermes, "ok <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        (ToolFormat::Mistral, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}"),
        (ToolFormat::Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
    ] {
        let mut p = with_anthropic_ids(f.parser());
        p.set_tools(&weather_tools());
        assert_eq!(p.format(), f);
        let mut events = Vec::new();
        for c in out.chars() {
            events.extend(p.feed(&c.to_string()));
        }
        events.extend(p.finish());
        let parsed = fold(&events);
        assert_eq!(parsed.calls.len(), 1, "{f:?}: {events:?}");
        let ids: Vec<&String> = events.iter().filter_map(|e| match e { ToolEvent::CallStart { id, .. } => Some(id), _ => None }).collect();
        assert!(ids.iter().all(|id| is_anthropic_id(id)), "{f:?}: {ids:?}");
    }
    // A template is shown 9 characters of an Anthropic id (Mistral's templates
    // want 9), the same ones every time; other ids as they are.
    assert_eq!(template_call_id(&id), &id[id.len() - 9..]);
    assert_eq!(template_call_id(&id), template_call_id(&id));
    assert_eq!(template_call_id("call_abc"), "call_abc");
    assert!(!is_anthropic_id("call_0123456789012345678901234"));
}

#[test]
fn templates_that_render_tools() {
    // SmolLM2-style template: never reads `tools`.
    let smol = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    assert!(!template_renders_tools(smol));
    // Qwen-style: reads it.
    let qwen = "{%- if tools %}{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}{%- endif %}{% for m in messages %}{{ m.content }}{% endfor %}";
    assert!(template_renders_tools(qwen));
    // A variable named like it is not it; text that does not parse falls back to the word.
    assert!(!template_renders_tools("{{ my_tools_list }}{{ toolset }}"));
    assert!(template_renders_tools("{% generation %}{{ tools }}{% endgeneration %}"));
    assert!(!template_renders_tools("{% generation %}{{ messages }}{% endgeneration %}"));
}
