//! Chat-template tests against transformers' renders (tests/fixtures/tokenizers).
use super::*;
use super::python::py_float_repr;
use super::time::strftime_utc;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn render_str(src: &str, ctx: Value) -> Result<String, ChatTemplateError> {
    let t = ChatTemplate::from_source(src, Map::new()).unwrap();
    let mut opts = RenderOptions::default();
    if let Value::Object(m) = ctx {
        opts.extra = m;
    }
    t.render(
        &[serde_json::json!({"role": "user", "content": "x"})],
        &opts,
    )
}

#[test]
fn json_key_order_is_preserved() {
    // Byte-identical tool renders need insertion-ordered JSON objects end to end.
    let v: Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["b", "a"],
        "enable serde_json's `preserve_order` feature"
    );
    let out = render_str("{{ x | tojson }}", serde_json::json!({"x": v})).unwrap();
    assert_eq!(
        out, r#"{"b": 1, "a": 2}"#,
        "enable minijinja's `preserve_order` feature"
    );
}

#[test]
fn renders_match_transformers() {
    let exp = expected();
    let mut n = 0;
    for (model, m) in exp["models"].as_object().unwrap() {
        let dir = fixtures().join(model);
        let t = ChatTemplate::from_model_dir(&dir)
            .unwrap()
            .expect("template");
        let tok = super::super::tokenizer::test_tokenizer(model);
        for case in m["chat"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let messages = case["messages"].as_array().unwrap();
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case.get("tools").filter(|t| !t.is_null()).cloned(),
                extra: case
                    .get("kwargs")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
            };
            let got = if case.get("template").and_then(Value::as_str)
                == Some("tokenizer_config.json")
            {
                // render the tokenizer_config.json template that chat_template.jinja shadows
                let cfg = read_json_opt(&dir.join("tokenizer_config.json"))
                    .unwrap()
                    .unwrap();
                let src = cfg["chat_template"].as_str().unwrap();
                ChatTemplate::from_source(src, t.special_tokens().clone())
                    .unwrap()
                    .render(messages, &opts)
            } else {
                t.render(messages, &opts)
            };
            if let Some(want) = case.get("expected").and_then(Value::as_str) {
                let got = got.unwrap_or_else(|e| panic!("{model}/{name}: {e}"));
                assert_eq!(got, want, "{model}/{name}");
                let ids = tok.encode(&got, false).unwrap();
                let want_ids: Vec<u32> = case["expected_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids, want_ids, "{model}/{name} ids");
            } else {
                let want = case["expected_error"].as_str().unwrap();
                match got {
                    Err(ChatTemplateError::Raised(msg)) => {
                        assert_eq!(msg, want, "{model}/{name}")
                    }
                    other => panic!("{model}/{name}: expected raise_exception, got {other:?}"),
                }
            }
            n += 1;
        }
    }
    assert!(n >= 13, "only {n} cases");
}

#[test]
fn template_sources() {
    // chat_template.jinja wins over tokenizer_config.json (llama3_1 fixture has both).
    let t = ChatTemplate::from_model_dir(fixtures().join("llama3_1"))
        .unwrap()
        .unwrap();
    let out = t
        .render(
            &[serde_json::json!({"role": "user", "content": "hi"})],
            &RenderOptions::new(true),
        )
        .unwrap();
    assert!(out.contains("Cutting Knowledge Date"), "{out}");
    assert_eq!(t.special_tokens()["bos_token"], "<|begin_of_text|>");

    let tmp = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_model_dir(tmp.path()).unwrap().is_none());
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
            "chat_template": [
              {"name": "default", "template": "D{{ bos_token }}{{ messages|length }}"},
              {"name": "tool_use", "template": "T{{ tools|length }}{{ eos_token }}"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap().unwrap();
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "D<s>1");
    let opts = RenderOptions::default().with_tools(serde_json::json!([{"a": 1}, {"b": 2}]));
    assert_eq!(t.render(&msgs, &opts).unwrap(), "T2</s>");

    // processor-style chat_template.json as a last resort
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("chat_template.json"),
        r#"{"chat_template": "J{{ messages[0].content }}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap().unwrap();
    assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "Jhi");
}

#[test]
fn tojson_matches_python_json_dumps() {
    let v = serde_json::json!({
        "s": "é \"q\" \\ \n\t\u{1} 中 🙂 </script>", "i": 1, "f": 21.5, "small": 0.00001,
        "big": 1e16, "whole": 3.0, "neg": -2, "n": null, "t": true, "l": [], "d": {}, "nested": [1, [2, {"k": "v"}]]
    });
    let ctx = serde_json::json!({"v": v});
    // json.dumps(v, ensure_ascii=False)
    assert_eq!(
        render_str("{{ v | tojson }}", ctx.clone()).unwrap(),
        r#"{"s": "é \"q\" \\ \n\t\u0001 中 🙂 </script>", "i": 1, "f": 21.5, "small": 1e-05, "big": 1e+16, "whole": 3.0, "neg": -2, "n": null, "t": true, "l": [], "d": {}, "nested": [1, [2, {"k": "v"}]]}"#
    );
    // json.dumps(v["nested"], indent=2)
    assert_eq!(
        render_str("{{ v.nested | tojson(indent=2) }}", ctx.clone()).unwrap(),
        "[\n  1,\n  [\n    2,\n    {\n      \"k\": \"v\"\n    }\n  ]\n]"
    );
    // ensure_ascii / separators / sort_keys
    assert_eq!(
        render_str(
            "{{ {'b': 'é🙂', 'a': 1} | tojson(ensure_ascii=true, separators=(',', ':'), sort_keys=true) }}",
            ctx.clone()
        )
        .unwrap(),
        r#"{"a":1,"b":"\u00e9\ud83d\ude42"}"#
    );
    assert_eq!(py_float_repr(1e15), "1000000000000000.0");
    assert_eq!(py_float_repr(0.0001), "0.0001");
    assert_eq!(py_float_repr(1.5e-7), "1.5e-07");
    assert_eq!(
        py_float_repr(123456789012345678.0),
        "1.2345678901234568e+17"
    );
    assert_eq!(py_float_repr(-0.5), "-0.5");
}

