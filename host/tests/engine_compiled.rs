//! Greedy decode through the compiled step (engine/compiled.rs) gives the
//! same tokens as op-by-op decoding (`Session::step` + host argmax), for
//! dense, affine, microscaled and mixed tiny models, across a growth of the
//! KV buffers (the step is traced again at the new capacity).
mod common;

use rmlx::engine::{generate::generate, GenerateOptions, LoadedModel, Session};

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Op-by-op greedy tokens.
fn reference(model: &mut LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = Session::new(model);
    let mut t = argmax(&s.prefill(prompt).unwrap());
    let mut out = vec![t];
    while out.len() < n {
        t = argmax(&s.step(t).unwrap());
        out.push(t);
    }
    out
}

#[test]
fn compiled_greedy_equals_op_by_op() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // 250 prompt tokens + 40 new ones cross the 256-token buffer step.
    let long: Vec<u32> = (0..250u32).map(|i| (i * 37 + 11) % 250).collect();
    for name in ["qwen3-f32", "llama-q4-g64", "qwen3-mxfp4", "llama-tied-mixed", "qwen3-nvfp4"] {
        let mut model = LoadedModel::load(&common::fixture(&format!("models/{name}")), &reg).unwrap();
        for prompt in [vec![42u32], long.clone()] {
            let n = 40;
            let want = reference(&mut model, &prompt, n);
            let opts = GenerateOptions { max_tokens: n, temperature: 0.0, top_p: 1.0, seed: None, stop_ids: vec![], prefill_chunk: 64 };
            let got = generate(&mut model, &prompt, &opts, |_| {}).unwrap();
            assert_eq!(got.tokens, want, "{name}, prompt of {}", prompt.len());
        }
    }
}

#[test]
fn compiled_greedy_stops_at_eos() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut model = LoadedModel::load(&common::fixture("models/qwen3-f32"), &reg).unwrap();
    let free = reference(&mut model, &[1, 17, 99], 12);
    let stop = free[5];
    let first = free.iter().position(|t| *t == stop).unwrap();
    let opts = GenerateOptions { max_tokens: 12, temperature: 0.0, top_p: 1.0, seed: None, stop_ids: vec![stop], prefill_chunk: 512 };
    let got = generate(&mut model, &[1, 17, 99], &opts, |_| {}).unwrap();
    assert_eq!(got.tokens, free[..first].to_vec());
    assert_eq!(got.finish_reason, "stop");
}
