//! `rmlx serve`: the HTTP server. Minimal for now: health and model listing.
use crate::config::Settings;
use anyhow::{Context, Result};
use poem::{get, handler, listener::TcpListener, web::Json, Route, Server};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory to serve (repeatable).
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// Address to bind (default 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind (default 8080).
    #[arg(long)]
    pub port: Option<u16>,
}

#[handler]
fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

pub fn app(models: Vec<String>) -> Route {
    let list = serde_json::json!({
        "object": "list",
        "data": models.iter().map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "rmlx"})).collect::<Vec<_>>(),
    });
    Route::new().at("/health", get(health)).at(
        "/v1/models",
        get(poem::endpoint::make_sync(move |_| Json(list.clone()))),
    )
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let reg = super::registry(settings)?;
    let mut ids = Vec::new();
    for m in &args.model {
        // Load each model once at start so a bad model fails fast.
        let loaded = crate::engine::LoadedModel::load(m, &reg)?;
        ids.push(loaded.dir.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    let addr = format!("{}:{}", settings.server.host, settings.server.port);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        eprintln!("rmlx serving {} on http://{addr}", ids.join(", "));
        Server::new(TcpListener::bind(&addr)).run(app(ids)).await.with_context(|| format!("serving on {addr}"))
    })
}
