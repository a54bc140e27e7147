//! Embedding jobs, batched across requests. `Job::Embed` does not run when
//! the engine thread takes it: it waits in [`Engine::embeds`] until the
//! thread has taken every job that is waiting (between scheduler steps, or
//! after waking from idle, those that arrive within the arrival gap; see
//! worker/run.rs). Then [`Engine::run_embeds`] runs the jobs of one model,
//! `dims` and task (a multi-task embedder's adapters, selected on the model
//! around the run: model/adapters.rs) together: their rows go into one `embed` call, which sorts
//! them by length and packs them into padded batches (each row's valid
//! length masks its padding), and each request gets its own rows back, in
//! its order.
//!
//! Errors stay per request: a request whose rows are bad (empty, too long,
//! a token outside the vocabulary) is answered alone before the others run;
//! if a shared run fails anyway (an error or a panic), each of its requests
//! runs again by itself, so only the one that fails alone fails.
//!
//! Metrics: `rmlx_embedding_batch_requests` (requests per run) and
//! `rmlx_embedding_forward_rows` (rows per forward), per model.
use super::super::embed::{check_rows, embed_observed};
use super::super::embed_image::embed_image_doc;
use super::super::sequence::panic_message;
use super::run::Engine;
use super::{KeepAlive, ModelEntry, WorkerError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// An embedding job waiting for the engine's next embedding run.
pub(super) struct PendingEmbed {
    pub model: Arc<ModelEntry>,
    pub rows: Vec<Vec<u32>>,
    pub dims: Option<usize>,
    pub task: Option<usize>,
    /// Rows that are image documents: (row, image). Such a job runs alone.
    pub images: Vec<(usize, crate::engine::media::PromptImage)>,
    pub keep_alive: Option<KeepAlive>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, WorkerError>>,
}

/// Set `RMLX_EMBED_MERGE=0` to run each embedding request by itself (for
/// comparing; the default merges).
fn merge() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_EMBED_MERGE").map(|v| v != "0").unwrap_or(true))
}

impl Engine {
    /// Runs the waiting embedding jobs: those of one model and `dims`
    /// together, groups in the order their first job came.
    pub(super) fn run_embeds(&mut self) {
        if self.embeds.is_empty() {
            return;
        }
        let jobs = std::mem::take(&mut self.embeds);
        let mut groups: Vec<Vec<PendingEmbed>> = Vec::new();
        for j in jobs {
            let same = |g: &Vec<PendingEmbed>| {
                merge()
                    && g[0].model.id == j.model.id
                    && g[0].dims == j.dims
                    && g[0].task == j.task
                    && g[0].images.is_empty()
                    && j.images.is_empty()
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.push(j),
                None => groups.push(vec![j]),
            }
        }
        for g in groups {
            self.run_embed_group(g);
        }
    }

