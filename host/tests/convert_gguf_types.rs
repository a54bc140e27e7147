//! Every GGML type llama.cpp's quantizations produce (F32, F16, BF16, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS), against the `gguf`
//! Python package's own dequantizer: fixtures in tests/fixtures/gguf_types,
//! written by tests/goldens/make_gguf_types.py.
//!
//! * rmlx's dequantizers give gguf-py's values bit for bit;
//! * Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 map onto MLX affine (group 32, 4/5/8 bits)
//!   exactly: MLX's own `dequantize` of the triples gives the same values;
//! * `rmlx convert --from-gguf` of a tiny llama whose weights use all 15
//!   types keeps those five exact, writes the rest as float16 of the exact
//!   values, and records the per-module bits in config.json;
//! * an unsupported type (IQ2_XXS) fails naming the tensor, the type and the fix;
//! * an existing output says `--force`.
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::f16;
use mlx_rs::Array;
use rmlx::convert::gguf::{dequant, GgmlType, GgufFile};
use rmlx::convert::quant::{self, QuantKind};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    common::fixture("gguf_types").join(name)
}

fn tensor_f32(g: &GgufFile, f: &mut File, name: &str) -> Vec<f32> {
    let t = g.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    dequant::dequantize(t.ggml_type, &g.read_tensor_bytes(f, t).unwrap()).unwrap()
}

fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a == b), "{what}[{i}]: {a} != {b}");
    }
}

#[test]
fn every_type_dequantizes_like_gguf_py() {
    let path = fixture("types.gguf");
    let g = GgufFile::open(&path).unwrap();
    let mut f = File::open(&path).unwrap();
    let mut seen = Vec::new();
    for t in g.tensors.iter().filter(|t| t.name.starts_with("q.")) {
        let ty = &t.name[2..];
        assert_eq!(t.ggml_type.name(), ty);
        let got = dequant::dequantize(t.ggml_type, &g.read_tensor_bytes(&mut f, t).unwrap()).unwrap();
        let want = tensor_f32(&g, &mut f, &format!("ref.{ty}"));
        assert_bits_eq(&got, &want, ty);
        assert!(want.iter().any(|&v| v != 0.0), "{ty}: all-zero fixture");
        seen.push(t.ggml_type);
    }
    seen.sort();
    let mut all = dequant::DEQUANTIZABLE.to_vec();
    all.sort();
    assert_eq!(seen, all, "the fixture covers every type rmlx dequantizes");
}

/// MLX's own dequantize of an affine triple. MLX computes `scale * q + bias`
/// in the scales' dtype; the float16 scales/biases are widened to float32
/// (exactly) first, so the result is the exact value of the triple (in
/// float16, Q8_0's `d * (q + 128) - 128 * d` would round; MLX's quantized
/// matmuls accumulate in float32).
fn mlx_dequant(bits: i32, shape: &[i32], w: &[u8], s: &[u8], b: &[u8]) -> Vec<f32> {
    let words: Vec<u32> = w.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let half = |x: &[u8]| x.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect::<Vec<_>>();
    let rows = shape[0];
    let cols = shape[1];
    let w = Array::from_slice(&words, &[rows, cols * bits / 32]);
    let s = Array::from_slice(&half(s), &[rows, cols / 32]);
    let b = Array::from_slice(&half(b), &[rows, cols / 32]);
    let d = rmlx_wquant_fp::ops::dequantize(&w, &s, Some(&b), 32, bits, "affine", None, Some(mlx_rs::Dtype::Float32))
        .unwrap();
    d.eval().unwrap();
    d.as_slice::<f32>().to_vec()
}

#[test]
fn lossless_types_map_exactly_onto_mlx_affine() {
    let _l = common::mlx_lock();
    let path = fixture("types.gguf");
    let g = GgufFile::open(&path).unwrap();
    let mut f = File::open(&path).unwrap();
    for (ty, bits) in [
        (GgmlType::Q4_0, 4),
        (GgmlType::Q4_1, 4),
        (GgmlType::Q5_0, 5),
        (GgmlType::Q5_1, 5),
        (GgmlType::Q8_0, 8),
    ] {
        let k = QuantKind::from_ggml(ty).unwrap();
        assert_eq!(k.bits(), bits as u32);
        let t = g.tensor(&format!("q.{ty}")).unwrap();
        let raw = g.read_tensor_bytes(&mut f, t).unwrap();
        let (w, s, b) = (
            quant::pack_weights(k, &raw).unwrap(),
            quant::scales(k, &raw).unwrap(),
            quant::biases(k, &raw).unwrap(),
        );
        let want = tensor_f32(&g, &mut f, &format!("ref.{ty}"));
        let shape: Vec<i32> = t.shape().iter().map(|&d| d as i32).collect();
        assert_bits_eq(&mlx_dequant(bits, &shape, &w, &s, &b), &want, &format!("MLX dequantize of {ty}"));
        assert_bits_eq(&quant::dequantize_mlx(bits as u32, &w, &s, &b), &want, &format!("{ty} affine"));
    }
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(common::rmlx_bin())
        .args(["convert", "--from-gguf", "--quiet", "--model"])
        .arg(src)
        .arg("--output")
        .arg(dst)
        .args(extra)
        .output()
        .unwrap()
}

