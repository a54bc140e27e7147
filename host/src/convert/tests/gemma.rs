//! Gemma-family GGUFs: llama.cpp's norm offset removed, q/k unpermuted, clear
//! errors.
use super::*;

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
