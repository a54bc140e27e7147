//! The scheduler's settings and their defaults for the backend in use.
use super::super::kv_budget::KvBudget;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The engine's KV memory, shared by every loaded model.
    pub kv_budget: KvBudget,
    /// Tokens per KV block (prefix-cache granularity).
    pub block_size: usize,
    /// Most sequences running (prefilling or decoding) at once.
    pub max_running: usize,
    /// Prompt tokens one step may prefill, in all, while streams of the
    /// lane decode (they wait for the step's prefill): at least one
    /// `--prefill-chunk`. While none decodes, every prefilling sequence
    /// takes its chunk regardless. `default_prefill_step_tokens`.
    pub prefill_step_tokens: usize,
    /// Automatic prefix caching.
    pub prefix_cache: bool,
    /// The prefix cache's SSD tier (`--kv-ssd-dir`, `--kv-ssd-gb`), per model.
    pub ssd: Option<super::super::ssd::SsdConfig>,
    /// Speculative decoding runs while a lane decodes at most this many
    /// sequences (`--spec-max-batch`; speculative/serve.rs says why 8).
    pub spec_max_batch: usize,
    /// Keep every verified row's drafts in `SpecCounts::draft_log` (tests
    /// compare them with `rmlx generate`'s; off in the server).
    pub log_drafts: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            kv_budget: KvBudget::Fraction(0.5),
            block_size: 16,
            max_running: default_max_running(),
            prefill_step_tokens: default_prefill_step_tokens(),
            prefix_cache: true,
            ssd: None,
            spec_max_batch: super::super::speculative::serve::DEFAULT_SPEC_MAX_BATCH,
            log_drafts: false,
        }
    }
}

/// `--max-running`'s default for the backend in use: 16 on a CPU, where
/// every row costs its full share of compute and more rows only lengthen
/// each step; 256 on a GPU, where a decode step's cost barely grows with
/// its rows (docs/PERF.md: 32 streams under the old default of 16 ran half
/// the batch and queued the rest). The KV budget still bounds admission.
pub fn default_max_running() -> usize {
    if crate::model::policy::on_cpu() {
        16
    } else {
        256
    }
}

/// `prefill_step_tokens`' default for the backend (`RMLX_PREFILL_STEP_TOKENS`
/// tunes it; 0: one chunk). On a GPU 8,192, vLLM's step budget for
/// H100-class cards: prompts that come while others decode (a burst whose
/// first request started alone, streams joining a running batch) prefill
/// together in one ragged forward, which costs the device little more
/// than one of them alone (docs/PERF.md, H100: mlx-lm prefills eight
/// 512-token prompts in 0.028 s, one in 0.018 s), instead of one prompt a
/// step, each step also running a decode forward. On a CPU one chunk: prefill there is
/// compute-bound (eight prompts together cost eight times one), so
/// batching them only delays the first of them and stalls the streams
/// decoding for longer.
pub fn default_prefill_step_tokens() -> usize {
    static ENV: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    if let Some(n) = *ENV.get_or_init(|| std::env::var("RMLX_PREFILL_STEP_TOKENS").ok().and_then(|v| v.trim().parse().ok())) {
        return n;
    }
    if crate::model::policy::on_cpu() {
        0
    } else {
        8192
    }
}
