//! Speculative decoding through the HTTP API for requests with the API's
//! logits hooks, on llama-f32 with the tiny256 fixture tokenizer, drafted by
//! llama-q4-g64 (which keeps some drafts and rejects others): a constrained
//! greedy request (strict JSON schema, JSON object, regex, Lark grammar;
//! with and without logprobs) equals the same request without a drafter,
//! token for token, its output parses, and its usage shows drafted tokens;
//! sampled constrained requests follow the constraint; a thinking budget
//! with a schema speculates and equals the run without a drafter. The
//! engine-level tests are in speculative_hooks.rs.
mod common;

use futures_util::future::join_all;
use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::speculative::serve::DraftSpec;
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

const DRAFT: &str = "llama-q4-g64";

const TEMPLATE: &str = "{%- for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}\n{% endfor %}\
{%- if add_generation_prompt %}<|assistant|>{% endif %}";
/// A thinking model's template: the generation prompt opens the block.
const THINKING: &str = "{%- for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}\n{% endfor %}\
{%- if add_generation_prompt %}<|assistant|><think>\n{% endif %}";

/// llama-f32's (or the drafter's) weights with the tiny256 tokenizer and a template.
fn model_dir(fixture: &str, root: &std::path::Path, id: &str, template: &str) -> std::path::PathBuf {
    let m = root.join(id);
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
        std::os::unix::fs::symlink(common::fixture(&format!("models/{fixture}")).join(f), m.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(common::fixture("tokenizers/tiny256").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("chat_template.jinja"), template).unwrap();
    m
}

/// One server: `plain` and `spec` (drafted), `think-plain` and `think-spec`
/// (the thinking template).
fn base() -> &'static str {
    static BASE: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &BASE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let m = model_dir("llama-f32", dir.path(), "m", TEMPLATE);
            let t = model_dir("llama-f32", dir.path(), "t", THINKING);
            let list = [("plain", &m), ("spec", &m), ("think-plain", &t), ("think-spec", &t)];
            let mut cat = ModelCatalog::discover(&list.iter().map(|(id, d)| (Some(id.to_string()), d.to_path_buf())).collect::<Vec<_>>(), &[]).unwrap();
            for e in cat.entries.iter_mut().filter(|e| e.id.ends_with("spec")) {
                Arc::get_mut(e).unwrap().draft = Some(DraftSpec::new(common::fixture(&format!("models/{DRAFT}")), Some(3), None).unwrap());
            }
            let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 256, max_loaded_models: 4, idle_timeout: None, prefill_chunk: 512 };
            let worker = Worker::start(cfg, &cat).unwrap();
            let state = Arc::new(AppState { catalog: Arc::new(cat), worker, opts: ServerOptions::default() });
            (dir, common::serve(state))
        })
        .1
}

async fn post(path: &str, body: Value) -> Value {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "ok": {"type": "boolean"}
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": false
    })
}

/// The formats tried, and how each output is checked.
fn formats() -> Vec<(&'static str, Value)> {
    vec![
        ("json_schema", json!({"type": "json_schema", "json_schema": {"name": "w", "strict": true, "schema": schema()}})),
        ("json_object", json!({"type": "json_object"})),
        ("regex", json!({"type": "regex", "regex": "[a-z]{2,6}( [0-9]{1,3}){2,4}\\."})),
        ("grammar", json!({"type": "grammar", "grammar": "start: \"(\" item \")\" | \"(\" item \", \" item \")\"\nitem: /[a-z]{1,6}/ | /[0-9]{1,3}/"})),
    ]
}

