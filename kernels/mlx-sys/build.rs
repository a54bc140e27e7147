//! Generates bindings from the installed mlx-c headers and links the shared
//! libmlxc/libmlx. Where they live:
//! - `MLX_C_PREFIX` if set (macOS: Homebrew's mlx-c, e.g. /opt/homebrew);
//! - otherwise the repo's `.mlx/py/mlx`, made by `make mlx`.
//! RUNPATHs for final binaries are set in `.cargo/config.toml`.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MLX_C_PREFIX");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let prefix = match env::var_os("MLX_C_PREFIX") {
        Some(p) => PathBuf::from(p),
        None => manifest.join("../../.mlx/py/mlx"),
    };
    let include = prefix.join("include");
    let lib = prefix.join("lib");
    let header_dir = include.join("mlx/c");
    if !header_dir.join("mlx.h").exists() {
        panic!(
            "mlx-c headers not found in {}: run `make mlx` (or set MLX_C_PREFIX)",
            header_dir.display()
        );
    }
    let mut headers: Vec<PathBuf> = std::fs::read_dir(&header_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    let has_bus = header_dir.join("error_bus.h").exists();
    if has_bus {
        println!("cargo:rustc-cfg=rmlx_error_bus");
    }
    println!("cargo::rustc-check-cfg=cfg(rmlx_error_bus)");
    let mut builder = bindgen::Builder::default()
        .rust_target("1.73.0".parse().unwrap())
        .clang_arg(format!("-I{}", include.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc")
        // Routed through the rmlx error bus, see src/lib.rs.
        .blocklist_function("mlx_set_error_handler");
    for h in &headers {
        println!("cargo:rerun-if-changed={}", h.display());
        builder = builder.header(h.to_string_lossy());
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    builder
        .generate()
        .expect("bindgen failed on the mlx-c headers")
        .write_to_file(out.join("bindings.rs"))
        .unwrap();

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlxc");
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:libdir={}", lib.display());
    println!("cargo:include={}", include.display());
}
