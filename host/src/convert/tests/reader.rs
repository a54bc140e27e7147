//! The GGUF reader: metadata types, clear errors, unsupported tensor types,
//! k-quant dequantization.
use super::*;

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