fn check_output(kind: &str, text: &str, ctx: &str) {
    match kind {
        "json_schema" => {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {text:?}"));
            if let Err(e) = jsonschema::validator_for(&schema()).unwrap().validate(&v) {
                panic!("{ctx}: {v} does not validate: {e}");
            }
        }
        "json_object" => assert!(serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{ctx}: {e}: {text:?}")).is_object()),
        "regex" => assert!(regex::Regex::new(r"^[a-z]{2,6}( [0-9]{1,3}){2,4}\.$").unwrap().is_match(text), "{ctx}: {text:?}"),
        _ => assert!(regex::Regex::new(r"^\(([a-z]{1,6}|[0-9]{1,3})(, ([a-z]{1,6}|[0-9]{1,3}))?\)$").unwrap().is_match(text), "{ctx}: {text:?}"),
    }
}

fn completion(model: &str, prompt: &str, format: &Value, temperature: f32, seed: u64, logprobs: bool) -> Value {
    let mut b = json!({"model": model, "prompt": prompt, "max_tokens": 40, "temperature": temperature, "seed": seed, "response_format": format});
    if logprobs {
        b["logprobs"] = 3.into();
    }
    b
}

const PROMPTS: [&str; 3] = ["Weather as JSON:", "The quick brown fox", "user: What is the weather in Paris today?\nassistant:"];

/// Greedy constrained completions (four formats, three prompts, half with
/// logprobs) through a drafted model equal the same requests through the
/// model without a drafter, token for token (and logprobs within 1e-5);
/// every output parses; each speculated. The drafted requests run six at
/// once (batches mixing formats and logprobs rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_greedy_under_speculation_equals_plain_token_for_token() {
    let _g = common::mlx_lock();
    let mut cases = Vec::new();
    for (kind, f) in formats() {
        for (i, p) in PROMPTS.iter().enumerate() {
            cases.push((kind, f.clone(), *p, (i + cases.len()) % 2 == 0));
        }
    }
    let mut want = Vec::new();
    for (_, f, p, lp) in &cases {
        want.push(post("/v1/completions", completion("plain", p, f, 0.0, 0, *lp)).await);
    }
    // Six at a time: within the default spec_max_batch of 8.
    let mut got = Vec::new();
    for wave in cases.chunks(6) {
        got.extend(join_all(wave.iter().map(|(_, f, p, lp)| post("/v1/completions", completion("spec", p, f, 0.0, 0, *lp)))).await);
    }
    let (mut drafted, mut kept) = (0, 0);
    for ((kind, _, p, lp), (w, g)) in cases.iter().zip(want.iter().zip(&got)) {
        let ctx = format!("{kind}, {p:?}, logprobs {lp}");
        let (wc, gc) = (&w["choices"][0], &g["choices"][0]);
        assert_eq!(gc["token_ids"], wc["token_ids"], "{ctx}: {}", gc["text"]);
        assert_eq!(gc["text"], wc["text"], "{ctx}");
        assert_eq!(gc["finish_reason"], wc["finish_reason"], "{ctx}");
        check_output(kind, gc["text"].as_str().unwrap(), &ctx);
        if *lp {
            let lps = |c: &Value| -> Vec<f64> { c["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
            let (a, b) = (lps(gc), lps(wc));
            assert_eq!(a.len(), b.len(), "{ctx}");
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5), "{ctx}: {a:?} vs {b:?}");
            assert_eq!(gc["logprobs"]["tokens"], wc["logprobs"]["tokens"], "{ctx}");
        }
        let u = &g["usage"];
        let (d, a) = (u["drafted_tokens"].as_u64().unwrap_or_else(|| panic!("{ctx}: no draft counts: {u}")), u["accepted_tokens"].as_u64().unwrap());
        assert!(d > 0 && a <= d, "{ctx}: {a} of {d}: {}", gc["text"]);
        assert!(w["usage"].get("drafted_tokens").is_none());
        drafted += d;
        kept += a;
    }
    assert!(kept > 0 && kept < drafted, "{kept} of {drafted} kept");
}

/// Sampled constrained completions (temperature 1, 16 seeds per format,
/// eight at once) through the drafted model follow their constraint, and speculate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_constrained_under_speculation_follows_the_constraint() {
    let _g = common::mlx_lock();
    for (kind, f) in formats() {
        let mut outs = Vec::new();
        for wave in 0..2u64 {
            let seeds = wave * 8..wave * 8 + 8;
            outs.extend(join_all(seeds.map(|seed| post("/v1/completions", completion("spec", PROMPTS[seed as usize % 3], &f, 1.0, seed, seed % 2 == 0)))).await);
        }
        let (mut drafted, mut kept) = (0, 0);
        for (seed, v) in outs.iter().enumerate() {
            let ctx = format!("{kind}, seed {seed}");
            check_output(kind, v["choices"][0]["text"].as_str().unwrap(), &ctx);
            drafted += v["usage"]["drafted_tokens"].as_u64().unwrap();
            kept += v["usage"]["accepted_tokens"].as_u64().unwrap();
        }
        assert!(drafted > 0 && kept <= drafted, "{kind}: {kept} of {drafted}");
    }
}

/// A thinking template with `thinking_budget` and a JSON schema (the hook
/// that lets the model think, force-closes the block and then constrains):
/// greedy chat through the drafted model equals the model without a
/// drafter (reasoning, content, logprobs), and speculated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_budget_with_a_schema_under_speculation_equals_plain() {
    let _g = common::mlx_lock();
    let body = |model: &str, budget: u32| {
        json!({"model": model, "max_tokens": 48, "temperature": 0, "thinking_budget": budget, "logprobs": true, "top_logprobs": 2,
               "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": true, "schema": schema()}}})
    };
    for budget in [0, 5, 12] {
        let w = post("/v1/chat/completions", body("think-plain", budget)).await;
        let g = post("/v1/chat/completions", body("think-spec", budget)).await;
        let (wm, gm) = (&w["choices"][0]["message"], &g["choices"][0]["message"]);
        assert_eq!(gm["content"], wm["content"], "budget {budget}");
        assert_eq!(gm["reasoning_content"], wm["reasoning_content"], "budget {budget}");
        let toks = |v: &Value| -> Vec<(String, f64)> {
            v["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| (t["token"].as_str().unwrap().to_string(), t["logprob"].as_f64().unwrap())).collect()
        };
        let (a, b) = (toks(&g), toks(&w));
        assert_eq!(a.len(), b.len(), "budget {budget}");
        for (x, y) in a.iter().zip(&b) {
            assert!(x.0 == y.0 && (x.1 - y.1).abs() <= 1e-5, "budget {budget}: {x:?} vs {y:?}");
        }
        if budget > 0 {
            assert!(wm["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()), "budget {budget}: {wm}");
        }
        check_output("json_schema", gm["content"].as_str().unwrap(), &format!("budget {budget}"));
        assert!(g["usage"]["drafted_tokens"].as_u64().unwrap() > 0, "budget {budget}: {}", g["usage"]);
    }
}
