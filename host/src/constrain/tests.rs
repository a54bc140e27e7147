//! Drives constraints with a fake "model" that samples random allowed tokens (seeded) over
//! the real fixture tokenizers, and checks every output against the spec.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::*;
use crate::api::tools::{ToolEvent, ToolFormat};
use crate::model::tokenizer::{test_tokenizer, Tokenizer};

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

pub(super) fn validate(schema: &Value, v: &Value) {
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(v) {
        panic!("{v} does not validate against {schema}: {e}");
    }
}

pub(super) fn person_schema() -> Value {
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

pub(super) fn tools() -> Value {
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
pub(super) fn check_calls(format: ToolFormat, text: &str, allowed: &[&str], parallel: bool) -> usize {
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
