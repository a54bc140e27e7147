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
    assert_clean_error(Path::new("/nonexistent/model"), "--model /nonexistent/model: no such directory");
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
    let text = std::fs::read_to_string(&p).unwrap().replace("\"llama\"", "\"falcon_mamba\"");
    std::fs::write(&p, text).unwrap();
    let m = d.path().to_str().unwrap();
    let (code, _, err) = rmlx(&["generate", "--model", m, "--prompt-tokens", "1"]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown model_type `falcon_mamba`"), "{err}");
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

#[test]
fn argument_errors_are_one_line() {
    for args in [
        vec!["generate", "--bogus"],
        vec!["generate", "--prompt", "x"],
        vec!["generate", "--model"],
        vec!["chat", "--max-tokens", "many", "-m", "x"],
        vec!["nosuchcommand"],
        vec!["serve", "--dequantize", "sometimes"],
        vec!["openapi", "--dtype", "float32"],
    ] {
        let (code, out, err) = rmlx(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected, got:\n{err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains("--help`)"), "{args:?}: {err}");
    }
    // clap's tip stays on the line.
    let (_, _, err) = rmlx(&["generate", "--temperatur", "1"]);
    assert!(err.contains("a similar argument exists: '--temperature'"), "{err}");
}

/// The flag entries of a `--help` text: (flag and its placeholder, description
/// with its continuation lines).
fn flag_entries(help: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        // `-x` or `--xy`, not a value list's `- text: ...`.
        let is_flag = t.starts_with("--") || (t.starts_with('-') && t[1..].starts_with(|c: char| c.is_ascii_alphanumeric()));
        if !is_flag || l.len() == t.len() {
            continue;
        }
        let indent = l.len() - t.len();
        let (flag, same) = match t.split_once("  ") {
            Some((f, d)) => (f.to_string(), d.trim().to_string()),
            None => (t.to_string(), String::new()),
        };
        let mut desc = vec![same];
        for n in &lines[i + 1..] {
            let nt = n.trim_start();
            if nt.is_empty() || nt.starts_with('-') || n.len() - nt.len() <= indent {
                break;
            }
            desc.push(nt.to_string());
        }
        out.push((flag, desc.join(" ").trim().to_string()));
    }
    out
}

fn help(cmd: &[&str]) -> String {
    let (code, out, err) = rmlx(&[cmd, &["--help"]].concat());
    assert_eq!(code, 0, "{cmd:?}: {err}");
    out
}

#[test]
fn every_flag_in_help_has_a_description() {
    let (_, top, _) = rmlx(&["--help"]);
    let cmds: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(cmds.contains(&"chat".to_string()) && cmds.contains(&"generate".to_string()), "{cmds:?}");
    let mut missing = Vec::new();
    for c in &cmds {
        let h = help(&[c]);
        for (flag, desc) in flag_entries(&h) {
            if desc.is_empty() {
                missing.push(format!("rmlx {c}: {flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "flags without a description:\n{}", missing.join("\n"));
}

#[test]
fn generate_and_chat_show_defaults() {
    for c in ["generate", "chat"] {
        for (flag, desc) in flag_entries(&help(&[c])) {
            // Flags that take a value (other than the model) say their default.
            if flag.contains('<') && !flag.contains("--model") {
                assert!(desc.contains("[default: "), "rmlx {c}: {flag} shows no default: {desc}");
            }
        }
    }
}

#[test]
fn commands_list_only_the_shared_flags_they_use() {
    let has = |cmd: &str, flag: &str| help(&[cmd]).contains(flag);
    for c in ["generate", "chat", "serve", "bench"] {
        for f in ["--config", "--plugins", "--dtype", "--dequantize"] {
            assert!(has(c, f), "rmlx {c} --help lacks {f}");
        }
    }
    for c in ["plugins", "info"] {
        assert!(has(c, "--plugins") && has(c, "--config"), "{c}");
        assert!(!has(c, "--dtype") && !has(c, "--dequantize"), "{c}");
    }
    assert!(has("metrics", "--config") && !has("metrics", "--plugins"));
    for c in ["openapi", "convert", "pull", "ls"] {
        for f in ["--config", "--plugins", "--dtype", "--dequantize"] {
            assert!(!has(c, f), "rmlx {c} --help lists {f}");
        }
    }
    // Before the command, as they once were global, they are still taken.
    let m = common::fixture("models/llama-f32");
    let m = m.to_str().unwrap();
    for args in [
        vec!["--dtype", "float32", "generate", "--model", m, "--prompt-tokens", "1,2", "--max-tokens", "1"],
        vec!["generate", "--dtype", "float32", "--dequantize", "--model", m, "--prompt-tokens", "1,2", "--max-tokens", "1"],
    ] {
        let (code, _, err) = rmlx(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
}