    /// One model's jobs (same `dims`): checked one by one, then run together.
    fn run_embed_group(&mut self, jobs: Vec<PendingEmbed>) {
        let entry = jobs[0].model.clone();
        let Some(spec) = entry.embedding.clone() else {
            for j in jobs {
                let message = format!("{}", super::super::embed::not_an_embedder(&entry.id));
                let _ = j.reply.send(Err(WorkerError::BadField { field: "model".into(), message }));
            }
            return;
        };
        // The latest keep-alive a request gave applies.
        let keep_alive = jobs.iter().rev().find_map(|j| j.keep_alive);
        let busy = self.sched.busy_models();
        let i = match self.ensure(&entry, keep_alive, &busy) {
            Ok(Some(i)) => i,
            Ok(None) => {
                for j in jobs {
                    let _ = j.reply.send(Err(WorkerError::Internal("every loaded model is busy; try again later".into())));
                }
                return;
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(WorkerError::Internal(format!("loading model `{}`: {e:#}", entry.id))));
                }
                return;
            }
        };
        // Bad rows fail their own request only.
        let vocab = self.models[i].model.spec.vocab_size;
        let jobs: Vec<PendingEmbed> = jobs
            .into_iter()
            .filter_map(|j| match check_rows(&j.rows, vocab, spec.max_tokens) {
                None => Some(j),
                Some(message) => {
                    let _ = j.reply.send(Err(WorkerError::BadField { field: "input".into(), message }));
                    None
                }
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let metrics = self.tracker.metrics().clone();
        let label = [entry.id.as_str()];
        let (dims, task) = (jobs[0].dims, jobs[0].task);
        let model = &mut self.models[i].model;
        if let Err(e) = model.select_task(task) {
            for j in jobs {
                let _ = j.reply.send(Err(WorkerError::BadField { field: "task".into(), message: format!("{e:#}") }));
            }
            return;
        }
        let mut run = |rows: &[Vec<u32>]| -> Result<Vec<Vec<f32>>, WorkerError> {
            let mut seen = |n: usize| metrics.embed_rows.with_label_values(&label).observe(n as f64);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embed_observed(model, &spec, rows, dims, &mut seen)));
            match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(WorkerError::Internal(format!("{e:#}"))),
                Err(p) => Err(WorkerError::Internal(format!("internal error while embedding: {}", panic_message(&*p)))),
            }
        };
        metrics.embed_requests.with_label_values(&label).observe(jobs.len() as f64);
        if jobs.len() == 1 && !jobs[0].images.is_empty() {
            // Text rows in one run, then each image document in a forward of its own.
            let j = jobs.into_iter().next().expect("one job");
            let texts: Vec<usize> = (0..j.rows.len()).filter(|r| !j.images.iter().any(|(i, _)| i == r)).collect();
            let text_rows: Vec<Vec<u32>> = texts.iter().map(|&r| j.rows[r].clone()).collect();
            let result: Result<Vec<Vec<f32>>, WorkerError> = 'run: {
                let mut out: Vec<Vec<f32>> = vec![Vec::new(); j.rows.len()];
                if !text_rows.is_empty() {
                    match run(&text_rows) {
                        Ok(vecs) => texts.iter().zip(vecs).for_each(|(r, v)| out[*r] = v),
                        Err(e) => break 'run Err(e),
                    }
                }
                for (r, image) in &j.images {
                    let ids = &j.rows[*r];
                    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embed_image_doc(model, &spec, ids, image, dims)));
                    out[*r] = match e {
                        Ok(Ok(v)) => v,
                        Ok(Err(e)) => break 'run Err(WorkerError::Internal(format!("{e:#}"))),
                        Err(p) => break 'run Err(WorkerError::Internal(format!("internal error while embedding: {}", panic_message(&*p)))),
                    };
                    metrics.embed_rows.with_label_values(&label).observe(1.0);
                }
                Ok(out)
            };
            let _ = j.reply.send(result);
        } else if jobs.len() == 1 {
            let j = jobs.into_iter().next().expect("one job");
            let _ = j.reply.send(run(&j.rows));
        } else {
            // [rows of job 0, rows of job 1, ...]
            let all: Vec<Vec<u32>> = jobs.iter().flat_map(|j| j.rows.iter().cloned()).collect();
            match run(&all) {
                Ok(vecs) => {
                    let mut vecs = vecs.into_iter();
                    for j in jobs {
                        let mine: Vec<Vec<f32>> = vecs.by_ref().take(j.rows.len()).collect();
                        let _ = j.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    // Which request broke the shared run? Each runs alone.
                    tracing::warn!("an embedding run of {} requests failed ({e}); running them one by one", jobs.len());
                    for j in jobs {
                        let _ = j.reply.send(run(&j.rows));
                    }
                }
            }
        }
        // The base model again for whatever runs next.
        let _ = self.models[i].model.select_task(None);
        self.models[i].last_used = Instant::now();
    }
}
