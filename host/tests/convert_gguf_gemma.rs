//! `rmlx convert --from-gguf` on Gemma GGUFs written the way llama.cpp writes
//! them (tests/goldens/gemma_gguf.py: tiny random mlx-lm gemma, gemma2 and
//! gemma3_text models as F32, F16, Q8_0 and Q4_0 GGUFs, norms + 1). Checks
//! config.json, then mlx-lm (dev venv) on the converted directory: logits
//! and greedy tokens exactly those of mlx-lm on the weights the GGUF holds
//! (the original for F32; float16-rounded or dequantized Q8_0/Q4_0 weights
//! otherwise: the mapping onto MLX affine is lossless), and bounded against
//! the original for F16 and Q8_0. The tokenizer rebuilt from the metadata must render and
//! tokenize a chat, and tokenize and decode a few harder strings, like the
//! original SentencePiece model, in mlx-lm and in rmlx's own `tokenizers`.
mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// (GGUF type, max relative logit error against the original weights).
/// The checks that matter for the quantized files are against the GGUF's
/// own dequantized weights (exact); against the original, Q8_0 gets a sanity
/// bound and Q4_0 none (4-bit noise moves a tiny random model's logits by
/// tens of percent).
const TYPES: &[(&str, Option<f64>)] = &[
    ("f32", Some(0.0)),
    ("f16", Some(5e-3)),
    ("q8_0", Some(0.1)),
    ("q4_0", None),
];

fn python() -> std::path::PathBuf {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(
        py.exists(),
        "no dev venv: run `make dev-venv` (needs the gguf package: scripts/dev-venv.sh)"
    );
    py
}

fn script(args: &[&str]) -> String {
    let o = Command::new(python())
        .arg(common::repo().join("tests/goldens/gemma_gguf.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "gemma_gguf.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) -> String {
    let o = Command::new(common::rmlx_bin())
        .args(["convert", "--from-gguf", "--quiet", "--model"])
        .arg(src)
        .arg("--output")
        .arg(dst)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "convert {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn check_config(arch: &str, cfg: &Value, args: &Value, failures: &mut Vec<String>) {
    let mut want = json!({
        "model_type": arch,
        "hidden_size": args["hidden_size"],
        "num_hidden_layers": args["num_hidden_layers"],
        "intermediate_size": args["intermediate_size"],
        "num_attention_heads": args["num_attention_heads"],
        "num_key_value_heads": args["num_key_value_heads"],
        "head_dim": args["head_dim"],
        "vocab_size": args["vocab_size"],
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
        "bos_token_id": 2,
        "eos_token_id": [1, 5],
    });
    let w = want.as_object_mut().unwrap();
    match arch {
        "gemma" => {}
        "gemma2" => {
            w.insert("attn_logit_softcapping".into(), json!(50.0));
            w.insert("final_logit_softcapping".into(), json!(30.0));
            w.insert("query_pre_attn_scalar".into(), json!(16));
            w.insert("sliding_window".into(), json!(4096));
        }
        "gemma3_text" => {
            w.insert("query_pre_attn_scalar".into(), json!(16));
            w.insert("sliding_window".into(), json!(8));
            w.insert("sliding_window_pattern".into(), json!(6));
            w.insert("rope_theta".into(), json!(1000000.0));
            w.insert("rope_local_base_freq".into(), json!(10000.0));
            w.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "factor": 8.0}),
            );
            w.insert("max_position_embeddings".into(), json!(512));
        }
        _ => unreachable!(),
    }
    for (k, v) in w {
        if &cfg[k] != v {
            failures.push(format!("{arch}: config.json {k} = {} (want {v})", cfg[k]));
        }
    }
}

