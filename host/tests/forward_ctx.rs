//! ABI 3.3's `forward_ctx` (engine/attend.rs): the same logits as the older
//! `forward` entry point, the final hidden states and named layers' hidden
//! states on request, soft-cap and sinks through the composed path, and the
//! encoder store's padded rows equal to each row alone.
mod common;

use mlx_rs::{ops::indexing::TryIndexOp, Array, Dtype};
use rmlx::engine::{
    attend::{self, ForwardRequest},
    cache::KvCache,
    encoder::{encode, EncoderStore},
    LoadedModel,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts, Output},
    MlxArray,
};

fn max_diff(a: &Array, b: &Array) -> f32 {
    let d = a.as_dtype(Dtype::Float32).unwrap().subtract(b.as_dtype(Dtype::Float32).unwrap()).unwrap().abs().unwrap();
    d.max(None).unwrap().item::<f32>()
}

fn tokens(ids: &[i32]) -> Array {
    Array::from_slice(ids, &[1, ids.len() as i32])
}

#[test]
fn forward_ctx_matches_the_older_entry_point_and_returns_hidden_states() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for name in ["llama-f32", "qwen3-f32", "gemma3_text-f32"] {
        let mut model = LoadedModel::load(&common::fixture(&format!("models/{name}")), &reg).unwrap();
        let n = model.spec.num_layers;
        let ids = tokens(&[5, 9, 2, 7, 11, 3]);
        // 3.3: every position's logits.
        let mut cache = KvCache::new(n as usize);
        let ctx = model.logits(&ids, &mut cache, false).unwrap(); // [1, L, V]
        // The pre-3.3 entry point on a fresh cache.
        let mut cache = KvCache::new(n as usize);
        let old = model.model.forward(MlxArray::from_ref(&ids), attend::lend(&mut cache), false).into_result().unwrap().into_array();
        assert_eq!(ctx.shape(), old.shape(), "{name}");
        assert!(max_diff(&ctx, &old) < 1e-5, "{name}: {}", max_diff(&ctx, &old));
        // Final hidden states and two layers' outputs.
        let mut cache = KvCache::new(n as usize);
        let req = ForwardRequest { output: Some(Output::Hidden), hidden_layers: vec![0, n - 1], ..Default::default() };
        let out = model.run(&ids, &mut cache, req).unwrap();
        let d = model.spec.hidden_size as i32;
        assert_eq!(out.out.shape(), &[1, 6, d], "{name}");
        assert_eq!(out.hidden.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, n - 1], "{name}");
        for (_, h) in &out.hidden {
            assert_eq!(h.shape(), &[1, 6, d], "{name}");
        }
        // The last layer's output is not yet normed: it differs from the final states.
        assert!(max_diff(&out.hidden[1].1, &out.out) > 1e-3, "{name}");
        // A layer that does not exist is never offered.
        let mut cache = KvCache::new(n as usize);
        let req = ForwardRequest { output: Some(Output::LastLogits), hidden_layers: vec![n + 5], ..Default::default() };
        let out = model.run(&ids, &mut cache, req).unwrap();
        assert!(out.hidden.is_empty() && out.out.shape() == [1, 1, model.spec.vocab_size as i32], "{name}");
    }
}

#[test]
fn encoder_rows_padded_together_equal_each_row_alone() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut model = LoadedModel::load(&common::fixture("models/llama-f32"), &reg).unwrap();
    let rows = vec![vec![5u32, 9, 2, 7, 11, 3], vec![4u32, 8], vec![1u32, 2, 3, 4]];
    let together = encode(&mut model, &rows, 0).unwrap(); // [3, 6, D]
    for (b, r) in rows.iter().enumerate() {
        let alone = encode(&mut model, &[r.clone()], 0).unwrap(); // [1, n, D]
        let n = r.len() as i32;
        let part = together.try_index((b as i32..b as i32 + 1, 0..n)).unwrap();
        assert!(max_diff(&part, &alone) < 1e-4, "row {b}: {}", max_diff(&part, &alone));
        // A causal decoder's final states equal a cached prefill's.
        let mut cache = KvCache::new(model.spec.num_layers as usize);
        let ids: Vec<i32> = r.iter().map(|&t| t as i32).collect();
        let req = ForwardRequest { output: Some(Output::Hidden), ..Default::default() };
        let cached = model.run(&tokens(&ids), &mut cache, req).unwrap().out;
        assert!(max_diff(&cached, &alone) < 1e-4, "row {b}");
    }
    assert!(encode(&mut model, &[], 0).is_err());
}

#[test]
fn soft_cap_and_sinks_match_a_direct_computation() {
    use rmlx::engine::attend::KvStore;
    let _g = common::mlx_lock();
    let (b, h, k, l, d) = (2, 4, 2, 5, 8);
    let r = |s: &[i32], seed: u64| mlx_rs::random::normal::<f32>(s, None, None, &mlx_rs::random::key(seed).unwrap()).unwrap();
    let (q, kk, v) = (r(&[b, h, l, d], 1), r(&[b, k, l, d], 2), r(&[b, k, l, d], 3));
    let sinks = r(&[h], 4);
    let opts = AttendOpts::plain(0.3).softcap(2.0).sinks(Some(&sinks));
    // The one-sequence cache (B = 1) and the encoder store, causal.
    let q0 = q.try_index(0..1).unwrap();
    let (k0, v0) = (kk.try_index(0..1).unwrap(), v.try_index(0..1).unwrap());
    let mut cache = KvCache::new(1);
    let got = cache.attend(0, q0.clone(), k0.clone(), v0.clone(), &opts).unwrap();
    let want = dense_attend(&q0, &k0, &v0, None, &opts).unwrap();
    assert!(max_diff(&got, &want) < 1e-5);
    // Sinks take probability mass: the output differs from no sinks.
    let plain = dense_attend(&q0, &k0, &v0, None, &AttendOpts::plain(0.3).softcap(2.0)).unwrap();
    assert!(max_diff(&got, &plain) > 1e-3);
    let mut enc = EncoderStore::new(&[l, 3], l);
    let got = enc.attend(0, q.clone(), kk.clone(), v.clone(), &opts.bidirectional()).unwrap();
    let row1 = dense_attend(
        &q.try_index(1..2).unwrap(),
        &kk.try_index((1..2, .., 0..3)).unwrap(),
        &v.try_index((1..2, .., 0..3)).unwrap(),
        None,
        &opts.bidirectional(),
    )
    .unwrap();
    let got1 = got.try_index((1..2, .., 0..3)).unwrap();
    assert!(max_diff(&got1, &row1.try_index((.., .., 0..3)).unwrap()) < 1e-5);
    // A cached store refuses non-causal attention with a clear error.
    let err = KvCache::new(1).attend(0, q0, k0, v0, &opts.bidirectional()).unwrap_err();
    assert!(err.message.contains("non-causal"), "{}", err.message);
}
