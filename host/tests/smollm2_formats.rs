//! The real default model (SmolLM2-135M-Instruct) converted by `rmlx convert`
//! to q8, q4, mxfp4 and nvfp4: on each, rmlx's greedy tokens equal mlx-lm's on
//! the same files (teacher-forced, skipping near ties in mlx-lm's logits), and
//! free-running `generate` agrees up to the first near tie.
//! Kept short for CPU time (one chat and one raw prompt, 12 tokens each;
//! `tests/goldens/smollm2_formats_goldens.py`).
//! Needs `make default-model` and `make dev-venv` (both run by `make test`).
mod common;

use rmlx::convert::mlx::{convert_dir, MlxOptions};
use rmlx::engine::{generate::generate, sampler, GenerateOptions, LoadedModel, Session};
use rmlx::model::text::TextSide;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Steps where mlx-lm's top-1/top-2 logit margin is at most this are not
/// compared: there the order of float operations decides the argmax.
const MARGIN: f32 = 1e-2;

const FORMATS: &[&str] = &["q8", "q4", "mxfp4", "nvfp4"];

use common::default_model;

fn mlx_lm_goldens(dirs: &[PathBuf], out: &Path) -> serde_json::Value {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(py.exists(), "no dev venv: run `make dev-venv`");
    let o = Command::new(py)
        .arg(common::repo().join("tests/goldens/smollm2_formats_goldens.py"))
        .arg(out)
        .args(dirs)
        .output()
        .unwrap();
    assert!(o.status.success(), "mlx-lm golden script failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn check(name: &str, dir: &Path, golden: &serde_json::Value, reg: &rmlx::plugins::Registry, failures: &mut Vec<String>) -> usize {
    let mut model = LoadedModel::load(dir, reg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    let text = TextSide::load(&model.dir).unwrap();
    let mut compared = 0;
    for case in golden["prompts"].as_array().unwrap() {
        let what = format!("{name} {:?}", case["text"].as_str().unwrap());
        let prompt: Vec<u32> = serde_json::from_value(case["prompt"].clone()).unwrap();
        let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let margins: Vec<f32> = serde_json::from_value(case["margins"].clone()).unwrap();
        let ours = text.prompt_ids(case["text"].as_str().unwrap(), case["kind"] == "chat", None).unwrap();
        assert_eq!(ours, prompt, "prompt ids for {what}");
        // Teacher-forced: the same context at every step.
        let mut session = Session::new(&mut model);
        let mut logits = session.prefill(&prompt).unwrap();
        for (i, want) in tokens.iter().enumerate() {
            if margins[i] > MARGIN {
                let got = sampler::argmax(&logits);
                if got != *want {
                    failures.push(format!("{what} step {i}: rmlx {got} != mlx-lm {want} (margin {})", margins[i]));
                }
                compared += 1;
            }
            if i + 1 < tokens.len() {
                logits = session.step(*want).unwrap();
            }
        }
        // Free-running greedy generation, as `rmlx generate` does: equal up to
        // the first near tie (after it the two may legitimately part) or EOS.
        let agree = margins.iter().position(|m| *m <= MARGIN).unwrap_or(tokens.len());
        let opts = GenerateOptions {
            max_tokens: agree.max(1),
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop_ids: text.eos_ids.clone(),
            prefill_chunk: 512,
        };
        let out = generate(&mut model, &prompt, &opts, |_| {}).unwrap();
        let want: Vec<u32> = tokens[..agree].iter().copied().take_while(|t| !text.eos_ids.contains(t)).collect();
        let got: Vec<u32> = out.tokens.iter().copied().take(want.len()).collect();
        if got != want {
            failures.push(format!("{what}: free-running greedy {got:?} != mlx-lm {want:?}"));
        }
    }
    compared
}

#[test]
fn each_format_matches_mlx_lm_greedy_on_the_same_files() {
    let src = default_model();
    let work = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = FORMATS.iter().map(|q| work.path().join(q)).collect();
    {
        let _g = common::mlx_lock();
        for (q, dst) in FORMATS.iter().zip(&dirs) {
            let opts = MlxOptions { quant: Some(q.to_string()), group_size: None, layers: vec![], force: false, progress: false };
            convert_dir(&src, dst, &opts).unwrap_or_else(|e| panic!("convert to {q}: {e:#}"));
        }
    }
    let golden = mlx_lm_goldens(&dirs, &work.path().join("goldens.json"));
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut failures = vec![];
    for (q, dir) in FORMATS.iter().zip(&dirs) {
        let g = &golden["models"][dir.to_str().unwrap()];
        let compared = check(q, dir, g, &reg, &mut failures);
        assert!(compared >= 18, "{q}: only {compared} of 24 steps above the margin");
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}
