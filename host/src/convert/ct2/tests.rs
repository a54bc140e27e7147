//! A tiny synthetic CTranslate2 Whisper model, written by the test in
//! ctranslate2's own layout (float32, float16 and int8 weights), converted,
//! and every CT2 variable rebuilt from the mlx-whisper tensors.
use super::tokenizer::{build, byte_chars};
use super::whisper::{dims, sinusoids, Dims};
use super::*;
use std::collections::HashMap;

const MELS: usize = 4;
const A: usize = 8; // audio state
const T: usize = 8; // text state
const ACTX: usize = 3;
const TCTX: usize = 5;

/// 256 byte tokens, three merges, then Whisper's special tokens.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    v.extend(["Ġt", "he", "Ġthe"].map(String::from));
    v.extend(
        ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>", "<|0.00|>", "<|0.02|>"]
            .map(String::from),
    );
    v
}

/// Deterministic values in [-1, 1].
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 + seed * 101) as f32 * 0.173).sin()).collect()
}

struct Fixture {
    vars: Vec<(String, Vec<usize>, Ct2Dtype, Vec<u8>)>,
    /// What each variable holds, as f32 (the dequantized value for int8).
    want: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn scalar_i8(name: &str, x: i8) -> (String, Vec<usize>, Ct2Dtype, Vec<u8>) {
    (name.into(), vec![], Ct2Dtype::I8, vec![x as u8])
}

fn scalar_i16(name: &str, x: i16) -> (String, Vec<usize>, Ct2Dtype, Vec<u8>) {
    (name.into(), vec![], Ct2Dtype::I16, x.to_le_bytes().to_vec())
}

/// `weights`: the type of weights (F32, F16 or I8); other floats are F32,
/// or F16 when weights are F16.
fn fixture(weights: Ct2Dtype, n_vocab: usize) -> Fixture {
    let floats = if weights == Ct2Dtype::F16 { Ct2Dtype::F16 } else { Ct2Dtype::F32 };
    let mut f = Fixture { vars: Vec::new(), want: BTreeMap::new() };
    let mut seed = 0;
    let mut add = |f: &mut Fixture, name: String, shape: Vec<usize>, quantizable: bool, given: Option<Vec<f32>>| {
        seed += 1;
        let n: usize = shape.iter().product();
        let v = given.unwrap_or_else(|| values(n, seed));
        let dtype = if quantizable { weights } else { floats };
        match dtype {
            Ct2Dtype::F32 => {
                f.vars.push((name.clone(), shape.clone(), dtype, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
                f.want.insert(name, (shape, v));
            }
            Ct2Dtype::F16 => {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                f.vars.push((name.clone(), shape.clone(), dtype, h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()));
                f.want.insert(name, (shape, h.iter().map(|x| x.to_f32()).collect()));
            }
            Ct2Dtype::I8 => {
                // ctranslate2's int8: per row, scale = 127 / amax, q = round(w * scale)
                let rows = shape[0];
                let per = n / rows;
                let mut q = Vec::with_capacity(n);
                let mut scales = Vec::with_capacity(rows);
                let mut deq = Vec::with_capacity(n);
                for r in 0..rows {
                    let row = &v[r * per..(r + 1) * per];
                    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let s = 127.0 / amax;
                    scales.push(s);
                    for &x in row {
                        let qi = (x * s).round() as i8;
                        q.push(qi as u8);
                        deq.push(qi as f32 / s);
                    }
                }
                f.vars.push((name.clone(), shape.clone(), dtype, q));
                f.vars.push((format!("{name}_scale"), vec![rows], Ct2Dtype::F32, scales.iter().flat_map(|x| x.to_le_bytes()).collect()));
                f.want.insert(name, (shape, deq));
            }
            d => panic!("{d}"),
        }
    };
    let linear = |f: &mut Fixture, add: &mut dyn FnMut(&mut Fixture, String, Vec<usize>, bool, Option<Vec<f32>>), p: &str, out: usize, inp: usize, zero_k: Option<usize>| {
        add(f, format!("{p}/weight"), vec![out, inp], true, None);
        let mut b = values(out, out + inp + p.len());
        if let Some(start) = zero_k {
            b[start..start + inp].fill(0.0); // the key block has no bias
        }
        add(f, format!("{p}/bias"), vec![out], false, Some(b));
    };
    let ln = |f: &mut Fixture, add: &mut dyn FnMut(&mut Fixture, String, Vec<usize>, bool, Option<Vec<f32>>), p: &str, d: usize| {
        add(f, format!("{p}/gamma"), vec![d], false, None);
        add(f, format!("{p}/beta"), vec![d], false, None);
    };
    add(&mut f, "encoder/conv1/weight".into(), vec![A, MELS, 3], true, None);
    add(&mut f, "encoder/conv1/bias".into(), vec![A], false, None);
    add(&mut f, "encoder/conv2/weight".into(), vec![A, A, 3], true, None);
    add(&mut f, "encoder/conv2/bias".into(), vec![A], false, None);
    add(&mut f, "encoder/position_encodings/encodings".into(), vec![ACTX, A], false, Some(sinusoids(ACTX, A)));
    for l in 0..2 {
        let p = format!("encoder/layer_{l}");
        linear(&mut f, &mut add, &format!("{p}/self_attention/linear_0"), 3 * A, A, Some(A));
        linear(&mut f, &mut add, &format!("{p}/self_attention/linear_1"), A, A, None);
        ln(&mut f, &mut add, &format!("{p}/self_attention/layer_norm"), A);
        linear(&mut f, &mut add, &format!("{p}/ffn/linear_0"), 4 * A, A, None);
        linear(&mut f, &mut add, &format!("{p}/ffn/linear_1"), A, 4 * A, None);
        ln(&mut f, &mut add, &format!("{p}/ffn/layer_norm"), A);
    }
    ln(&mut f, &mut add, "encoder/layer_norm", A);
    add(&mut f, "decoder/embeddings/weight".into(), vec![n_vocab, T], true, None);
    add(&mut f, "decoder/position_encodings/encodings".into(), vec![TCTX, T], false, None);
    let p = "decoder/layer_0";
    linear(&mut f, &mut add, &format!("{p}/self_attention/linear_0"), 3 * T, T, Some(T));
    linear(&mut f, &mut add, &format!("{p}/self_attention/linear_1"), T, T, None);
    ln(&mut f, &mut add, &format!("{p}/self_attention/layer_norm"), T);
    linear(&mut f, &mut add, &format!("{p}/attention/linear_0"), T, T, None);
    linear(&mut f, &mut add, &format!("{p}/attention/linear_1"), 2 * T, T, Some(0));
    linear(&mut f, &mut add, &format!("{p}/attention/linear_2"), T, T, None);
    ln(&mut f, &mut add, &format!("{p}/attention/layer_norm"), T);
    linear(&mut f, &mut add, &format!("{p}/ffn/linear_0"), 4 * T, T, None);
    linear(&mut f, &mut add, &format!("{p}/ffn/linear_1"), T, 4 * T, None);
    ln(&mut f, &mut add, &format!("{p}/ffn/layer_norm"), T);
    ln(&mut f, &mut add, "decoder/layer_norm", T);
    f.vars.extend([
        scalar_i8("decoder/activation", 3),
        scalar_i8("decoder/alibi", 0),
        scalar_i16("decoder/alignment_heads", 1),
        scalar_i8("decoder/pre_norm", 1),
        scalar_i8("decoder/scale_embeddings", 0),
        scalar_i16("decoder/num_heads", 2),
        scalar_i16("encoder/num_heads", 2),
    ]);
    f.vars.sort_by(|a, b| a.0.cmp(&b.0));
    f
}

fn write_dir(f: &Fixture, dir: &Path, vocab: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    let aliases = [("decoder/projection/weight".to_string(), "decoder/embeddings/weight".to_string())];
    std::fs::write(dir.join("model.bin"), write_model_bin("WhisperSpec", 3, &f.vars, &aliases)).unwrap();
    std::fs::write(dir.join("vocabulary.txt"), vocab.join("\n") + "\n").unwrap();
    let cfg = serde_json::json!({"alignment_heads": [[0, 1]], "lang_ids": [vocab.len() - 6], "suppress_ids": [1, 2], "suppress_ids_begin": [220, 259]});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// The output tensors as f32 (name -> (shape, values)).
fn read_out(dir: &Path) -> (HashMap<String, (Vec<usize>, Vec<f32>)>, safetensors::Dtype) {
    let bytes = std::fs::read(dir.join("weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    let mut dtype = None;
    for (name, t) in st.tensors() {
        if name == "alignment_heads" {
            assert_eq!(t.dtype(), safetensors::Dtype::I64);
            let v = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect();
            out.insert(name, (t.shape().to_vec(), v));
            continue;
        }
        dtype = Some(t.dtype());
        let v: Vec<f32> = match t.dtype() {
            safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            safetensors::Dtype::F16 => t.data().chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            d => panic!("{d:?}"),
        };
        out.insert(name, (t.shape().to_vec(), v));
    }
    (out, dtype.unwrap())
}

/// Rebuild CT2 variable `name` from the mlx-whisper tensors.
fn rebuild(out: &HashMap<String, (Vec<usize>, Vec<f32>)>, name: &str) -> Vec<f32> {
    let g = |k: &str| out.get(k).unwrap_or_else(|| panic!("{k} missing")).1.clone();
    let zeros = |n: usize| vec![0f32; n];
    let (scope, leaf) = name.rsplit_once('/').unwrap();
    let mx = |s: &str| -> String {
        s.replace("encoder/layer_", "encoder.blocks.").replace("decoder/layer_", "decoder.blocks.").replace('/', ".")
    };
    if let Some(conv) = scope.strip_prefix("encoder/conv") {
        let (shape, w) = out[&format!("encoder.conv{conv}.{leaf}")].clone();
        if leaf == "bias" {
            return w;
        }
        let (o, k, i) = (shape[0], shape[1], shape[2]); // [out, k, in] -> [out, in, k]
        let mut t = vec![0f32; w.len()];
        for a in 0..o {
            for b in 0..i {
                for c in 0..k {
                    t[(a * i + b) * k + c] = w[(a * k + c) * i + b];
                }
            }
        }
        return t;
    }
    let leaf_mx = match leaf {
        "gamma" => "weight",
        "beta" => "bias",
        l => l,
    };
    let block = |s: &str| mx(s.split_once("/self_attention").or(s.split_once("/attention")).or(s.split_once("/ffn")).unwrap().0);
    let cat = |parts: &[Vec<f32>]| parts.concat();
    match scope {
        "encoder/layer_norm" => g(&format!("encoder.ln_post.{leaf_mx}")),
        "decoder/layer_norm" => g(&format!("decoder.ln.{leaf_mx}")),
        "decoder/embeddings" => g("decoder.token_embedding.weight"),
        "decoder/position_encodings" => g("decoder.positional_embedding"),
        "encoder/position_encodings" => sinusoids(ACTX, A),
        s if s.ends_with("self_attention/linear_0") => {
            let b = block(s);
            let d = out[&format!("{b}.attn.query.weight")].0[0];
            if leaf == "weight" {
                cat(&[g(&format!("{b}.attn.query.weight")), g(&format!("{b}.attn.key.weight")), g(&format!("{b}.attn.value.weight"))])
            } else {
                cat(&[g(&format!("{b}.attn.query.bias")), zeros(d), g(&format!("{b}.attn.value.bias"))])
            }
        }
        s if s.ends_with("self_attention/linear_1") => g(&format!("{}.attn.out.{leaf}", block(s))),
        s if s.ends_with("self_attention/layer_norm") => g(&format!("{}.attn_ln.{leaf_mx}", block(s))),
        s if s.ends_with("/attention/linear_0") => g(&format!("{}.cross_attn.query.{leaf}", block(s))),
        s if s.ends_with("/attention/linear_1") => {
            let b = block(s);
            let d = out[&format!("{b}.cross_attn.value.weight")].0[0];
            if leaf == "weight" {
                cat(&[g(&format!("{b}.cross_attn.key.weight")), g(&format!("{b}.cross_attn.value.weight"))])
            } else {
                cat(&[zeros(d), g(&format!("{b}.cross_attn.value.bias"))])
            }
        }
        s if s.ends_with("/attention/linear_2") => g(&format!("{}.cross_attn.out.{leaf}", block(s))),
        s if s.ends_with("/attention/layer_norm") => g(&format!("{}.cross_attn_ln.{leaf_mx}", block(s))),
        s if s.ends_with("ffn/linear_0") => g(&format!("{}.mlp1.{leaf}", block(s))),
        s if s.ends_with("ffn/linear_1") => g(&format!("{}.mlp2.{leaf}", block(s))),
        s if s.ends_with("ffn/layer_norm") => g(&format!("{}.mlp_ln.{leaf_mx}", block(s))),
        s => panic!("unmapped {s}"),
    }
}

fn expected_dims(n_vocab: usize) -> Dims {
    Dims {
        n_mels: MELS,
        n_audio_ctx: ACTX,
        n_audio_state: A,
        n_audio_head: 2,
        n_audio_layer: 2,
        n_vocab,
        n_text_ctx: TCTX,
        n_text_state: T,
        n_text_head: 2,
        n_text_layer: 1,
    }
}

#[test]
fn every_variable_round_trips_for_f32_f16_and_int8() {
    let vocab = vocab();
    for (wt, out_dtype) in [
        (Ct2Dtype::F32, safetensors::Dtype::F32),
        (Ct2Dtype::F16, safetensors::Dtype::F16),
        (Ct2Dtype::I8, safetensors::Dtype::F32),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("ct2"), tmp.path().join("mlx"));
        let f = fixture(wt, vocab.len());
        write_dir(&f, &src, &vocab);
        let m = Ct2Model::open(&src).unwrap();
        assert_eq!((m.binary_version, m.spec.as_str(), m.revision), (6, "WhisperSpec", 3));
        assert_eq!(dims(&m).unwrap(), expected_dims(vocab.len()));
        // the reader gives back every stored value (int8: dequantized)
        for (name, (shape, want)) in &f.want {
            assert_eq!(&m.var(name).unwrap().shape, shape, "{name}");
            assert_eq!(&m.to_f32(name).unwrap(), want, "{wt}: {name}");
        }
        assert_eq!(m.to_f32("decoder/projection/weight").unwrap(), f.want["decoder/embeddings/weight"].1);
        if wt == Ct2Dtype::I8 {
            assert!(m.var("decoder/projection/weight_scale").is_some(), "an alias also aliases the scale");
        }
        let report = convert_ct2(&src, &dst, &Ct2Options::default()).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_eq!(report.tokenizer, "built from the vocabulary");
        let (out, dtype) = read_out(&dst);
        assert_eq!(dtype, out_dtype, "{wt}");
        // every CT2 variable, rebuilt from the mlx-whisper tensors, is what was stored
        for (name, (_, want)) in &f.want {
            let got = rebuild(&out, name);
            let tol = if wt == Ct2Dtype::F16 || name.contains("position_encodings") && name.starts_with("encoder") { 1e-3 } else { 0.0 };
            let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(got.len() == want.len() && d <= tol, "{wt}: {name}: max diff {d}");
        }
        // mlx-whisper's names and shapes (conv weights [out, k, in])
        assert_eq!(out["encoder.conv1.weight"].0, [A, 3, MELS]);
        assert_eq!(out["encoder.blocks.1.attn.key.weight"].0, [A, A]);
        assert!(!out.contains_key("encoder.blocks.0.attn.key.bias"));
        assert!(!out.contains_key("decoder.blocks.0.cross_attn.key.bias"));
        assert_eq!(out["decoder.positional_embedding"].0, [TCTX, T]);
        // conv 4, 2 encoder blocks of 15, ln_post 2, embeddings 2, 1 decoder block of 24, ln 2
        // and alignment_heads from config.json
        assert_eq!(out.len(), 4 + 2 * 15 + 2 + 2 + 24 + 2 + 1, "tensor count");
        assert_eq!(out["alignment_heads"], (vec![1, 2], vec![0.0, 1.0]));
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
        let want_cfg = serde_json::json!({"model_type": "whisper", "n_mels": MELS, "n_audio_ctx": ACTX, "n_audio_state": A,
            "n_audio_head": 2, "n_audio_layer": 2, "n_vocab": vocab.len(), "n_text_ctx": TCTX, "n_text_state": T,
            "n_text_head": 2, "n_text_layer": 1});
        assert_eq!(cfg, want_cfg);
        let gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dst.join("generation_config.json")).unwrap()).unwrap();
        assert_eq!(gen["decoder_start_token_id"], 260);
        assert_eq!(gen["no_timestamps_token_id"], 264);
        assert_eq!(gen["lang_to_id"], serde_json::json!({"<|en|>": 261}));
        assert_eq!(gen["task_to_id"], serde_json::json!({"transcribe": 263, "translate": 262}));
        assert_eq!(gen["suppress_tokens"], serde_json::json!([1, 2]));
        // an existing output is refused without --force, replaced with it
        let e = convert_ct2(&src, &dst, &Ct2Options::default()).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        convert_ct2(&src, &dst, &Ct2Options { force: true }).unwrap();
    }
}

#[test]
fn tokenizer_from_vocabulary_encodes_with_recovered_merges() {
    let v = vocab();
    let b = build(&v).unwrap();
    assert_eq!((b.regular, b.merges), (259, 3));
    let tok = tokenizers::Tokenizer::from_bytes(b.json.as_bytes()).unwrap();
    let enc = tok.encode(" the the", false).unwrap();
    assert_eq!(enc.get_ids(), [258, 258]);
    let enc = tok.encode("he the t", false).unwrap();
    assert_eq!(enc.get_ids(), [257, 258, 256]);
    assert_eq!(tok.token_to_id("<|startoftranscript|>"), Some(260));
    assert_eq!(tok.decode(&[258, 259, 258], true).unwrap(), " the the");
    let with = tok.encode(" the", true).unwrap();
    assert_eq!(with.get_ids(), [260, 264, 258, 259]);
    let mut bad = v.clone();
    bad.retain(|t| t != "<|endoftext|>");
    assert!(build(&bad).is_err());
}

#[test]
fn bad_files_are_clear_errors() {
    let vocab = vocab();
    let f = fixture(Ct2Dtype::F32, vocab.len());
    let bin = write_model_bin("WhisperSpec", 3, &f.vars, &[]);
    let p = PathBuf::from("model.bin");
    // every truncation is an error, never a panic
    for cut in [0, 3, 4, 10, 30, bin.len() / 2, bin.len() - 1] {
        let e = Ct2Model::parse(bin[..cut].to_vec(), p.clone()).err().unwrap_or_else(|| panic!("cut {cut} parsed"));
        assert!(e.to_string().contains("truncated"), "cut {cut}: {e}");
    }
    let mut v9 = bin.clone();
    v9[0] = 9;
    assert!(Ct2Model::parse(v9, p.clone()).unwrap_err().to_string().contains("binary version 9"));
    let mut extra = bin.clone();
    extra.push(0);
    assert!(Ct2Model::parse(extra, p.clone()).is_err());
    // an int8 weight without its scale
    let mut vars = f.vars.clone();
    let w = vars.iter_mut().find(|v| v.0 == "decoder/layer_0/ffn/linear_0/weight").unwrap();
    w.2 = Ct2Dtype::I8;
    w.3 = vec![1; w.1.iter().product()];
    let m = Ct2Model::parse(write_model_bin("WhisperSpec", 3, &vars, &[]), p.clone()).unwrap();
    assert!(m.to_f32("decoder/layer_0/ffn/linear_0/weight").unwrap_err().to_string().contains("_scale is missing"));
    // not Whisper
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ct2");
    write_dir(&f, &src, &vocab);
    std::fs::write(src.join("model.bin"), write_model_bin("TransformerSpec", 1, &f.vars, &[])).unwrap();
    let e = convert_ct2(&src, &tmp.path().join("out"), &Ct2Options::default()).unwrap_err();
    assert!(e.to_string().contains("only Whisper"), "{e}");
    assert!(!tmp.path().join("out").exists());
    // a variable mlx-whisper has no place for
    let mut vars = f.vars.clone();
    vars.push(("decoder/extra/weight".into(), vec![2], Ct2Dtype::F32, vec![0; 8]));
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(src.join("model.bin"), write_model_bin("WhisperSpec", 3, &vars, &[])).unwrap();
    let e = convert_ct2(&src, &tmp.path().join("out"), &Ct2Options::default()).unwrap_err();
    assert!(e.to_string().contains("decoder/extra/weight"), "{e}");
    // a missing vocabulary
    std::fs::write(src.join("model.bin"), write_model_bin("WhisperSpec", 3, &f.vars, &[])).unwrap();
    std::fs::remove_file(src.join("vocabulary.txt")).unwrap();
    let e = convert_ct2(&src, &tmp.path().join("out"), &Ct2Options::default()).unwrap_err();
    assert!(e.to_string().contains("vocabulary"), "{e}");
    // a file instead of a directory
    let e = convert_ct2(&src.join("model.bin"), &tmp.path().join("out"), &Ct2Options::default()).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}
