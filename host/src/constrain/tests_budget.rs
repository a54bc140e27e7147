//! Limits on specs (hostile schemas and grammars are short errors), the compiled-grammar
//! cache, and finishing within the token budget with a uniformly random "model".

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use anyhow::Result;
use serde_json::{json, Value};

use super::tests::{check_calls, person_schema, tools, validate};
use super::*;
use crate::model::tokenizer::{test_tokenizer, Tokenizer};

fn assert_short_spec_error(r: Result<Constraint>, case: &str) {
    let e = match r {
        Ok(_) => panic!("{case}: compiled"),
        Err(e) => e,
    };
    let spec = e.downcast_ref::<SpecError>().unwrap_or_else(|| panic!("{case}: not a SpecError: {e:#}"));
    let m = &spec.0;
    assert!(m.len() <= 300 && !m.contains('\n'), "{case}: {m:?}");
    for internal in ["<state>", "Parser:", "Tokens:", "lexer_cost", "NoExtensionBias", "grm_prefix"] {
        assert!(!m.contains(internal), "{case}: parser internals in {m:?}");
    }
}

#[test]
fn specs_that_cannot_be_compiled_are_short_errors() {
    let tok = test_tokenizer("qwen3");
    let schema = |s: Value| ConstraintSpec::JsonSchema { schema: s, strict: true };
    let mut deep = json!({"type": "string"});
    for _ in 0..100 {
        deep = json!({"type": "array", "items": deep});
    }
    let cases: Vec<(&str, ConstraintSpec)> = vec![
        ("$ref to the root", schema(json!({"$ref": "#"}))),
        ("self-referencing $defs", schema(json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))),
        ("mutual $defs", schema(json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))),
        ("regex a{1000000}", ConstraintSpec::Regex("a{1000000}".into())),
        ("nested regex repeats", ConstraintSpec::Regex("(a{1000}b){1000}".into())),
        ("pattern", schema(json!({"type": "string", "pattern": "^a{1000000}$"}))),
        ("minItems", schema(json!({"type": "array", "minItems": 1000000}))),
        ("maxItems", schema(json!({"type": "array", "maxItems": 5000000}))),
        ("minLength", schema(json!({"type": "string", "minLength": 1000000}))),
        ("deep schema", schema(deep)),
        ("deep grammar", ConstraintSpec::Lark(format!("start: {}\"a\"{}", "(".repeat(500), ")".repeat(500)))),
        ("grammar repeat", ConstraintSpec::Lark("start: \"a\"{1000000}".into())),
        ("grammar loop", ConstraintSpec::Lark("start: a\na: a".into())),
        (
            "recursive tool",
            ConstraintSpec::ToolCall {
                format: ToolFormat::Hermes,
                tools: json!([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]),
                name: None,
                parallel: false,
            },
        ),
    ];
    for (case, spec) in cases {
        assert_short_spec_error(Constraint::new(&tok, spec), case);
    }
}

