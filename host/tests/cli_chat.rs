//! `rmlx chat` driven through stdin (not a terminal: plain lines): replies
//! stream to stdout, each turn's speeds go to stderr, the conversation is
//! carried from turn to turn, `/reset` forgets it (keeping `--system`), and
//! `/exit` leaves.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn chat(args: &[&str], input: &str) -> (i32, String, String) {
    let mut child = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "chat"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The prompt token counts of the turns, from the stats lines
/// `[N tokens, X tok/s | prompt P tokens, Y tok/s | ...]`.
fn prompt_counts(err: &str) -> Vec<usize> {
    err.lines()
        .filter(|l| l.starts_with('[') && l.contains(" tok/s"))
        .map(|l| {
            let p = l.split("| prompt ").nth(1).unwrap_or_else(|| panic!("{l}"));
            p.split(' ').next().unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn turns_history_reset_and_exit() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let input = "What is the capital of France?\nAnd of Germany?\n/reset\nWhat is the capital of France?\n/exit\nWhat is never asked?\n";
    let (code, out, err) = chat(&["-m", m.to_str().unwrap(), "--system", "You answer in one sentence.", "--max-tokens", "24"], input);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let counts = prompt_counts(&err);
    // Three turns: the fourth question comes after /exit.
    assert_eq!(counts.len(), 3, "{err}");
    // The second turn's prompt holds the first question and answer.
    assert!(counts[1] > counts[0] + 5, "{counts:?}");
    // After /reset the conversation starts again: the same prompt as the first turn.
    assert_eq!(counts[2], counts[0], "{counts:?}");
    assert!(err.contains("[conversation reset]"), "{err}");
    // Greedy: the same question after /reset gets the same reply: stdout
    // starts and ends with the same whole lines.
    let same = out
        .char_indices()
        .filter(|&(i, c)| c == '\n' && i > 5 && 2 * (i + 1) < out.len())
        .any(|(i, _)| out.ends_with(&out[..=i]));
    assert!(same, "the first and the last reply differ:\n{out}");
    assert!(out.contains("Paris"), "{out}");
}

#[test]
fn end_of_input_leaves_and_unknown_commands_are_named() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let (code, out, err) = chat(&["-m", m.to_str().unwrap(), "--max-tokens", "4"], "/nope\n\nHello\n");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("unknown command /nope"), "{err}");
    assert_eq!(prompt_counts(&err).len(), 1, "{err}");
    assert!(!out.trim().is_empty());
}

#[test]
fn a_model_without_a_template_is_a_one_line_error() {
    let m = common::fixture("models/llama-f32");
    let (code, _, err) = chat(&["-m", m.to_str().unwrap()], "hi\n");
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: rmlx chat needs a model with a tokenizer"), "{err}");
}

/// On a terminal (a pty from util-linux's `script`): the line editor's
/// prompt, a reply, `/exit`, and the history file written. Each line is sent
/// once the `>>> ` prompt for it has appeared. Skipped where `script` is missing.
#[test]
fn on_a_terminal_line_editing_and_history_file() {
    use std::io::Read;
    use std::sync::mpsc;
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` for a pty");
        return;
    }
    let _g = common::mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("hist");
    let cmd = format!(
        "{} --plugins {} chat -m {} --max-tokens 8 --history-file {}",
        common::rmlx_bin().display(),
        common::plugins_dir().display(),
        common::default_model().display(),
        history.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_prompts = |n: usize, seen: &mut String| {
        while seen.matches(">>> ").count() < n {
            let chunk = rx.recv_timeout(std::time::Duration::from_secs(120)).unwrap_or_else(|_| panic!("no prompt {n}:\n{seen}"));
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    wait_prompts(1, &mut seen);
    stdin.write_all(b"What is the capital of France?\r").unwrap();
    wait_prompts(2, &mut seen);
    stdin.write_all(b"/exit\r").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{seen}");
    assert!(seen.contains(" tok/s | prompt "), "{seen}");
    let h = std::fs::read_to_string(&history).unwrap();
    assert!(h.contains("What is the capital of France?") && h.contains("/exit"), "{h}");
}
