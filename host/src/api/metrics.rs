//! `GET /metrics` (Prometheus text format 0.0.4) and the per-request
//! bookkeeping around every route.
//!
//! [`track`] wraps every route but /metrics: it opens the request's
//! [`RequestRecord`] (endpoint label from the route, status from the
//! response) and runs the handler inside the [`REQUEST`] task-local, so the
//! engine adds the tokens and timings of the sequences the handler submits.
//! [`note_model`] names the model on the record from the body (or the path)
//! before the handler runs, so requests refused before the engine still count
//! per model; ids that are not served count as `model=""`.
//!
//! [`render`] joins the counters and histograms the server owns
//! (engine/metrics.rs) with gauges and counters read from the engine's last
//! published stats (`EngineStats`: queue, running, KV blocks, prefix cache,
//! SSD tier, preemptions, MLX memory). Names are a contract: docs/SERVER.md.
use super::{AppState, State};
use crate::engine::metrics::{Metrics, RequestRecord, REQUEST};
use crate::engine::worker::ModelCatalog;
use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response};
use prometheus::{Encoder as _, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::Arc;

/// The route a path belongs to (ids folded, so labels stay few).
pub fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/messages" => "/v1/messages",
        "/v1/messages/count_tokens" => "/v1/messages/count_tokens",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/openapi.json" => "/openapi.json",
        p if p.starts_with("/v1/models/") && p.ends_with("/unload") => "/v1/models/{id}/unload",
        p if p.starts_with("/v1/models/") && p.ends_with("/load") => "/v1/models/{id}/load",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        p if p == "/docs" || p.starts_with("/docs/") => "/docs",
        _ => "other",
    }
}