#[test]
fn bounded_specs_still_compile() {
    let tok = test_tokenizer("qwen3");
    // Productive recursion (a tree), counts at the limits, and moderate nesting are fine.
    let tree = json!({"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}}, "required": ["v"], "additionalProperties": false}}, "$ref": "#/$defs/n"});
    Constraint::new(&tok, ConstraintSpec::JsonSchema { schema: tree, strict: true }).unwrap();
    let big = json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": limits::MAX_COUNT}, "a": {"type": "array", "maxItems": 1000}}});
    Constraint::new(&tok, ConstraintSpec::JsonSchema { schema: big, strict: true }).unwrap();
    Constraint::new(&tok, ConstraintSpec::Regex("[0-9]{3}-(a{10}){100}".into())).unwrap();
    let mut deep = json!({"type": "integer"});
    for _ in 0..20 {
        deep = json!({"type": "array", "items": deep, "maxItems": 1});
    }
    Constraint::new(&tok, ConstraintSpec::JsonSchema { schema: deep, strict: true }).unwrap();
}

#[test]
fn pattern_repeats_multiply_through_groups() {
    assert!(limits::check_pattern("a{10000}", "x").is_ok());
    assert!(limits::check_pattern("a{10001}", "x").is_err());
    assert!(limits::check_pattern("(a{100}){101}", "x").is_err());
    assert!(limits::check_pattern("(a{100}|b){100}", "x").is_ok());
    assert!(limits::check_pattern("[{]{5}\\{99999}x{3,}", "x").is_ok());
    assert!(limits::check_pattern("a{2,99999999999999999999999}", "x").is_err());
    assert!(limits::check_pattern(&"(".repeat(100), "x").is_err());
}

#[test]
fn compiled_grammars_are_cached_per_key_and_spec() {
    let tok = test_tokenizer("tiny256");
    let f = ConstraintFactory::for_tokenizer(&tok, &[]).unwrap();
    let key = "model:cache-test";
    let s1 = ConstraintSpec::JsonSchema { schema: person_schema(), strict: true };
    let s2 = ConstraintSpec::JsonSchema { schema: json!({"type": "object", "properties": {"b": {"type": "integer"}}}), strict: true };
    f.constraint_cached(key, &s1).unwrap();
    f.constraint_cached(key, &s1).unwrap();
    assert_eq!(cache::compiled_count(key), 1);
    f.constraint_cached(key, &s2).unwrap();
    assert_eq!(cache::compiled_count(key), 2);
    // A failing spec is not cached, and fails again.
    let bad = ConstraintSpec::Regex("a{1000000}".into());
    assert!(f.constraint_cached(key, &bad).is_err());
    assert!(f.constraint_cached(key, &bad).is_err());
    assert_eq!(cache::compiled_count(key), 2);
    // Each constraint is fresh: two runs from the cached grammar are independent.
    let mut a = f.constraint_cached(key, &s2).unwrap();
    let b = f.constraint_cached(key, &s2).unwrap();
    a.commit(tok.encode("{", false).unwrap()[0]).unwrap();
    assert!(!b.is_finished());
    let mut b = b;
    assert!(b.is_allowed(tok.encode("{", false).unwrap()[0]).unwrap());
}

/// A "model" that samples uniformly among the allowed tokens (random weights know
/// nothing of JSON), with `budget` tokens: the output must be complete within them.
fn random_within(tok: &Tokenizer, spec: ConstraintSpec, seed: u64, budget: usize) -> String {
    let f = ConstraintFactory::for_tokenizer(tok, &[]).unwrap();
    let mut c = f.constraint(&spec).unwrap();
    let eos = tok.eos_token_id().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::new();
    let mut logits = vec![0f32; f.vocab_size()];
    for step in 0..budget {
        if c.is_finished() {
            break;
        }
        logits.iter_mut().for_each(|l| *l = 0.0);
        c.try_apply_within(&mut logits, budget - step).unwrap();
        let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
        assert!(!allowed.is_empty());
        let t = allowed[rng.random_range(0..allowed.len())];
        if t == eos {
            break;
        }
        c.commit(t).unwrap();
        ids.push(t);
    }
    let text = tok.decode(&ids, false).unwrap();
    assert!(c.is_finished() || c.is_accepting(), "seed {seed}: not complete in {budget} tokens: {text:?}");
    text
}

fn small_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "unit"],
        "additionalProperties": false
    })
}

#[test]
fn random_model_completes_within_budget() {
    let tok = test_tokenizer("tiny256");
    for seed in 0..20 {
        let t = random_within(&tok, ConstraintSpec::JsonSchema { schema: small_schema(), strict: true }, seed, 40);
        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("seed {seed}: {e}: {t:?}"));
        validate(&small_schema(), &v);
        let t = random_within(&tok, ConstraintSpec::JsonObject, seed, 40);
        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("seed {seed}: {e}: {t:?}"));
        assert!(v.is_object());
        // Compact layout: no newlines (in strings they are escaped).
        assert!(!t.contains('\n'), "{t:?}");
        for (name, parallel) in [(Some("get_weather"), false), (None, false), (None, true)] {
            let spec = ConstraintSpec::ToolCall { format: ToolFormat::Hermes, tools: tools(), name: name.map(Into::into), parallel };
            let t = random_within(&tok, spec, seed, 40);
            let allowed = match name {
                Some(n) => vec![n],
                None => vec!["get_weather", "no_args", "search"],
            };
            check_calls(ToolFormat::Hermes, &t, &allowed, parallel);
        }
    }
    // Big vocabularies too.
    for (model, seed) in [("qwen3", 1), ("llama3_1", 2)] {
        let tok = test_tokenizer(model);
        let t = random_within(&tok, ConstraintSpec::JsonSchema { schema: person_schema(), strict: true }, seed, 40);
        validate(&person_schema(), &serde_json::from_str(&t).unwrap_or_else(|e| panic!("{model}: {e}: {t:?}")));
    }
}

#[test]
fn json_layout_is_compact_even_when_the_caller_asks_otherwise() {
    let tok = test_tokenizer("qwen3");
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
        "x-guidance": {"whitespace_flexible": true, "whitespace_pattern": "[ \\n]*"}});
    let mut c = Constraint::new(&tok, ConstraintSpec::JsonSchema { schema, strict: true }).unwrap();
    let ws = tok.encode("{\n", false).unwrap();
    assert!(c.validate_tokens(&ws).unwrap() < ws.len(), "newline after {{ allowed");
    let ok = tok.encode("{\"a\": 1}", false).unwrap();
    assert_eq!(c.validate_tokens(&ok).unwrap(), ok.len());
}
