//! A tiny llama GGUF (one layer, a byte-level BPE vocab) and helpers to read
//! the conversion back.
use super::*;

pub(super) const HIDDEN: usize = 64;
pub(super) const HEADS: usize = 4;
pub(super) const KV_HEADS: usize = 2;
pub(super) const HD: usize = HIDDEN / HEADS;
pub(super) const FFN: usize = 96;

pub(super) struct Tiny {
    pub(super) tokens: Vec<String>,
    /// HF-layout q and k weights (before llama.cpp's permutation)
    pub(super) q_hf: Vec<f32>,
    pub(super) k_hf: Vec<f32>,
}

pub(super) fn tiny_model(path: &Path, q_type: GgmlType, with_output: bool) -> Tiny {
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

pub(super) fn opts() -> GgufOptions {
    GgufOptions {
        force: false,
        progress: false,
    }
}

pub(super) fn load_st(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// Dequantize an MLX triple from the converted file.
pub(super) fn mlx_dequant(st: &SafeTensors, base: &str, bits: u32) -> Vec<f32> {
    let w = st.tensor(&format!("{base}.weight")).unwrap();
    let s = st.tensor(&format!("{base}.scales")).unwrap();
    let b = st.tensor(&format!("{base}.biases")).unwrap();
    assert_eq!(w.dtype(), Dtype::U32);
    assert_eq!(s.dtype(), Dtype::F16);
    assert_eq!(b.dtype(), Dtype::F16);
    quant::dequantize_mlx(bits, w.data(), s.data(), b.data())
}
