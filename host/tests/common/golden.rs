//! mlx-lm golden files and the teacher-forced comparison every golden test
//! runs: logits within a relative tolerance at each step, greedy token equal
//! wherever mlx-lm's top-1/top-2 margin exceeds `MARGIN`.
use rmlx::engine::{sampler, LoadedModel, Session};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Golden {
    pub model: String,
    pub prompts: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub margins: Vec<f32>,
}

pub const REL_TOL: f32 = 1e-4;
/// Steps whose top-1/top-2 logit margin is at most this are not compared by token.
pub const MARGIN: f32 = 1e-3;

/// max |a - b| relative to the largest golden logit.
pub fn rel_err(ours: &[f32], golden: &[f32]) -> f32 {
    let scale = golden.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    ours.iter().zip(golden).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// What a comparison found, over any number of models.
#[derive(Default)]
pub struct Tally {
    pub failures: Vec<String>,
    pub worst: f32,
    pub compared: usize,
}

/// Runs every case of `golden` through `model`, teacher-forcing mlx-lm's
/// tokens so later steps see the same context.
pub fn compare(model: &mut LoadedModel, golden: &Golden, tally: &mut Tally) {
    for case in &golden.prompts {
        let label = format!("{} prompt {:?}", golden.model, case.prompt);
        compare_run(Session::new(model), &label, &case.prompt, &case.tokens, &case.logits, &case.margins, tally);
    }
}

/// One teacher-forced run through `session`: prefill `prompt`, then step
/// mlx-lm's `tokens`, comparing each step's logits and (above the margin)
/// greedy token.
pub fn compare_run(
    mut session: Session,
    label: &str,
    prompt: &[u32],
    tokens: &[u32],
    want_logits: &[Vec<f32>],
    margins: &[f32],
    tally: &mut Tally,
) {
    let mut logits = session.prefill(prompt).unwrap();
    for (step, want) in tokens.iter().enumerate() {
        let err = rel_err(&logits, &want_logits[step]);
        tally.worst = tally.worst.max(err);
        tally.compared += 1;
        if err > REL_TOL {
            tally.failures.push(format!("{label} step {step}: relative error {err:e}"));
        }
        if margins[step] > MARGIN && sampler::argmax(&logits) != *want {
            tally.failures.push(format!("{label} step {step}: greedy {} != mlx-lm {want}", sampler::argmax(&logits)));
        }
        if step + 1 < tokens.len() {
            logits = session.step(*want).unwrap();
        }
    }
}
