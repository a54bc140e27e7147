//! Decode-step attention time of each family's composed path on this
//! machine, against MLX's fused sdpa on dense f16/f32 blocks (what kv-dense
//! runs): one query token, B rows of T cached tokens, Qwen2.5-0.5B's shape
//! (H = 14, K = 2, D = 64) by default.
//!
//!   cargo run -p rmlx-kv-quant --example bench -- [T] [B] [families,..]
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    random, Array, Dtype,
};
use rmlx_kv_quant::{codec, FAMILIES};
use rmlx_plugin_api::author::kv::{AttendOpts, LayerDims, Paged};
use std::time::Instant;

fn time<F: FnMut() -> Array>(mut f: F) -> f64 {
    f().eval().unwrap(); // warm up
    let n = 10;
    let t0 = Instant::now();
    for _ in 0..n {
        f().eval().unwrap();
    }
    t0.elapsed().as_secs_f64() * 1000.0 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let t: i32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let b: i32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let names: Vec<String> = args.get(3).map(|s| s.split(',').map(String::from).collect()).unwrap_or_else(|| FAMILIES.iter().map(|s| s.to_string()).collect());
    let (h, k, d, bs) = (14, 2, 64, 16);
    let dtype = Dtype::Bfloat16;
    let dims = LayerDims { kv_heads: k, head_dim: d, dtype };
    let slots = b * t;
    let x = random::normal::<f32>(&[slots, k, d], None, None, None).unwrap().as_dtype(dtype).unwrap();
    let q = random::normal::<f32>(&[b, h, 1, d], None, None, None).unwrap().as_dtype(dtype).unwrap();
    let nblk = t / bs;
    let tables = Array::from_iter(0..b * nblk, &[b, nblk]);
    let paged = Paged { tables: &tables, block_size: bs, ctx: t, mask: None, opts: AttendOpts::plain(0.125) };
    // dense baseline: gathered [B, K, T, D] and the fused kernel
    let kd = x.reshape(&[b, t, k, d]).unwrap().transpose_axes(&[0, 2, 1, 3]).unwrap().as_dtype(dtype).unwrap();
    kd.eval().unwrap();
    let base = time(|| scaled_dot_product_attention(&q, &kd, &kd, 0.125, None::<ScaledDotProductAttentionMask>, None).unwrap());
    println!("T {t} B {b}: dense bf16 fused sdpa (pre-gathered) {base:.3} ms");
    for name in &names {
        let c = codec(name).unwrap();
        let pools = c.encode(&x, &dims).unwrap();
        for p in &pools {
            p.eval().unwrap();
        }
        let ms = time(|| c.attend(&q, &pools, &pools, &paged, &dims, &dims).unwrap());
        println!("{name:8} {ms:8.3} ms  ({:.1}x the dense kernel)", ms / base);
    }
}