#[test]
fn python_compat_features() {
    let ctx = serde_json::json!({"s": "  a,b,c  ", "flag": false, "items": [1, 2, 3, 4], "m": {"x": 1, "y": null}});
    let r = |src: &str| render_str(src, ctx.clone()).unwrap();
    assert_eq!(
        r("{{ s.strip().split(',')[-1] }}|{{ s.lstrip() }}|{{ s.startswith('  a') }}"),
        "c|a,b,c  |True"
    );
    assert_eq!(
        r("{{ 'x'.upper() }}{{ 'AbC'.lower() }}{{ 'a-b'.replace('-', '+') }}"),
        "Xabca+b"
    );
    assert_eq!(
        r("{{ none }}|{{ true }}|{{ flag }}|{{ [1, 'a', none] }}|{{ m }}"),
        "None|True|False|[1, 'a', None]|{'x': 1, 'y': None}"
    );
    assert_eq!(
        r("{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}"),
        "x=1;y=None;"
    );
    assert_eq!(r("{{ m.get('x') }}{{ m.get('z', 'd') }}"), "1d");
    assert_eq!(
        r("{% for i in items %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
        "12"
    );
    assert_eq!(r("{% for i in items %}{% if i is even %}{% continue %}{% endif %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}"), "1,3,");
    assert_eq!(r("{{ items[::-1] }}{{ items[1:3] }}"), "[4, 3, 2, 1][2, 3]");
    assert_eq!(r("{% if flag is false %}F{% endif %}{% if undefined_thing is not defined %}U{% endif %}"), "FU");
    assert_eq!(r("{% set ns = namespace(n=0) %}{% for i in items %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"), "10");
    // trim_blocks + lstrip_blocks
    assert_eq!(r("a\n    {% if true %}\nb\n    {% endif %}\nc"), "a\nb\nc");
    // trailing newline of the template is dropped, as in Jinja2
    assert_eq!(r("x\n"), "x");
    // {% generation %} blocks render their body
    assert_eq!(
        r("A{% generation %}B{% endgeneration %}C{%- generation -%} D {%- endgeneration %}"),
        "ABCD"
    );
}

#[test]
fn raise_exception_is_a_clean_error() {
    let err = render_str(
        "{{ raise_exception('Only user and assistant roles are supported!') }}",
        Value::Null,
    )
    .unwrap_err();
    assert!(matches!(err, ChatTemplateError::Raised(_)));
    assert_eq!(
        err.to_string(),
        "Only user and assistant roles are supported!"
    );
    let err = ChatTemplate::from_source("{{ foo( }}", Map::new()).unwrap_err();
    assert!(err.to_string().contains("syntax error"), "{err}");
    let err = render_str("{{ 1 + 'a' }}", Value::Null).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
    let t = ChatTemplate::from_source("x", Map::new()).unwrap();
    assert!(matches!(
        t.render(&[], &RenderOptions::default()),
        Err(ChatTemplateError::InvalidInput(_))
    ));
}

#[test]
fn message_normalisation() {
    let t = ChatTemplate::from_source(
        "{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}",
        Map::new(),
    )
    .unwrap();
    let msgs = [
        serde_json::json!({"role": "user", "content": "q"}),
        serde_json::json!({"role": "assistant", "content": null, "reasoning": "hmm", "tool_calls": null}),
    ];
    assert_eq!(
        t.render(&msgs, &RenderOptions::default()).unwrap(),
        "user:True:|;assistant:False:hmm|hmm;"
    );
    let t = ChatTemplate::from_source(
        "{{ tools is defined }}{{ tools is none }}{{ documents is none }}",
        Map::new(),
    )
    .unwrap();
    assert_eq!(
        t.render(&msgs[..1], &RenderOptions::default()).unwrap(),
        "TrueTrueTrue"
    );
}

#[test]
fn strftime() {
    // 2024-07-26 13:05:09 UTC, a Friday
    let ts = 1_721_999_109;
    assert_eq!(strftime_utc("%d %b %Y", ts, 0), "26 Jul 2024");
    assert_eq!(
        strftime_utc("%Y-%m-%d %H:%M:%S %A %B %j %p %I %-d %%", ts, 0),
        "2024-07-26 13:05:09 Friday July 208 PM 01 26 %"
    );
    assert_eq!(
        strftime_utc("%F %T %a %u %w", 0, 0),
        "1970-01-01 00:00:00 Thu 4 4"
    );
    let out = render_str("{{ strftime_now('%Y') }}", Value::Null).unwrap();
    assert_eq!(out.len(), 4);
    assert!(out.starts_with("20"));
}