/// Middleware body: counts the request and scopes its record (see the module doc).
pub async fn track<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    metrics: Arc<Metrics>,
) -> poem::Result<Response> {
    if req.uri().path() == "/metrics" {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let rec = RequestRecord::new(metrics, endpoint_label(req.uri().path()));
    let r = REQUEST.scope(rec.clone(), ep.call(req)).await;
    let r = r.map(IntoResponse::into_response);
    let status = match &r {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    };
    rec.set_status(status.as_u16());
    r
}

/// Puts the model a request names on its record: the body's `model` for the
/// generation routes, the path's id for /v1/models/{id}/... Only served ids
/// count. The body is read here (its size is already checked) and put back.
pub async fn note_model(req: &mut Request, catalog: &ModelCatalog) {
    let Ok(rec) = REQUEST.try_with(|r| r.clone()) else {
        return;
    };
    let path = req.uri().path().to_string();
    let id = if let Some(rest) = path.strip_prefix("/v1/models/") {
        Some(rest.split('/').next().unwrap_or("").to_string())
    } else if req.method() == poem::http::Method::POST && path.starts_with("/v1/") {
        let body = req.take_body().into_bytes().await.unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Named {
            model: Option<String>,
        }
        let id = serde_json::from_slice::<Named>(&body)
            .ok()
            .and_then(|n| n.model);
        req.set_body(body);
        id
    } else {
        None
    };
    if let Some(id) = id.filter(|id| catalog.get(id).is_some()) {
        rec.set_model(&id);
    }
}

/// The `/metrics` route.
pub fn endpoint(state: State) -> poem::RouteMethod {
    poem::get(poem::endpoint::make_sync(move |_| match render(&state) {
        Ok(text) => Response::builder()
            .content_type(prometheus::TEXT_FORMAT)
            .body(text),
        Err(e) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(format!("rendering metrics: {e}")),
    }))
}

/// The exposition text: the server's own families, then those read from the
/// engine's stats, by name.
pub fn render(state: &AppState) -> prometheus::Result<String> {
    let stats = state.worker.stats();
    let snap = Registry::new();
    let gauge = |name: &str, help: &str, v: u64| -> prometheus::Result<()> {
        let g = IntGauge::new(name, help)?;
        g.set(v as i64);
        snap.register(Box::new(g))
    };
    gauge(
        "rmlx_queue_depth",
        "Sequences waiting for admission.",
        stats.waiting as u64,
    )?;
    gauge(
        "rmlx_running_sequences",
        "Sequences admitted (prefilling or decoding).",
        stats.running as u64,
    )?;
    gauge(
        "rmlx_memory_active_bytes",
        "MLX memory in use.",
        stats.memory_active_bytes,
    )?;
    gauge(
        "rmlx_memory_peak_bytes",
        "Most MLX memory in use since the server started.",
        stats.memory_peak_bytes,
    )?;
    gauge(
        "rmlx_memory_cache_bytes",
        "MLX allocator cache (freed buffers kept for reuse).",
        stats.memory_cache_bytes,
    )?;
    let counter = |name: &str, help: &str, v: u64| -> prometheus::Result<()> {
        let c = prometheus::IntCounter::new(name, help)?;
        c.inc_by(v);
        snap.register(Box::new(c))
    };
    counter(
        "rmlx_prefill_forwards_total",
        "Prefill forwards run (a batched one carries the chunks of several prompts).",
        stats.prefill_forwards,
    )?;
    counter(
        "rmlx_prefill_chunks_total",
        "Prompt chunks prefilled (rmlx_prefill_forwards_total less than this: batched prefill).",
        stats.prefill_chunks,
    )?;
    let per_model_gauge =
        |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model"]);
    let per_model_counter =
        |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["model"]);
    let used = per_model_gauge(
        "rmlx_kv_blocks_used",
        "KV blocks held by running sequences.",
    )?;
    let free = per_model_gauge(
        "rmlx_kv_blocks_free",
        "KV blocks of the budget held by nothing.",
    )?;
    let cached = per_model_gauge(
        "rmlx_kv_blocks_cached",
        "KV blocks held by the prefix cache (evictable when unreferenced).",
    )?;
    let live_state = per_model_gauge(
        "rmlx_kv_state_bytes",
        "Recurrent state (hybrid models' gated DeltaNet conv + SSM state) of running sequences, charged to the KV budget.",
    )?;
    let snapshot_state = per_model_gauge(
        "rmlx_kv_state_snapshot_bytes",
        "Recurrent-state snapshots kept with prefix-cache blocks, charged to the KV budget.",
    )?;
    let hits = per_model_counter(
        "rmlx_prefix_cache_hits_total",
        "Admissions that reused prefix-cache blocks.",
    )?;
    let misses = per_model_counter(
        "rmlx_prefix_cache_misses_total",
        "Admissions that found no prefix-cache block.",
    )?;
    let hit_tokens = per_model_counter(
        "rmlx_prefix_cache_hit_tokens_total",
        "Prompt tokens whose prefill a prefix-cache hit skipped.",
    )?;
    let ssd_reads = per_model_counter(
        "rmlx_kv_ssd_reads_total",
        "KV blocks read back from the SSD tier.",
    )?;
    let ssd_writes = per_model_counter(
        "rmlx_kv_ssd_writes_total",
        "KV blocks written to the SSD tier.",
    )?;
    let ssd_state_reads = per_model_counter(
        "rmlx_kv_ssd_state_reads_total",
        "Recurrent-state snapshots read back from the SSD tier (hybrid models).",
    )?;
    let ssd_state_writes = per_model_counter(
        "rmlx_kv_ssd_state_writes_total",
        "Recurrent-state snapshots written to the SSD tier beside their blocks.",
    )?;
    let preemptions = per_model_counter(
        "rmlx_kv_preemptions_total",
        "Sequences preempted for KV room (requeued).",
    )?;
    for (model, b) in &stats.blocks {
        let l = [model.as_str()];
        used.with_label_values(&l).set(b.seq_blocks as i64);
        cached.with_label_values(&l).set(b.cached_blocks as i64);
        free.with_label_values(&l).set(b.free_blocks as i64);
        live_state.with_label_values(&l).set(b.live_state_bytes as i64);
        snapshot_state.with_label_values(&l).set(b.snapshot_bytes as i64);
        hits.with_label_values(&l).inc_by(b.prefix_hits);
        misses.with_label_values(&l).inc_by(b.prefix_misses);
        hit_tokens.with_label_values(&l).inc_by(b.prefix_hit_tokens);
        ssd_reads.with_label_values(&l).inc_by(b.ssd_reads);
        ssd_writes.with_label_values(&l).inc_by(b.ssd_writes);
        ssd_state_reads.with_label_values(&l).inc_by(b.ssd_state_reads);
        ssd_state_writes.with_label_values(&l).inc_by(b.ssd_state_writes);
        preemptions.with_label_values(&l).inc_by(b.preemptions);
    }
    // Per layer group (kv_groups.rs): blocks held / idle and one block's bytes.
    let per_group = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model", "group"]);
    let g_used = per_group(
        "rmlx_kv_group_blocks_used",
        "KV blocks held by running sequences, per layer group (full: every block of a sequence; window: sliding-window layers' blocks still in a window).",
    )?;
    let g_cached = per_group(
        "rmlx_kv_group_blocks_cached",
        "KV blocks of a layer group in the prefix cache that no running sequence holds (window group: idle window blocks).",
    )?;
    let g_bytes = per_group(
        "rmlx_kv_group_block_bytes",
        "Bytes of one KV block of a layer group (its layers' keys and values).",
    )?;
    let kv_used = IntGauge::new(
        "rmlx_kv_used_bytes",
        "Bytes charged to the KV budget now (every model's blocks of every group, recurrent state and snapshots).",
    )?;
    kv_used.set(stats.kv_used_bytes as i64);
    for (model, b) in &stats.blocks {
        for g in group_figures(b) {
            let l = [model.as_str(), g.group];
            g_used.with_label_values(&l).set(g.used as i64);
            g_cached.with_label_values(&l).set(g.idle as i64);
            g_bytes.with_label_values(&l).set(g.block_bytes as i64);
        }
    }
    snap.register(Box::new(kv_used))?;
    for g in [used, free, cached, live_state, snapshot_state, g_used, g_cached, g_bytes] {
        snap.register(Box::new(g))?;
    }
    for c in [hits, misses, hit_tokens, ssd_reads, ssd_writes, ssd_state_reads, ssd_state_writes, preemptions] {
        snap.register(Box::new(c))?;
    }
    // Speculative decoding, per drafter kind (`draft`).
    let per_kind = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["drafter"]);
    let drafted = per_kind("rmlx_spec_draft_tokens_total", "Draft tokens proposed by speculative decoding.")?;
    let accepted = per_kind("rmlx_spec_accepted_tokens_total", "Draft tokens the model kept.")?;
    let steps = per_kind("rmlx_spec_steps_total", "Speculative decode steps (one verify forward each).")?;
    let rate = prometheus::GaugeVec::new(Opts::new("rmlx_spec_acceptance_rate", "Draft tokens kept / proposed since the server started."), &["drafter"])?;
    for (kind, c) in &stats.speculation {
        let l = [kind.as_str()];
        drafted.with_label_values(&l).inc_by(c.drafted_tokens);
        accepted.with_label_values(&l).inc_by(c.accepted_tokens);
        steps.with_label_values(&l).inc_by(c.steps);
        rate.with_label_values(&l).set(c.accepted_tokens as f64 / c.drafted_tokens.max(1) as f64);
    }
    for c in [drafted, accepted, steps] {
        snap.register(Box::new(c))?;
    }
    snap.register(Box::new(rate))?;
    let mut families = state.worker.metrics().registry.gather();
    families.extend(snap.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut buf = Vec::new();
    TextEncoder::new().encode(&families, &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// One layer group's figures for `/metrics`.
#[derive(Debug, PartialEq)]
pub struct GroupFigures {
    pub group: &'static str,
    /// Blocks running sequences hold (one a block, however many share it).
    pub used: usize,
    /// Blocks kept for the prefix cache only (held by no sequence).
    pub idle: usize,
    pub block_bytes: u64,
}

/// A model's KV blocks per layer group: `full` (the group that keeps every
/// block of a sequence: the full-attention layers, or every storing layer
/// when the pool is not split) and, when the pool splits its sliding-window
/// layers off (`window_block_bytes > 0`), `window`.
pub fn group_figures(b: &crate::engine::block_manager::BlockStats) -> Vec<GroupFigures> {
    let mut v = vec![GroupFigures {
        group: "full",
        used: b.seq_blocks,
        idle: b.total_blocks.saturating_sub(b.seq_blocks + b.free_blocks),
        block_bytes: b.block_bytes - b.window_block_bytes,
    }];
    if b.window_block_bytes > 0 {
        v.push(GroupFigures {
            group: "window",
            used: b.window_held,
            idle: b.window_blocks - b.window_held,
            block_bytes: b.window_block_bytes,
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::block_manager::BlockStats;

    #[test]
    fn group_figures_split_and_unsplit() {
        // Gemma-3-270M's figures at blocks of 16: 3 full layers (98,304
        // bytes a block), 15 window layers (491,520); `snapshot` reports
        // block_bytes as a block position in every layer.
        let split = BlockStats {
            total_blocks: 100,
            seq_blocks: 40,
            cached_blocks: 50,
            free_blocks: 45,
            block_bytes: 589_824,
            window_block_bytes: 491_520,
            window_blocks: 36,
            window_held: 33,
            ..BlockStats::default()
        };
        assert_eq!(
            group_figures(&split),
            vec![
                GroupFigures { group: "full", used: 40, idle: 15, block_bytes: 98_304 },
                GroupFigures { group: "window", used: 33, idle: 3, block_bytes: 491_520 },
            ]
        );
        let unsplit = BlockStats { window_block_bytes: 0, window_blocks: 0, window_held: 0, ..split };
        assert_eq!(group_figures(&unsplit), vec![GroupFigures { group: "full", used: 40, idle: 15, block_bytes: 589_824 }]);
    }
}
