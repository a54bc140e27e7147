//! Shared test helpers: paths to the built plugins and fixtures.
#![allow(dead_code)]
pub mod api_images;
pub mod engine;
pub mod golden;
pub mod model;
pub mod mtp;
pub mod sampling;
pub mod spec;
pub mod vision;
use rmlx::plugins::Registry;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target")).join(
        if cfg!(debug_assertions) { "debug" } else { "release" },
    )
}

/// The staged plugin directory (`make build` stages it).
pub fn plugins_dir() -> PathBuf {
    let dir = target_dir().join("plugins");
    assert!(
        dir.join(format!("librmlx_arch_llama.{}", rmlx::plugins::loader::LIB_EXT)).exists(),
        "plugins are not built and staged in {}: run `make build` (cargo build --workspace && scripts/stage-plugins.sh)",
        dir.display()
    );
    dir
}

pub fn test_plugins_dir() -> PathBuf {
    target_dir().join("test-plugins")
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

pub fn registry() -> Registry {
    Registry::load(&plugins_dir()).expect("registry")
}

/// MLX work in tests runs one test at a time.
pub fn mlx_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Path of the built rmlx binary.
pub fn rmlx_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rmlx"))
}

/// The default model (SmolLM2-135M-Instruct) that `make default-model` converts.
pub fn default_model() -> PathBuf {
    let dir = std::env::var_os("RMLX_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("RMLX_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("rmlx")
        });
        cache.join("models/SmolLM2-135M-Instruct")
    });
    assert!(dir.join("config.json").exists(), "{} missing: run `make default-model`", dir.display());
    dir
}

/// SSE blocks as (event name, data), in order.
pub fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut ev = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    ev = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            (ev, data.join("\n"))
        })
        .collect()
}

/// Serves the API over `state` on 127.0.0.1:0 on a thread of its own;
/// returns the base URL.
pub fn serve(state: std::sync::Arc<rmlx::api::AppState>) -> String {
    stop_at_exit(state.worker.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            use poem::listener::{Acceptor, Listener};
            let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0").into_acceptor().await.unwrap();
            let addr = acceptor.local_addr()[0].as_socket_addr().cloned().unwrap();
            tx.send(format!("http://{addr}")).unwrap();
            poem::Server::new_with_acceptor(acceptor).run(rmlx::api::app(state)).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// Greedy token ids of `prompt` on fixture model `model` through the CLI's
/// generate loop (`rmlx generate`: one sequence, no cache of any kind).
pub fn greedy_reference(model: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    use rmlx::engine::{generate::generate, GenerateOptions, LoadedModel};
    let reg = registry();
    let mut m = LoadedModel::load(&fixture(&format!("models/{model}")), &reg).unwrap();
    let opts = GenerateOptions { max_tokens, temperature: 0.0, top_p: 1.0, seed: None, stop_ids: vec![], prefill_chunk: 512 };
    generate(&mut m, prompt, &opts, |_| {}).unwrap().tokens
}

/// Engines a test file keeps in a static for its whole run.
static AT_EXIT: std::sync::Mutex<Vec<rmlx::engine::worker::Worker>> = std::sync::Mutex::new(Vec::new());

extern "C" fn stop_engines() {
    let workers = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for w in workers {
        w.shutdown();
    }
}

/// Stops and joins `worker`'s engine thread when the test process exits.
/// A server in a static is never dropped, so without this its engine thread
/// may still be running a step (a request a test abandoned) while the C++
/// static destructors of MLX run: heap corruption at exit. `atexit` hooks run
/// in reverse order of registration, and this one is registered after MLX's
/// statics were constructed, so it runs before they are destroyed.
pub fn stop_at_exit(worker: rmlx::engine::worker::Worker) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(worker);
    HOOK.call_once(|| {
        // MLX builds some statics (allocator, scheduler, streams) on first
        // use; use them here so that their destructors are registered
        // before the hook.
        let a = mlx_rs::Array::from_slice(&[1f32, 2.0, 3.0, 4.0], &[2, 2]);
        let _ = a.matmul(&a).and_then(|b| b.sum(None)).map(|s| s.eval());
        unsafe {
            libc::atexit(stop_engines);
        }
    });
}
