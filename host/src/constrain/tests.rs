//! Drives constraints with a fake "model" that samples random allowed tokens (seeded) over
//! the real fixture tokenizers, and checks every output against the spec.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::*;
use crate::api::tools::{ToolEvent, ToolFormat};
use crate::model::tokenizer::test_tokenizer;

/// Texts that close structures, tried in order by the closing policy.
const CLOSERS: [&str; 7] = ["\"", "}", "]", ")", "</function>", "\n</tool_call>", "\n```"];

/// Closers for a tool-call format: its free-text string terminator comes first (a quote
/// would just be more text there).
fn closers(format: ToolFormat) -> Vec<&'static str> {
    let first = match format {
        ToolFormat::Qwen3Coder => Some("\n</parameter>\n"),
        ToolFormat::FunctionGemma => Some("<escape>"),
        ToolFormat::Gemma4 => Some("<|\"|>"),
        _ => None,
    };
    first.into_iter().chain(CLOSERS).collect()
}

struct Run {
    text: String,
    steps: usize,
    mask_times: Vec<Duration>,
}

/// Random allowed tokens for `explore` steps, then a "closing" policy (EOS, else the
/// shortest allowed tokens) so that outputs finish. Logits are one row wider than the
/// vocabulary, as model heads often are.
fn drive(tok: &Tokenizer, spec: ConstraintSpec, eos: &[u32], seed: u64, explore: usize) -> Run {
    drive_with(tok, spec, eos, seed, explore, &CLOSERS)
}

fn drive_with(
    tok: &Tokenizer,
    spec: ConstraintSpec,
    eos: &[u32],
    seed: u64,
    explore: usize,
    closers: &[&str],
) -> Run {
    let mut c = Constraint::with_eos(tok, spec, eos).unwrap();
    let f = ConstraintFactory::for_tokenizer(tok, eos).unwrap();
    let vocab = f.vocab_size();
    let eos_set: Vec<u32> = if eos.is_empty() {
        vec![tok.eos_token_id().unwrap()]
    } else {
        eos.to_vec()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::new();
    let mut mask_times = Vec::new();
    let mut logits = vec![0f32; vocab + 64];
    for step in 0..2000 {
        if c.is_finished() {
            break;
        }
        logits.iter_mut().for_each(|l| *l = 0.0);
        let t0 = Instant::now();
        c.apply(&mut logits);
        mask_times.push(t0.elapsed());
        assert!(logits[vocab..].iter().all(|l| *l == f32::NEG_INFINITY));
        let allowed: Vec<u32> = (0..vocab as u32)
            .filter(|&i| logits[i as usize] == 0.0)
            .collect();
        assert!(!allowed.is_empty(), "nothing allowed after {:?}", tok.decode(&ids, false));
        let pick = if step < explore {
            allowed[rng.random_range(0..allowed.len())]
        } else if let Some(&e) = allowed.iter().find(|t| eos_set.contains(t)) {
            e
        } else if let Some(toks) = closers.iter().find_map(|s| {
            let toks = tok.encode(s, false).unwrap();
            (c.validate_tokens(&toks).unwrap() == toks.len()).then_some(toks)
        }) {
            // Close the innermost open structure.
            for &t in &toks[..toks.len() - 1] {
                c.commit(t).unwrap();
                ids.push(t);
            }
            *toks.last().unwrap()
        } else {
            // Prefer short tokens that close things.
            let short: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|&t| {
                    let s = tok.decode(&[t], false).unwrap_or_default();
                    !s.is_empty() && s.len() <= 2 && !s.contains(char::is_alphanumeric)
                })
                .collect();
            let pool = if short.is_empty() { &allowed } else { &short };
            pool[rng.random_range(0..pool.len())]
        };
        c.commit(pick).unwrap();
        if eos_set.contains(&pick) {
            break;
        }
        ids.push(pick);
    }
    assert!(
        c.is_finished(),
        "did not finish: {:?}",
        tok.decode(&ids, false)
    );
    Run {
        text: tok.decode(&ids, false).unwrap(),
        steps: ids.len(),
        mask_times,
    }
}

fn validate(schema: &Value, v: &Value) {
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(v) {
        panic!("{v} does not validate against {schema}: {e}");
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"],
                "additionalProperties": false
            },
            "score": {"type": "number"},
            "active": {"type": "boolean"},
            "kind": {"anyOf": [{"type": "null"}, {"const": "x"}]}
        },
        "required": ["name", "age", "address"],
        "additionalProperties": false
    })
}

