//! How `rmlx` ends: the CPU path (`--dtype float32 --dequantize`, OpenBLAS
//! under MLX) exits every time (it hung in OpenBLAS's thread shutdown at
//! exit in about half the runs before `cli::common::exit`), and a closed
//! pipe on stdout ends a command quietly, never with a panic.
mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Waits for `child` at most `limit`; kills it and returns None past that.
fn wait_for(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cpu_path_exits_every_time() {
    let _g = common::mlx_lock();
    let model = common::default_model();
    for i in 0..20 {
        let mut child = Command::new(common::rmlx_bin())
            .args(["--plugins", common::plugins_dir().to_str().unwrap()])
            .args(["--dtype", "float32", "--dequantize", "generate", "--model", model.to_str().unwrap()])
            .args(["--prompt", "What is the capital of France?", "--max-tokens", "8"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        // Small outputs: the pipes never fill, so reading after the wait is safe.
        let status = wait_for(&mut child, Duration::from_secs(60));
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = status.unwrap_or_else(|| panic!("run {i}: still running after 60 s (hung at exit?)\n{err}"));
        assert!(status.success(), "run {i}: {status:?}\n{err}");
        assert!(!out.trim().is_empty(), "run {i}: no text");
        assert!(err.contains("Generation: "), "run {i}: {err}");
    }
}

/// `cmd` with its stdout closed before it writes: no panic, and it ends
/// with success or SIGPIPE (as `head` makes other Unix tools end).
fn closed_pipe_is_quiet(args: &[&str]) {
    let mut child = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap()])
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = wait_for(&mut child, Duration::from_secs(120)).unwrap_or_else(|| panic!("{args:?}: hung"));
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    assert!(
        status.success() || status.signal() == Some(libc_sigpipe()),
        "{args:?}: {status:?}\n{err}"
    );
}

fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn closed_pipe_ends_quietly() {
    closed_pipe_is_quiet(&["openapi"]);
    closed_pipe_is_quiet(&["plugins"]);
    let _g = common::mlx_lock();
    let m = common::fixture("models/llama-f32");
    closed_pipe_is_quiet(&["generate", "--model", m.to_str().unwrap(), "--prompt-tokens", "1,2,3", "--max-tokens", "4"]);
    let d = common::default_model();
    closed_pipe_is_quiet(&["generate", "--model", d.to_str().unwrap(), "--prompt", "Hi", "--max-tokens", "4"]);
}

/// Reading one line of a long output (`rmlx openapi | head -1`) and closing.
#[test]
fn head_of_openapi() {
    let mut child = Command::new(common::rmlx_bin())
        .arg("openapi")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = wait_for(&mut child, Duration::from_secs(60)).expect("hung");
    assert_eq!(&first, b"{");
    assert!(err.is_empty(), "{err}");
    assert!(status.success() || status.signal() == Some(libc_sigpipe()), "{status:?}");
}
