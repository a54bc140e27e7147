//! Bad input to the CLI: a one-line error naming the problem and a non-zero
//! exit, never a panic.
mod common;

use std::path::Path;
use std::process::Command;

fn rmlx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap()])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `generate` and `info` on `model`; both must fail with `want` in one line.
fn assert_clean_error(model: &Path, want: &str) {
    for cmd in ["generate", "info"] {
        let m = model.to_str().unwrap();
        let args: Vec<&str> = if cmd == "generate" {
            vec![cmd, "--model", m, "--prompt-tokens", "1,2"]
        } else {
            vec![cmd, "--model", m]
        };
        let (code, _out, err) = rmlx(&args);
        assert_ne!(code, 0, "{cmd} {m}: exit code");
        assert!(!err.contains("panicked"), "{cmd}: panic: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{cmd}: one line expected, got: {err}");
        assert!(lines[0].starts_with("error: "), "{err}");
        assert!(err.contains(want), "{cmd}: expected `{want}` in: {err}");
    }
}

fn model_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture(&format!("models/{name}"))).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn wrong_model_path() {
    assert_clean_error(Path::new("/nonexistent/model"), "model directory not found: /nonexistent/model");
}

#[test]
fn missing_config() {
    let d = model_copy("llama-q4-g64");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert_clean_error(d.path(), "no config.json");
}

#[test]
fn malformed_config() {
    let d = model_copy("llama-q4-g64");
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    assert_clean_error(d.path(), "config.json: malformed JSON");
}

#[test]
fn truncated_safetensors() {
    let d = model_copy("llama-q4-g64");
    let f = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(d.path(), "truncated safetensors file");
}

#[test]
fn unknown_model_type() {
    let d = model_copy("llama-q4-g64");
    let p = d.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"llama\"", "\"gpt_oss\"");
    std::fs::write(&p, text).unwrap();
    let m = d.path().to_str().unwrap();
    let (code, _, err) = rmlx(&["generate", "--model", m, "--prompt-tokens", "1"]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown model_type `gpt_oss`"), "{err}");
}

#[test]
fn missing_config_field_and_bad_token_ids() {
    let d = model_copy("llama-q4-g64");
    let p = d.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let m = d.path().to_str().unwrap();
    let (code, _, err) = rmlx(&["generate", "--model", m, "--prompt-tokens", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("missing field `hidden_size`"), "{err}");
    let good = common::fixture("models/llama-q4-g64");
    let (code, _, err) = rmlx(&["generate", "--model", good.to_str().unwrap(), "--prompt-tokens", "1,999"]);
    assert_ne!(code, 0);
    assert!(err.contains("prompt token id 999 is out of range"), "{err}");
}

#[test]
fn generate_json_output() {
    let m = common::fixture("models/llama-f32");
    let (code, out, err) =
        rmlx(&["generate", "--model", m.to_str().unwrap(), "--prompt-tokens", "1,17,99,128,3,200,255", "--max-tokens", "4", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt_tokens"], serde_json::json!([1, 17, 99, 128, 3, 200, 255]));
    assert_eq!(v["tokens"], serde_json::json!([182, 90, 9, 9]), "mlx-lm's greedy tokens");
    assert!(v["prompt_tps"].as_f64().unwrap() > 0.0 && v["generation_tps"].as_f64().unwrap() > 0.0);
}

#[test]
fn info_describes_a_mixed_model() {
    let m = common::fixture("models/llama-mixed");
    let (code, out, err) = rmlx(&["info", "--model", m.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["layers"]["model.embed_tokens"], "affine 8-bit g64");
    assert_eq!(v["layers"]["model.layers.0.mlp.up_proj"], "affine 4-bit g64");
    assert_eq!(v["plugins"]["architecture llama"], "arch-llama");
    assert_eq!(v["plugins"]["weight-quant affine"], "wquant-affine");
    assert!(v["size_bytes"].as_u64().unwrap() > 0);
    // hidden 64, 2 layers, intermediate 128, vocab 256, untied
    let expect = 2 * 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64;
    assert_eq!(v["parameters"], expect);
}
