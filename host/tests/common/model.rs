//! One model driven directly (no engine): token ids in, logits out, and
//! plain greedy decoding as the reference the drafter tests compare with.
use mlx_rs::{Array, Dtype};
use rmlx::engine::LoadedModel;

/// An array's values as f32 on the host.
pub fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// Token ids as int32 [1, L].
pub fn ids(t: &[u32]) -> Array {
    let v: Vec<i32> = t.iter().map(|&t| t as i32).collect();
    Array::from_slice(&v, &[1, v.len() as i32])
}

/// The index of a row's largest value (the first of equals; -inf never wins).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// Plain greedy decoding of `n` tokens after `prompt` (the reference).
pub fn plain_greedy(m: &mut LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.kv_cache();
    let (mut out, mut input) = (Vec::new(), prompt.to_vec());
    while out.len() < n {
        let logits = m.logits(&ids(&input), &mut cache, true).unwrap();
        cache.advance(input.len() as i32);
        let t = argmax(&values(&logits));
        out.push(t);
        input = vec![t];
    }
    out
}