#[test]
fn gemma_ggufs_convert_to_what_mlx_lm_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    script(&["make", dir.to_str().unwrap()]);
    let mut failures = Vec::new();
    for arch in ["gemma", "gemma2", "gemma3_text"] {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{arch}.json"))).unwrap(),
        )
        .unwrap();
        for &(ty, tol) in TYPES {
            let name = format!("{arch}-{ty}");
            let dst = dir.join(format!("out-{name}"));
            convert(&dir.join(format!("{name}.gguf")), &dst, &[]);
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap())
                    .unwrap();
            check_config(arch, &cfg, &golden["args"], &mut failures);
            let quantized = ty.starts_with('q');
            if quantized != cfg.get("quantization").is_some() {
                failures.push(format!(
                    "{name}: quantization section {:?}",
                    cfg.get("quantization")
                ));
            }
            let out = script(&[
                "check",
                dir.to_str().unwrap(),
                arch,
                ty,
                dst.to_str().unwrap(),
            ]);
            let r: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
            let (err_orig, err_deq) = (
                r["err_orig"].as_f64().unwrap(),
                r["err_deq"].as_f64().unwrap(),
            );
            if err_deq > 1e-5 {
                failures.push(format!(
                    "{name}: relative logit error {err_deq:e} against the GGUF's own weights"
                ));
            }
            if tol.is_some_and(|t| err_orig > t) {
                failures.push(format!(
                    "{name}: relative logit error {err_orig:e} against the original (bound {tol:?})"
                ));
            }
            if r["greedy_mismatch"] != json!([]) {
                failures.push(format!(
                    "{name}: greedy differs from the GGUF's weights: {}",
                    r["greedy_mismatch"]
                ));
            }
            if ty == "f32" && r["greedy_orig_mismatch"] != json!([]) {
                failures.push(format!(
                    "{name}: greedy differs from the original: {}",
                    r["greedy_orig_mismatch"]
                ));
            }
            let chat = &golden["chat"];
            if r["chat_text"] != chat["text"] {
                failures.push(format!(
                    "{name}: chat template renders {} (want {})",
                    r["chat_text"], chat["text"]
                ));
            }
            if r["chat_ids"] != chat["ids"] {
                failures.push(format!(
                    "{name}: chat tokens {} (want {})",
                    r["chat_ids"], chat["ids"]
                ));
            }
            let text = chat["text"].as_str().unwrap();
            if r["decoded"].as_str() != text.strip_prefix("<bos>") {
                failures.push(format!("{name}: decode gives {}", r["decoded"]));
            }
            // rmlx's own tokenizer library on the same tokenizer.json.
            let tk = tokenizers::Tokenizer::from_file(dst.join("tokenizer.json")).unwrap();
            let ids: Vec<u64> = tk
                .encode(text, false)
                .unwrap()
                .get_ids()
                .iter()
                .map(|&i| i as u64)
                .collect();
            if json!(ids) != chat["ids"] {
                failures.push(format!(
                    "{name}: rmlx tokenizers gives {ids:?} (want {})",
                    chat["ids"]
                ));
            }
            // More strings (spaces, digits, byte fallback, special tokens):
            // SentencePiece's ids, and decoding gives the text back.
            let strings = golden["strings"].as_array().unwrap();
            for (i, case) in strings.iter().enumerate() {
                let (text, want) = (case[0].as_str().unwrap(), &case[1]);
                let py = &r["strings"][i];
                if &py[0] != want || py[1] != case[0] {
                    failures.push(format!(
                        "{name}: mlx-lm tokenizer on {text:?}: {py} (want {want})"
                    ));
                }
                let enc = tk.encode(text, false).unwrap();
                let ids: Vec<u32> = enc.get_ids().to_vec();
                let back = tk.decode(&ids, false).unwrap();
                if &json!(ids) != want || back != text {
                    failures.push(format!(
                        "{name}: rmlx tokenizers on {text:?}: {ids:?} -> {back:?} (want {want})"
                    ));
                }
            }
        }
    }
    // A recipe: the GGUF is converted, then re-quantized (q8 g64); norms stay
    // dense and keep the offset removed.
    let dst = dir.join("out-gemma3_text-recipe");
    convert(&dir.join("gemma3_text-f32.gguf"), &dst, &["--quant", "q8"]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    if cfg["model_type"] != "gemma3_text" || cfg["quantization"]["bits"] != 8 {
        failures.push(format!("recipe: config.json {cfg}"));
    }
    let out = script(&[
        "check",
        dir.to_str().unwrap(),
        "gemma3_text",
        "f32",
        dst.to_str().unwrap(),
    ]);
    let r: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    if r["err_orig"].as_f64().unwrap() > 0.1 {
        failures.push(format!(
            "recipe q8: relative logit error {} against the original",
            r["err_orig"]
        ));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unknown_architecture_is_a_cli_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m.gguf");
    // A GGUF header with one metadata entry and no tensors.
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    for s in ["general.architecture"] {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    b.extend(8u32.to_le_bytes());
    b.extend(5u64.to_le_bytes());
    b.extend(b"phi42");
    std::fs::write(&src, b).unwrap();
    let dst = tmp.path().join("out");
    let o = Command::new(common::rmlx_bin())
        .args(["convert", "--quiet", "--model"])
        .arg(&src)
        .arg("--output")
        .arg(&dst)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("'phi42'") && err.contains("llama, gemma, gemma2, gemma3"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dst.exists());
}