#[test]
fn json_schema_outputs_validate() {
    for model in ["qwen3", "llama3_1"] {
        let tok = test_tokenizer(model);
        let schema = person_schema();
        for seed in 0..12 {
            let r = drive(
                &tok,
                ConstraintSpec::JsonSchema {
                    schema: schema.clone(),
                    strict: true,
                },
                &[],
                seed,
                25,
            );
            let v: Value = serde_json::from_str(&r.text)
                .unwrap_or_else(|e| panic!("{model} seed {seed}: not JSON ({e}): {:?}", r.text));
            validate(&schema, &v);
        }
    }
}

#[test]
fn json_object_outputs_parse() {
    let tok = test_tokenizer("qwen3");
    for seed in 0..10 {
        let r = drive(&tok, ConstraintSpec::JsonObject, &[], seed, 20);
        let v: Value = serde_json::from_str(&r.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text));
        assert!(v.is_object(), "{v}");
    }
}

#[test]
fn regex_and_lark() {
    let tok = test_tokenizer("llama3_1");
    let rx = regex::Regex::new(r"^(?:[0-9]{3}-[a-z]{2,5}( ok)?)$").unwrap();
    for seed in 0..10 {
        let r = drive(
            &tok,
            ConstraintSpec::Regex(r"[0-9]{3}-[a-z]{2,5}( ok)?".into()),
            &[],
            seed,
            5,
        );
        assert!(rx.is_match(&r.text), "{:?}", r.text);
    }
    let lark = r#"
start: "answer: " ("yes" | "no") " because " REASON
REASON: /[a-z ]{1,20}\./
"#;
    let rx = regex::Regex::new(r"^answer: (yes|no) because [a-z ]{1,20}\.$").unwrap();
    for seed in 0..10 {
        let r = drive(&tok, ConstraintSpec::Lark(lark.into()), &[], seed, 8);
        assert!(rx.is_match(&r.text), "{:?}", r.text);
    }
}

#[test]
fn llama_eos_set_ends_output() {
    // Llama 3.1's model EOS ids: any may end the constrained output.
    let tok = test_tokenizer("llama3_1");
    let eos = [128001, 128008, 128009];
    let r = drive(&tok, ConstraintSpec::Regex("a{3}".into()), &eos, 1, 0);
    assert_eq!(r.text, "aaa");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["c", "f"]}
            },
            "required": ["city"],
            "additionalProperties": false
        }}},
        {"type": "function", "function": {"name": "no_args", "parameters": {"type": "object", "properties": {}}}},
        {"name": "search", "input_schema": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 15}, "exact": {"type": "boolean"}},
            "required": ["query", "exact"]}}
    ])
}

/// Parses `text` with the format's own tool parser: every call must name an allowed tool
/// and its arguments validate against that tool's schema.
fn check_calls(format: ToolFormat, text: &str, allowed: &[&str], parallel: bool) -> usize {
    let tools = tools();
    let mut p = format.parser();
    p.set_tools(&tools);
    let mut ev = p.feed(text);
    ev.extend(p.finish());
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in ev {
        match e {
            ToolEvent::Text(t) => assert!(t.trim().is_empty(), "{format:?}: stray text {t:?} in {text:?}"),
            ToolEvent::CallStart { name, .. } => calls.push((name, String::new())),
            ToolEvent::CallArgs { delta, .. } => calls.last_mut().unwrap().1.push_str(&delta),
            ToolEvent::CallEnd { .. } => {}
        }
    }
    assert!(!calls.is_empty(), "{format:?}: no call in {text:?}");
    if !parallel {
        assert_eq!(calls.len(), 1, "{text:?}");
    }
    let schemas = crate::api::tools::tool_schemas(&tools);
    for (name, args) in &calls {
        assert!(allowed.contains(&name.as_str()), "{name} not allowed");
        let v: Value = serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{format:?}: args not JSON ({e}): {args:?} in {text:?}"));
        let schema = &schemas.iter().find(|(n, _)| n == name).unwrap().1;
        validate(schema, &v);
    }
    calls.len()
}

