//! The set-up scripts' package detection (scripts/lib/sysdeps.sh), run
//! against fake `/usr/lib` trees: a fresh Debian 12 image has
//! `libclang-cpp.so.14` but no libclang that bindgen can load, and the
//! set-up must install one instead of taking libclang-cpp for it.
use std::path::Path;
use std::process::Command;

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/lib/sysdeps.sh")
        .display()
        .to_string()
}

/// Runs `call` (a function of sysdeps.sh) with SYSROOT=root; (exit ok, stdout lines).
fn run(root: &Path, call: &str, env: &[(&str, &str)]) -> (bool, Vec<String>) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(". '{}'; {call}", script()))
        .env("SYSROOT", root)
        .env("ARCH", "x86_64")
        .env_remove("LIBCLANG_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bash");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.replace(&root.display().to_string(), ""))
        .collect();
    (out.status.success(), lines)
}

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"").unwrap();
}

/// A tree with the build tools and OpenBLAS, so only libclang is in question.
fn base_tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for f in ["/usr/bin/cmake", "/usr/bin/c++"] {
        touch(t.path(), f);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.path().join(&f[1..]), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    touch(t.path(), "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3");
    t
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let t = base_tree();
    touch(t.path(), "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    touch(t.path(), "/usr/lib/llvm-14/lib/libclang-cpp.so.14");
    let (ok, found) = run(t.path(), "find_libclang", &[]);
    assert!(!ok, "libclang-cpp taken for libclang: {found:?}");
    let (_, missing) = run(t.path(), "missing_packages", &[]);
    assert_eq!(missing, vec!["libclang-dev"]);
}

#[test]
fn versioned_libclang_is_found() {
    for rel in [
        "/usr/lib/llvm-14/lib/libclang.so",
        "/usr/lib/llvm-14/lib/libclang-14.so.1",
        "/usr/lib/x86_64-linux-gnu/libclang-14.so.14",
        "/usr/lib/x86_64-linux-gnu/libclang.so.1",
    ] {
        let t = base_tree();
        touch(t.path(), "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
        touch(t.path(), rel);
        let (ok, found) = run(t.path(), "find_libclang", &[]);
        assert!(ok, "{rel} not found");
        assert_eq!(found, vec![rel.to_string()]);
        let (_, missing) = run(t.path(), "missing_packages", &[]);
        assert!(missing.is_empty(), "{rel}: still missing {missing:?}");
    }
}

#[test]
fn libclang_path_is_honoured() {
    let t = base_tree();
    touch(t.path(), "/opt/llvm/lib/libclang.so");
    let (ok, found) = run(t.path(), "find_libclang", &[("LIBCLANG_PATH", "/opt/llvm/lib")]);
    assert!(ok);
    assert_eq!(found, vec!["/opt/llvm/lib/libclang.so"]);
    // The file itself also works.
    let (ok, found) = run(t.path(), "find_libclang", &[("LIBCLANG_PATH", "/opt/llvm/lib/libclang.so")]);
    assert!(ok);
    assert_eq!(found, vec!["/opt/llvm/lib/libclang.so"]);
}

#[test]
fn an_empty_image_needs_every_package() {
    let t = tempfile::tempdir().unwrap();
    let (_, missing) = run(t.path(), "missing_packages", &[]);
    assert_eq!(missing, vec!["cmake", "g++", "libclang-dev", "libopenblas0-pthread"]);
}
