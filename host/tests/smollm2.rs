//! The real default model (SmolLM2-135M-Instruct, converted from its GGUF by
//! `rmlx convert --from-gguf`): rmlx's greedy tokens equal mlx-lm's on the same
//! files, its chat prompt tokenizes the same, and it knows Paris.
//! Needs `make default-model` and `make dev-venv` (both run by `make test`).
mod common;

use rmlx::engine::{generate::generate, sampler, GenerateOptions, LoadedModel, Session};
use rmlx::model::text::TextSide;
use std::path::PathBuf;
use std::process::Command;

use common::default_model;

fn mlx_lm_goldens(model: &PathBuf) -> serde_json::Value {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(py.exists(), "no dev venv: run `make dev-venv`");
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(py)
        .arg(common::repo().join("tests/goldens/smollm2_goldens.py"))
        .arg(model)
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "mlx-lm golden script failed");
    serde_json::from_str(&std::fs::read_to_string(out.path()).unwrap()).unwrap()
}

const MARGIN: f32 = 1e-3;

#[test]
fn greedy_tokens_equal_mlx_lm_on_the_same_files() {
    let model_dir = default_model();
    let golden = mlx_lm_goldens(&model_dir);
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut model = LoadedModel::load(&model_dir, &reg).unwrap();
    let text = TextSide::load(&model.dir).unwrap();
    let mut compared = 0;
    for case in golden["prompts"].as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt"].clone()).unwrap();
        let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let margins: Vec<f32> = serde_json::from_value(case["margins"].clone()).unwrap();
        let chat = case["kind"] == "chat";
        let ours = text.prompt_ids(case["text"].as_str().unwrap(), chat, None).unwrap();
        assert_eq!(ours, prompt, "prompt ids for {}", case["text"]);
        // Teacher-forced: the same context at every step.
        let mut session = Session::new(&mut model);
        let mut logits = session.prefill(&prompt).unwrap();
        for (i, want) in tokens.iter().enumerate() {
            if margins[i] > MARGIN {
                assert_eq!(sampler::argmax(&logits), *want, "{} step {i}", case["text"]);
                compared += 1;
            }
            logits = session.step(*want).unwrap();
        }
        // Free-running greedy generation, as `rmlx generate` does, up to EOS.
        let opts = GenerateOptions {
            max_tokens: tokens.len(),
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop_ids: text.eos_ids.clone(),
            prefill_chunk: 512,
        };
        let out = generate(&mut model, &prompt, &opts, |_| {}).unwrap();
        let until_eos: Vec<u32> = tokens.iter().copied().take_while(|t| !text.eos_ids.contains(t)).collect();
        assert_eq!(out.tokens, until_eos, "free-running greedy for {}", case["text"]);
    }
    assert!(compared > 80, "only {compared} steps above the margin");
}

#[test]
fn knows_the_capital_of_france() {
    let model_dir = default_model();
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "--chat"])
        .args(["--model", model_dir.to_str().unwrap()])
        .args(["--prompt", "What is the capital of France?", "--temperature", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let answer = v["text"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["finish_reason"], "stop");
}
