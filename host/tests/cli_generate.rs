//! `rmlx generate` as mlx-lm users expect it: the chat template by default
//! (`--raw` / `--no-chat-template` off), `--prompt -` from stdin, `-m`,
//! `--temp`, `--top-k`, `--min-p`, `--repetition-penalty`, `--stop`,
//! `--verbose`, and the speeds and peak memory on stderr.
mod common;

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `rmlx generate ARGS` with `stdin` as input; (exit code, stdout, stderr).
fn generate_with(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    json_in(args, None)
}

fn json_in(args: &[&str], stdin: Option<&str>) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = generate_with(&a, stdin);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn ids(v: &Value, key: &str) -> Vec<u64> {
    v[key].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

const Q: &str = "What is the capital of France?";

#[test]
fn chat_template_by_default_raw_turns_it_off_and_stdin_prompt() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let m = m.to_str().unwrap();
    let default = json(&["-m", m, "--prompt", Q, "--temp", "0", "--max-tokens", "12"]);
    let chat = json(&["--model", m, "--chat", "--prompt", Q, "--temperature", "0", "--max-tokens", "12"]);
    let raw = json(&["-m", m, "--raw", "--prompt", Q, "--temp", "0", "--max-tokens", "12"]);
    let no_tpl = json(&["-m", m, "--no-chat-template", "--prompt", Q, "--temp", "0", "--max-tokens", "12"]);
    assert_eq!(ids(&default, "prompt_tokens"), ids(&chat, "prompt_tokens"), "the template applies by default");
    assert_eq!(default["text"], chat["text"]);
    assert!(default["text"].as_str().unwrap().contains("Paris"), "{default}");
    let raw_ids = ids(&raw, "prompt_tokens");
    assert!(raw_ids.len() + 5 < ids(&default, "prompt_tokens").len(), "raw {raw_ids:?} vs {default}");
    assert_eq!(raw_ids, ids(&no_tpl, "prompt_tokens"));
    // --prompt - reads stdin (a trailing newline is part of the text, as given).
    let piped = json_in(&["-m", m, "--prompt", "-", "--temp", "0", "--max-tokens", "12"], Some(Q));
    assert_eq!(ids(&piped, "prompt_tokens"), ids(&default, "prompt_tokens"));
    assert_eq!(piped["text"], default["text"]);
    assert!(default["peak_memory_gb"].as_f64().unwrap() > 0.0, "{default}");
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let m = m.to_str().unwrap();
    let full = json(&["-m", m, "--prompt", Q, "--temp", "0", "--max-tokens", "24"]);
    let text = full["text"].as_str().unwrap();
    let at = text.find("Paris").unwrap_or_else(|| panic!("{full}"));
    let stopped = json(&["-m", m, "--prompt", Q, "--temp", "0", "--max-tokens", "24", "--stop", "Paris", "--stop", "never here"]);
    assert_eq!(stopped["text"].as_str().unwrap(), &text[..at], "{stopped}");
    assert_eq!(stopped["finish_reason"], "stop");
    // As text on stdout, too.
    let (code, out, err) = generate_with(&["-m", m, "--prompt", Q, "--temp", "0", "--max-tokens", "24", "--stop", "Paris"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim_end(), text[..at].trim_end());
}

#[test]
fn top_k_and_min_p_filter_and_repetition_penalty_changes_tokens() {
    let _g = common::mlx_lock();
    let m = common::fixture("models/llama-f32");
    let m = m.to_str().unwrap();
    let p = "1,17,99,128,3,200,255";
    let greedy = json(&["-m", m, "--prompt-tokens", p, "--max-tokens", "8"]);
    // Sampling at temperature 1, narrowed to the one most likely token: greedy again
    // (through the host-side sampler, not the device argmax).
    for flags in [["--top-k", "1"], ["--min-p", "1"]] {
        let mut a = vec!["-m", m, "--prompt-tokens", p, "--max-tokens", "8", "--temp", "1", "--seed", "5"];
        a.extend(flags);
        assert_eq!(json(&a)["tokens"], greedy["tokens"], "{flags:?}");
    }
    // Unfiltered sampling at a high temperature wanders off the greedy path.
    let hot = json(&["-m", m, "--prompt-tokens", p, "--max-tokens", "8", "--temp", "5", "--seed", "5"]);
    assert_ne!(hot["tokens"], greedy["tokens"]);
    // mlx-lm's greedy continuation repeats token 9; a strong penalty forbids it.
    assert_eq!(ids(&greedy, "tokens")[..4], [182, 90, 9, 9]);
    let pen = json(&["-m", m, "--prompt-tokens", p, "--max-tokens", "8", "--repetition-penalty", "1000"]);
    let toks = ids(&pen, "tokens");
    let mut seen = std::collections::HashSet::new();
    assert!(toks.iter().all(|t| seen.insert(*t)), "a token repeated under the penalty: {toks:?}");
}

#[test]
fn speeds_and_peak_memory_on_stderr_and_verbose_prompt() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let (code, out, err) = generate_with(&["-m", m.to_str().unwrap(), "--prompt", Q, "--max-tokens", "6", "--verbose"], None);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    for want in ["Prompt: ", " tokens-per-sec", "Generation: 6 tokens, ", "Peak memory: ", " GB", "finish: length"] {
        assert!(err.contains(want), "`{want}` missing from:\n{err}");
    }
    // --verbose shows the prompt as the model sees it: through the template.
    assert!(err.contains("<|im_start|>user") && err.contains(Q), "{err}");
}

#[test]
fn bad_values_are_one_line_errors() {
    let m = common::fixture("models/llama-f32");
    let m = m.to_str().unwrap();
    for (args, want) in [
        (vec!["--temp", "-1"], "--temp must be >= 0"),
        (vec!["--top-p", "0"], "--top-p must be in (0, 1]"),
        (vec!["--min-p", "2"], "--min-p must be in [0, 1]"),
        (vec!["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (vec!["--top-k", "x"], "invalid value 'x' for '--top-k"),
        (vec!["--raw", "--chat"], "cannot be used with"),
    ] {
        let mut a = vec!["-m", m, "--prompt-tokens", "1,2"];
        a.extend(&args);
        let (code, _, err) = generate_with(&a, None);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
    }
    // A model without a template: --system has nothing to go into.
    let (code, _, err) = generate_with(&["-m", m, "--prompt", "hi", "--system", "s"], None);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
}