/// LAYOUT of make_gguf_types.py: GGUF tensor -> (MLX module, rotary heads to un-permute).
const MODULES: &[(&str, &str, Option<usize>)] = &[
    ("token_embd.weight", "model.embed_tokens", None),
    ("output.weight", "lm_head", None),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", Some(2)),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj", Some(1)),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj", None),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj", None),
    ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj", None),
    ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj", None),
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj", None),
    ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj", Some(2)),
    ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj", Some(1)),
    ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj", None),
    ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj", None),
    ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj", None),
    ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj", None),
    ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", None),
];

fn f16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

#[test]
fn llama_with_every_type_converts() {
    let _l = common::mlx_lock();
    let src = fixture("llama_types.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let o = convert(&src, &dst, &[]);
    assert!(o.status.success(), "convert failed: {}", String::from_utf8_lossy(&o.stderr));
    let report = String::from_utf8_lossy(&o.stderr);
    assert!(report.contains("dequantized to float16"), "{report}");

    let g = GgufFile::open(&src).unwrap();
    let mut f = File::open(&src).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization"];
    assert_eq!(q["group_size"], 32);
    assert_eq!(q["mode"], "affine");
    assert_eq!(q["bits"], 4, "4, 5 and 8 bits tie at two modules each: the fewest bits win");
    let bytes = std::fs::read(dst.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for &(gname, module, heads) in MODULES {
        let info = g.tensor(gname).unwrap();
        let mut want = tensor_f32(&g, &mut f, gname);
        let shape = info.shape();
        if let Some(h) = heads {
            let cols = shape[1];
            let src_row = quant::unpermute_src_row(shape[0], h).unwrap();
            want = (0..shape[0]).flat_map(|r| want[src_row(r) * cols..(src_row(r) + 1) * cols].to_vec()).collect();
        }
        let w = st.tensor(&format!("{module}.weight")).unwrap();
        let ty = info.ggml_type;
        if let Some(k) = QuantKind::from_ggml(ty) {
            let bits = k.bits() as i32;
            let s = st.tensor(&format!("{module}.scales")).unwrap();
            let b = st.tensor(&format!("{module}.biases")).unwrap();
            let dims = [shape[0] as i32, shape[1] as i32];
            assert_bits_eq(&mlx_dequant(bits, &dims, w.data(), s.data(), b.data()), &want, gname);
            let expect = if bits == 4 { Value::Null } else { serde_json::json!({"group_size": 32, "bits": bits, "mode": "affine"}) };
            assert_eq!(q[module], expect, "quantization entry of {module} ({ty})");
            kinds.insert(ty.name(), "exact".into());
        } else if ty == GgmlType::F32 {
            assert_eq!(w.dtype(), safetensors::Dtype::F32, "{gname}");
            let got: Vec<f32> = w.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_bits_eq(&got, &want, gname);
            assert_eq!(q[module], false, "{module} is dense");
            kinds.insert(ty.name(), "copied".into());
        } else if ty == GgmlType::BF16 {
            assert_eq!(w.dtype(), safetensors::Dtype::BF16, "{gname}");
            let got: Vec<f32> = w.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            assert_bits_eq(&got, &want, gname);
            kinds.insert(ty.name(), "copied".into());
        } else {
            // F16 copied; every other type: float16 of the exact dequantized values.
            assert_eq!(w.dtype(), safetensors::Dtype::F16, "{gname}");
            let want16: Vec<f32> = want.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            assert_bits_eq(&f16s(w.data()), &want16, gname);
            assert!(st.tensor(&format!("{module}.scales")).is_err(), "{module} is dense");
            assert_eq!(q[module], false, "{module} is dense");
            kinds.insert(ty.name(), if ty == GgmlType::F16 { "copied" } else { "dequantized" }.into());
        }
        assert_eq!(w.shape()[0], shape[0], "{gname} rows");
    }
    assert_eq!(kinds.len(), 15, "every type converted: {kinds:?}");
}

#[test]
fn recipe_requantizes_every_type() {
    let _l = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q4");
    let o = convert(&fixture("llama_types.gguf"), &dst, &["--quant", "q4", "--group-size", "32"]);
    assert!(o.status.success(), "convert failed: {}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(dst.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for &(_, module, _) in MODULES {
        let w = st.tensor(&format!("{module}.weight")).unwrap();
        assert_eq!(w.dtype(), safetensors::Dtype::U32, "{module} is quantized");
        let s = st.tensor(&format!("{module}.scales")).unwrap();
        assert_eq!(w.shape()[1] * 32 / 4, s.shape()[1] * 32, "{module} is 4-bit, group 32");
    }
}

#[test]
fn unsupported_type_names_tensor_type_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let o = convert(&fixture("llama_unsupported.gguf"), &dst, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    for want in ["output.weight", "IQ2_XXS", "llama-quantize", "Q4_K"] {
        assert!(err.contains(want), "error lacks {want:?}: {err}");
    }
    assert!(!dst.exists(), "nothing is written");
}

#[test]
fn existing_output_hint_says_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    std::fs::create_dir(&dst).unwrap();
    for extra in [&[][..], &["--quant", "q8"][..]] {
        let o = convert(&fixture("llama_types.gguf"), &dst, extra);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("already exists") && err.contains("--force"), "{extra:?}: {err}");
    }
    let o = convert(&fixture("llama_types.gguf"), &dst, &["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dst.join("config.json").exists());
}
