//! Image chats through the server's HTTP API against an mlx-vlm serve
//! golden (api_images_*.rs): a tiny vision fixture with a word-level
//! tokenizer served in process on port 0, and a golden.json made by a
//! scripts/dev/*_golden.py script from mlx-vlm's `stream_generate` (per
//! case: the prompt's `parts`, text or an image of tests/fixtures/images,
//! its `prompt_ids`, the greedy `tokens` and each step's `top5`).
use base64::Engine as _;
use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// A model fixture served under one id, with its serve golden.
pub struct ImageApi {
    /// The model's id in requests.
    pub id: &'static str,
    pub golden: Value,
    /// The fixture's vocabulary: token string -> id.
    vocab: HashMap<String, u32>,
    /// The model's end-of-sequence ids (config.json's `eos_token_id`).
    eos: Vec<u32>,
    base: String,
}

impl ImageApi {
    /// Serves fixture `model` as `id`; `golden` is its golden.json
    /// (both relative to tests/fixtures).
    pub fn start(id: &'static str, model: &str, golden: &str) -> Self {
        let golden: Value = serde_json::from_slice(&std::fs::read(super::fixture(golden)).unwrap()).unwrap();
        let t: Value = serde_json::from_slice(&std::fs::read(super::fixture(model).join("tokenizer.json")).unwrap()).unwrap();
        let vocab = t["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u32)).collect();
        let c: Value = serde_json::from_slice(&std::fs::read(super::fixture(model).join("config.json")).unwrap()).unwrap();
        let eos = match c.get("eos_token_id").or_else(|| c["text_config"].get("eos_token_id")) {
            Some(Value::Array(ids)) => ids.iter().map(|i| i.as_u64().unwrap() as u32).collect(),
            Some(i) => i.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
            None => vec![],
        };
        let catalog = ModelCatalog::discover(&[(Some(id.into()), super::fixture(model))], &[]).unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: super::plugins_dir(), max_queue_depth: 16, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        let base = super::serve(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() }));
        ImageApi { id, golden, vocab, eos, base }
    }

    /// POSTs `body` to `path`: the status and the JSON answer.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new().post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    fn token_id(&self, token: &str) -> u32 {
        *self.vocab.get(token).unwrap_or_else(|| panic!("token {token:?} is not in the fixture's vocabulary"))
    }

    /// Every golden case as mlx-vlm: through the OpenAI route (`image_url`
    /// parts) the prompt length, the greedy tokens and every step's top-5
    /// log-probs (within 1e-4); through the Anthropic route (`image`
    /// blocks) the same text and prompt length, and count_tokens counts
    /// the same prompt. mlx-vlm's golden runs its steps past an
    /// end-of-sequence token; the server stops there (finish reason
    /// `stop`, not emitted), so the steps before it are compared.
    pub async fn assert_chats_as_mlx_vlm(&self) {
        let g = &self.golden;
        let steps = g["steps"].as_u64().unwrap();
        for (name, case) in g["cases"].as_object().unwrap() {
            let prompt_len = case["prompt_ids"].as_array().unwrap().len();
            let body = json!({"model": self.id, "max_tokens": steps, "temperature": 0, "logprobs": true, "top_logprobs": 5,
                "messages": [{"role": "user", "content": openai_parts(case)}]});
            let (s, v) = self.post("/v1/chat/completions", body).await;
            assert_eq!(s, 200, "{name}: {v}");
            assert_eq!(v["usage"]["prompt_tokens"], prompt_len, "{name}: {v}");
            let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
            let tokens: Vec<u32> = content.iter().map(|t| self.token_id(t["token"].as_str().unwrap())).collect();
            let mut want: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let ends = want.iter().position(|t| self.eos.contains(t));
            want.truncate(ends.unwrap_or(want.len()));
            assert_eq!(tokens, want, "{name}: greedy tokens");
            let finish = if ends.is_some() { "stop" } else { "length" };
            assert_eq!(v["choices"][0]["finish_reason"], finish, "{name}: {v}");
            let mut worst = 0f64;
            for (step, (got, want)) in content.iter().zip(case["top5"].as_array().unwrap()).enumerate() {
                let got: Vec<(u32, f64)> =
                    got["top_logprobs"].as_array().unwrap().iter().map(|t| (self.token_id(t["token"].as_str().unwrap()), t["logprob"].as_f64().unwrap())).collect();
                let want: Vec<(u32, f64)> = want.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap())).collect();
                for ((gi, gl), (wi, wl)) in got.iter().zip(&want) {
                    assert_eq!(gi, wi, "{name} step {step}: top-5 {got:?} vs mlx-vlm {want:?}");
                    assert!((gl - wl).abs() < 1e-4, "{name} step {step}: logprob of {gi}: {gl} vs mlx-vlm {wl}");
                    worst = worst.max((gl - wl).abs());
                }
            }
            eprintln!("{name}: {prompt_len} prompt tokens, {} steps, top-5 logprobs within {worst:.1e} of mlx-vlm", content.len());
            let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();

            // Anthropic: the same prompt, the same answer.
            let body = json!({"model": self.id, "max_tokens": steps, "temperature": 0, "messages": [{"role": "user", "content": anthropic_blocks(case)}]});
            let (s, m) = self.post("/v1/messages", body.clone()).await;
            assert_eq!(s, 200, "{name}: {m}");
            assert_eq!(m["usage"]["input_tokens"], prompt_len, "{name}: {m}");
            assert_eq!(m["content"][0]["text"].as_str().unwrap(), text, "{name}: {m}");
            assert_eq!(m["stop_reason"], if ends.is_some() { "end_turn" } else { "max_tokens" }, "{name}: {m}");
            let (s, c) = self.post("/v1/messages/count_tokens", body).await;
            assert_eq!(s, 200, "{name}: {c}");
            assert_eq!(c["input_tokens"], prompt_len, "{name}: count_tokens {c}");
        }
    }
}

/// Image `name` of tests/fixtures/images in base64.
pub fn b64(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(super::fixture("images").join(name)).unwrap())
}

/// A golden case's parts as OpenAI content parts (images as data URLs).
pub fn openai_parts(case: &Value) -> Vec<Value> {
    let parts = case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap());
    parts
        .map(|p| match p.ends_with(".png") {
            true => json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(p))}}),
            false => json!({"type": "text", "text": p}),
        })
        .collect()
}

/// The same as Anthropic content blocks.
pub fn anthropic_blocks(case: &Value) -> Vec<Value> {
    let parts = case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap());
    parts
        .map(|p| match p.ends_with(".png") {
            true => json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(p)}}),
            false => json!({"type": "text", "text": p}),
        })
        .collect()
}
