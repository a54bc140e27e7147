//! Level 1: every tiny model mlx-lm made (llama, qwen3; float32 and affine
//! 2-8 bit, group 32/64, mixed recipes, tied/untied, sharded; mxfp4, mxfp8,
//! nvfp4 and a recipe mixing modes per layer) against the logits and greedy
//! tokens mlx-lm recorded (tests/goldens/make_goldens.py, make_fp_goldens.py).
mod common;

use rmlx::engine::{sampler, LoadedModel, Session};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    model: String,
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    margins: Vec<f32>,
}

const REL_TOL: f32 = 1e-4;
const MARGIN: f32 = 1e-3;

/// max |a - b| relative to the largest golden logit.
fn rel_err(ours: &[f32], golden: &[f32]) -> f32 {
    let scale = golden.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    ours.iter().zip(golden).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn tiny_models_match_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut paths: Vec<_> = std::fs::read_dir(common::fixture("goldens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 43, "expected the golden fixtures, found {}", paths.len());
    for arch in ["llama", "llama-tied", "qwen3"] {
        for mode in ["mxfp4", "mxfp8", "nvfp4", "mixed-fp"] {
            let name = format!("{arch}-{mode}.json");
            assert!(paths.iter().any(|p| p.ends_with(&name)), "missing golden {name} (make_fp_goldens.py)");
        }
    }
    let mut failures = Vec::new();
    let mut worst = 0f32;
    let mut compared = 0;
    for path in &paths {
        let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut model = LoadedModel::load(&common::fixture(&format!("models/{}", golden.model)), &reg)
            .unwrap_or_else(|e| panic!("{}: {e:#}", golden.model));
        assert!(model.unused.is_empty(), "{}: unused tensors {:?}", golden.model, model.unused);
        for case in &golden.prompts {
            let mut session = Session::new(&mut model);
            let mut logits = session.prefill(&case.prompt).unwrap();
            for (step, want) in case.tokens.iter().enumerate() {
                let err = rel_err(&logits, &case.logits[step]);
                worst = worst.max(err);
                compared += 1;
                if err > REL_TOL {
                    failures.push(format!("{} prompt {:?} step {step}: relative error {err:e}", golden.model, case.prompt));
                }
                if case.margins[step] > MARGIN && sampler::argmax(&logits) != *want {
                    failures.push(format!(
                        "{} prompt {:?} step {step}: greedy {} != mlx-lm {want}",
                        golden.model,
                        case.prompt,
                        sampler::argmax(&logits)
                    ));
                }
                // Teacher-force mlx-lm's token so later steps compare the same context.
                if step + 1 < case.tokens.len() {
                    logits = session.step(*want).unwrap();
                }
            }
        }
    }
    eprintln!("{compared} steps compared over {} models, worst relative error {worst:e}", paths.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}
