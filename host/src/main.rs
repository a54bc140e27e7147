fn main() {
    // MLX's CUDA backend launches its kernels as CUDA graphs of at most
    // MLX_MAX_OPS_PER_BUFFER nodes (default 20); a decode step of a small
    // model is ~600 kernels, so every graph launch and update costs host time
    // per token. 100 measured 8-13% faster batch-1 decode on an H200
    // (docs/PERF.md). Set before MLX reads it; a user's value wins. Linux
    // only: there the variable reaches only the CUDA backend.
    #[cfg(target_os = "linux")]
    if std::env::var_os("MLX_MAX_OPS_PER_BUFFER").is_none() {
        std::env::set_var("MLX_MAX_OPS_PER_BUFFER", "100");
    }
    let code = match rmlx::cli::run() {
        Ok(()) => 0,
        Err(e) => {
            // One line for the user, causes joined; never a panic or a backtrace.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            1
        }
    };
    // Output flushed, MLX state dropped: leave without the C exit handlers
    // (OpenBLAS's could hang; cli/common.rs, docs/decisions.md).
    rmlx::cli::common::exit(code)
}
