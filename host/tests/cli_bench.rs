//! `rmlx bench --url` against a real `rmlx serve` child process on port 0:
//! the JSON report's fields and values (token counts as asked, TTFT > 0),
//! text prompts of exact lengths under a tokenizer, the shared-prefix pair,
//! and clear errors (bad URL, unknown model). Functional only, not timed.
mod common;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `rmlx serve`; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path) -> Server {
    let mut child = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--model"])
        .arg(model)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let url = loop {
        let Some(Ok(line)) = lines.next() else { panic!("rmlx serve exited before serving:\n{seen}") };
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split(" on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, url }
}

/// Runs `rmlx bench ARGS`; (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::rmlx_bin()).arg("bench").args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn bench_json(args: &[&str]) -> Value {
    let (code, out, err) = bench(args);
    assert_eq!(code, 0, "rmlx bench failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Every level has the fields, `c` requests of `g` tokens each, sane times.
fn check_levels(doc: &Value, levels: &[u64], p: u64, g: u64) {
    let got = doc["levels"].as_array().unwrap();
    assert_eq!(got.len(), levels.len(), "{doc}");
    for (l, &c) in got.iter().zip(levels) {
        assert_eq!(l["concurrency"], c, "{l}");
        assert_eq!(l["requests"], c, "{l}");
        assert_eq!(l["generated_tokens"], c * g, "{l}");
        assert_eq!(l["expected_tokens"], c * g, "{l}");
        assert_eq!(l["min_generated_tokens"], g, "{l}");
        assert_eq!(l["prompt_tokens_reported"], p, "{l}");
        let p50 = l["ttft_p50_s"].as_f64().unwrap();
        assert!(p50 > 0.0 && l["ttft_p95_s"].as_f64().unwrap() >= p50, "{l}");
        for k in ["stream_decode_tps_mean", "stream_decode_tps_min", "aggregate_decode_tps", "requests_per_s", "wall_s"] {
            assert!(l[k].as_f64().unwrap() > 0.0, "{k}: {l}");
        }
        assert!(l["stream_decode_tps_min"].as_f64() <= l["stream_decode_tps_mean"].as_f64(), "{l}");
        // rmlx serve has the /metrics gauge.
        assert_eq!(l["peak_memory_source"], "metrics", "{l}");
        assert!(l["peak_memory_bytes"].as_f64().unwrap() > 0.0, "{l}");
    }
}

#[test]
fn token_id_prompts_levels_and_shared_prefix() {
    let s = serve(&common::fixture("models/llama-f32"));
    let doc = bench_json(&[
        "--url", &s.url, "--concurrency", "1,2", "-p", "16", "-g", "4", "--eos-id", "2", "--shared-prefix", "32", "--json",
    ]);
    assert_eq!(doc["model"], "llama-f32");
    assert_eq!(doc["prompts"], "token_ids");
    assert_eq!(doc["suppressed_token_ids"], serde_json::json!([2]));
    check_levels(&doc, &[1, 2], 16, 4);
    let sp = &doc["shared_prefix"];
    assert_eq!(sp["prompt_tokens_reported"], serde_json::json!([32, 48]), "{sp}");
    assert_eq!(sp["generated_tokens"], serde_json::json!([4, 4]), "{sp}");
    for k in ["ttft_first_s", "ttft_second_s", "ratio"] {
        assert!(sp[k].as_f64().unwrap() > 0.0, "{k}: {sp}");
    }
    // Several requests per stream; the table (no --json) names every level.
    let (code, out, err) = bench(&["--url", &s.url, "--concurrency", "2", "--requests-per-stream", "2", "-p", "8", "-g", "3", "--eos-id", "2"]);
    assert_eq!(code, 0, "{err}");
    // Progress on stderr as it runs: the warm-up, the level starting and done.
    for want in ["warm-up request to ", "concurrency 2: 4 request(s) of 8 prompt + 3 generated tokens ...", "concurrency 2: done in "] {
        assert!(err.contains(want), "`{want}` missing from:\n{err}");
    }
    let row = out.lines().find(|l| l.trim_start().starts_with("2 ")).unwrap_or_else(|| panic!("no row for 2 streams:\n{out}"));
    assert!(row.contains("12/12"), "{row}");
}

#[test]
fn text_prompts_have_exact_lengths() {
    let model = common::default_model();
    let s = serve(&model);
    let doc = bench_json(&[
        "--url", &s.url, "--concurrency", "2", "-p", "24", "-g", "3", "--tokenizer", model.to_str().unwrap(), "--json",
    ]);
    assert_eq!(doc["prompts"], "text");
    assert!(!doc["suppressed_token_ids"].as_array().unwrap().is_empty(), "EOS ids from config.json: {doc}");
    check_levels(&doc, &[2], 24, 3);
}

#[test]
fn errors_are_clear() {
    // Nothing listens on port 1.
    let (code, _, err) = bench(&["--url", "http://127.0.0.1:1", "--model", "m", "-p", "4", "-g", "1"]);
    assert_ne!(code, 0);
    // Progress lines (stderr) first, then the one error line, last.
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error: cannot reach http://127.0.0.1:1") && last.contains("onnection refused"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
    assert!(err.starts_with("warm-up request to http://127.0.0.1:1"), "progress first: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = bench(&["--url", "localhost:8080"]);
    assert_ne!(code, 0);
    assert!(err.contains("--url must start with http://"), "{err}");
    // A 4xx with an OpenAI body: its message.
    let s = serve(&common::fixture("models/llama-f32"));
    let (code, _, err) = bench(&["--url", &s.url, "--model", "nope", "-p", "4", "-g", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("answered 404") && err.contains("`nope`"), "{err}");
    // Local-only and server-only flags do not mix.
    let (code, _, err) = bench(&["--model", "x", "--concurrency", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("--url"), "{err}");
}

#[test]
fn in_process_bench_shows_progress_and_units() {
    let m = common::fixture("models/llama-f32");
    let (code, out, err) = bench(&["--plugins", common::plugins_dir().to_str().unwrap(), "--model", m.to_str().unwrap(), "-p", "8", "-g", "4", "-n", "2"]);
    assert_eq!(code, 0, "{err}");
    for want in ["loading ", "warm-up: 8 prompt tokens, 4 generated ...", "trial 1/2 ...", "trial 2/2 ..."] {
        assert!(err.contains(want), "`{want}` missing from:\n{err}");
    }
    let avg = out.lines().find(|l| l.starts_with("Averages: ")).unwrap_or_else(|| panic!("{out}"));
    for unit in ["prompt_tps=", " tok/s, generation_tps=", " tok/s, peak_memory=", " GB"] {
        assert!(avg.contains(unit), "`{unit}` missing from: {avg}");
    }
    assert_eq!(out.lines().filter(|l| l.starts_with("Trial ") && l.ends_with(" GB")).count(), 2, "{out}");
    // --json carries the unit in the key.
    let (code, out, err) = bench(&["--plugins", common::plugins_dir().to_str().unwrap(), "--model", m.to_str().unwrap(), "-p", "8", "-g", "4", "-n", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["peak_memory_gb"].as_f64().unwrap() > 0.0, "{v}");
}
