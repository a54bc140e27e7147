//! The engine thread's models: which are resident, loading on demand (the
//! least recently used goes first at `max_loaded`), keep-alive expiry, the
//! list /v1/models shows, scoring jobs (embedding jobs: embeds.rs), and the KV families of a request's
//! lane (resolved once per model and choice).
use super::super::kv_family::{self, KvChoice};
use super::super::kv_pool::KvSide;
use super::super::score::TokenScore;
use super::super::sequence::panic_message;
use super::super::LoadedModel;
use super::run::Engine;
use super::{KeepAlive, LoadedInfo, ModelEntry, WorkerError};
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(super) struct Resident {
    pub(super) entry: Arc<ModelEntry>,
    pub(super) model: LoadedModel,
    pub(super) last_used: Instant,
    pub(super) loaded_at: u64,
    pub(super) keep_alive: KeepAlive,
    /// The KV sides (keys, values) of the lanes requests asked for, by choice.
    kv_lanes: HashMap<KvChoice, (KvSide, KvSide)>,
}

impl Resident {
    pub(super) fn expires(&self) -> Option<Instant> {
        match self.keep_alive {
            KeepAlive::Unload => Some(self.last_used),
            // A client's duration past what an `Instant` can hold is forever.
            KeepAlive::For(d) => self.last_used.checked_add(d),
            KeepAlive::Forever => None,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    /// Index of the resident model, loading it (and evicting LRU) if needed.
    /// None when it is not loaded and loading it would unload a model in
    /// `busy` (with running sequences).
    pub(super) fn ensure(
        &mut self,
        entry: &Arc<ModelEntry>,
        keep_alive: Option<KeepAlive>,
        busy: &[String],
    ) -> Result<Option<usize>> {
        let ka = keep_alive.unwrap_or(match self.cfg.idle_timeout {
            Some(d) => KeepAlive::For(d),
            None => KeepAlive::Forever,
        });
        if let Some(i) = self.models.iter().position(|m| m.entry.id == entry.id) {
            let m = &mut self.models[i];
            m.last_used = Instant::now();
            if keep_alive.is_some() {
                m.keep_alive = ka;
            }
            self.publish();
            return Ok(Some(i));
        }
        while self.models.len() >= self.cfg.max_loaded_models.max(1) {
            let Some(lru) = (0..self.models.len())
                .filter(|&i| !busy.contains(&self.models[i].entry.id))
                .min_by_key(|&i| self.models[i].last_used)
            else {
                return Ok(None);
            };
            let gone = self.models.remove(lru);
            self.sched.drop_model(&gone.entry.id);
            tracing::info!("unloading {} (least recently used)", gone.entry.id);
        }
        let t0 = Instant::now();
        let reg = &self.reg;
        // With its drafters, when it has some (speculative/serve.rs).
        let load = || {
            let mut m = LoadedModel::load(&entry.path, reg)?;
            for d in entry.drafters() {
                super::super::speculative::serve::attach(&mut m, d, reg)?;
            }
            Ok::<_, anyhow::Error>(m)
        };
        let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
            .map_err(|p| anyhow!("loading panicked: {}", panic_message(&*p)))??;
        tracing::info!("loaded {} in {:.2}s", entry.id, t0.elapsed().as_secs_f64());
        self.models.push(Resident {
            entry: entry.clone(),
            model,
            last_used: Instant::now(),
            loaded_at: now_secs(),
            keep_alive: ka,
            kv_lanes: HashMap::new(),
        });
        self.publish();
        Ok(Some(self.models.len() - 1))
    }

    /// Runs a scoring job between steps (a panic in it fails only it).
    pub(super) fn score(&mut self, entry: &Arc<ModelEntry>, prompt: &[u32], top_n: usize, keep_alive: Option<KeepAlive>) -> Result<Vec<Option<TokenScore>>, WorkerError> {
        let busy = self.sched.busy_models();
        let i = match self.ensure(entry, keep_alive, &busy) {
            Ok(Some(i)) => i,
            Ok(None) => return Err(WorkerError::Internal("every loaded model is busy; try again later".into())),
            Err(e) => return Err(WorkerError::Internal(format!("loading model `{}`: {e:#}", entry.id))),
        };
        let (model, chunk) = (&mut self.models[i].model, self.cfg.prefill_chunk);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::super::score::score_prompt(model, prompt, top_n, chunk)));
        self.models[i].last_used = Instant::now();
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(WorkerError::Internal(format!("{e:#}"))),
            Err(p) => Err(WorkerError::Internal(format!("internal error while scoring the prompt: {}", panic_message(&*p)))),
        }
    }

    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        let before = self.models.len();
        let busy = self.sched.busy_models();
        let mut gone = Vec::new();
        self.models.retain(|m| match m.expires() {
            Some(t) if t <= now && !busy.contains(&m.entry.id) => {
                tracing::info!("unloading {} (idle)", m.entry.id);
                gone.push(m.entry.id.clone());
                false
            }
            _ => true,
        });
        for id in gone {
            self.sched.drop_model(&id);
        }
        if before != self.models.len() {
            self.publish();
        }
    }

    pub(super) fn publish(&self) {
        let now_i = Instant::now();
        let now_s = now_secs();
        let list = self
            .models
            .iter()
            .map(|m| LoadedInfo {
                id: m.entry.id.clone(),
                loaded_at: m.loaded_at,
                expires_at: m
                    .expires()
                    .map(|t| now_s.saturating_add(t.saturating_duration_since(now_i).as_secs())),
            })
            .collect();
        *self.loaded.lock().unwrap() = list;
    }

    /// The KV sides (keys, values) a sequence of resident model `i` runs
    /// with: the model's own when `choice` is None; else the families it
    /// names, a side it leaves out taking the model's own. Resolved once
    /// per model and choice. An Err is the request's error (`kv_cache`).
    pub(super) fn lane_kv(&mut self, i: usize, choice: Option<&KvChoice>) -> Result<(KvSide, KvSide), WorkerError> {
        let r = &mut self.models[i];
        let own = &r.model.kv;
        let Some(c) = choice else { return Ok(own.clone()) };
        let full = KvChoice {
            k: Some(c.k.clone().unwrap_or_else(|| own.0.family.clone())),
            v: Some(c.v.clone().unwrap_or_else(|| own.1.family.clone())),
        };
        if full.k.as_deref() == Some(own.0.family.as_str()) && full.v.as_deref() == Some(own.1.family.as_str()) {
            return Ok(own.clone());
        }
        if let Some(kv) = r.kv_lanes.get(&full) {
            return Ok(kv.clone());
        }
        let kv = kv_family::resolve(&self.reg, &r.model.spec, own.0.dims.dtype, &full, r.model.kv_calibration.as_deref()).map_err(|e| WorkerError::BadField {
            field: "kv_cache".into(),
            message: format!("`kv_cache` {} does not fit model `{}`: {e:#}", full.label(), r.entry.id),
        })?;
        // Per-layer shapes (kv_layout.rs) each get the family's layout for their dims.
        let n = r.model.spec.num_layers as usize;
        if let Err(e) = super::super::kv_layout::for_layers(n, &kv.0, &kv.1, &r.model.cache_layers) {
            return Err(WorkerError::BadField {
                field: "kv_cache".into(),
                message: format!("`kv_cache` {} does not fit model `{}`: {}", full.label(), r.entry.id, e.message),
            });
        }
        r.kv_lanes.insert(full, kv.clone());
        Ok(kv)
    }
}