#[test]
fn tool_calls_in_every_format_parse_back() {
    let tok = test_tokenizer("qwen3");
    for format in [
        ToolFormat::Hermes,
        ToolFormat::Qwen3Coder,
        ToolFormat::Llama3Json,
        ToolFormat::MistralV3,
        ToolFormat::Mistral,
        ToolFormat::GemmaToolCode,
        ToolFormat::FunctionGemma,
        ToolFormat::Gemma4,
    ] {
        for seed in 0..6 {
            let parallel = seed % 2 == 1 && format != ToolFormat::Llama3Json;
            let spec = ConstraintSpec::ToolCall {
                format,
                tools: tools(),
                name: None,
                parallel,
            };
            let r = drive_with(&tok, spec, &[], seed, 12, &closers(format));
            check_calls(format, &r.text, &["get_weather", "no_args", "search"], parallel);
        }
        // A named function is the only one that can be called.
        for seed in 0..3 {
            let spec = ConstraintSpec::ToolCall {
                format,
                tools: tools(),
                name: Some("search".into()),
                parallel: false,
            };
            let r = drive_with(&tok, spec, &[], 100 + seed, 12, &closers(format));
            check_calls(format, &r.text, &["search"], false);
        }
    }
}

#[test]
fn tool_call_grammar_uses_special_tokens() {
    // Llama's <|python_tag|> is special; Qwen's <tool_call> is an ordinary added token.
    let llama = test_tokenizer("llama3_1");
    let g = lark_for_tool_call(&llama, ToolFormat::MistralV3, &tools(), None, false).unwrap();
    assert!(g.contains("\"[TOOL_CALLS]\""), "{g}");
    let qwen = test_tokenizer("qwen3");
    let g = lark_for_tool_call(&qwen, ToolFormat::Hermes, &tools(), None, true).unwrap();
    assert!(g.contains("\"<tool_call>\""), "{g}");
    let gemma = test_tokenizer("gemma3");
    let id = gemma.token_to_id("<start_of_turn>").unwrap();
    assert!(gemma.is_special(id));
    assert!(lark_for_tool_call(&qwen, ToolFormat::Hermes, &tools(), Some("nope"), false).is_err());
}

#[test]
fn bad_specs_are_errors() {
    let tok = test_tokenizer("qwen3");
    assert!(Constraint::new(&tok, ConstraintSpec::Regex("(".into())).is_err());
    assert!(Constraint::new(&tok, ConstraintSpec::Lark("start: nope".into())).is_err());
    assert!(Constraint::new(
        &tok,
        ConstraintSpec::JsonSchema {
            schema: json!("x"),
            strict: true
        }
    )
    .is_err());
    // A disallowed token is refused.
    let mut c = Constraint::new(&tok, ConstraintSpec::Regex("a+".into())).unwrap();
    let b = tok.encode("b", false).unwrap()[0];
    assert!(!c.is_allowed(b).unwrap());
    assert!(c.commit(b).is_err());
}

#[test]
fn gemma_byte_fallback_vocab() {
    let tok = test_tokenizer("gemma3");
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 8}}, "required": ["n", "s"], "additionalProperties": false});
    for seed in 0..5 {
        let r = drive(
            &tok,
            ConstraintSpec::JsonSchema {
                schema: schema.clone(),
                strict: true,
            },
            &[1, 106],
            seed,
            10,
        );
        let v: Value = serde_json::from_str(&r.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text));
        validate(&schema, &v);
    }
}

#[test]
fn mask_speed_on_a_150k_vocab() {
    let tok = test_tokenizer("qwen3");
    // Warm the factory cache (built once per tokenizer).
    let t0 = Instant::now();
    let _ = ConstraintFactory::for_tokenizer(&tok, &[]).unwrap();
    let build = t0.elapsed();
    let mut all = Vec::new();
    for seed in 0..4 {
        let t = Instant::now();
        let _c = Constraint::new(
            &tok,
            ConstraintSpec::JsonSchema {
                schema: person_schema(),
                strict: true,
            },
        )
        .unwrap();
        let compile = t.elapsed();
        let r = drive(
            &tok,
            ConstraintSpec::JsonSchema {
                schema: person_schema(),
                strict: true,
            },
            &[],
            seed,
            30,
        );
        eprintln!("compile {compile:?}, {} steps", r.steps);
        all.extend(r.mask_times);
    }
    all.sort();
    let mean = all.iter().sum::<Duration>() / all.len() as u32;
    let p50 = all[all.len() / 2];
    let p99 = all[all.len() * 99 / 100];
    eprintln!(
        "factory build {build:?}; mask+apply over {} steps: mean {mean:?}, p50 {p50:?}, p99 {p99:?}, max {:?}",
        all.len(),
        all.last().unwrap()
    );
    // Generous bound for unoptimised test builds on a loaded 2-core machine.
    assert!(mean < Duration::from_millis(20), "mean mask time {mean:?}");
}

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
