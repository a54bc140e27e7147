//! Speculative decoding in the server (`rmlx serve --draft-model`): the
//! draft model loaded beside a served model, the checks made at start and
//! at load, and what each speculating sequence keeps between steps. The
//! batched step itself is engine/scheduler/spec.rs; docs/SPECULATIVE.md.
//!
//! Draft KV: the draft model has its own paged pool and block manager per
//! lane of the verifier (`Lane::draft`), drawing its blocks from the
//! engine's one KV budget, and each speculating sequence holds a block table
//! in it (`SpecRow`). A paged pool (rather than a contiguous cache per
//! sequence) is what lets the k draft steps run batched, `[B_d, 1]` per
//! step for every drafting row at once, through the same `PagedForward` as
//! the verifier, and what rolls back by a length (blocks wholly past the
//! kept context go back to the manager). Draft blocks are never put in the
//! prefix cache: a sequence's draft KV is rebuilt from its tokens (one
//! batched catch-up forward) when it starts speculating or after a preemption.
use super::{adapt::DraftLength, check_pair, DraftKind, DEFAULT_DRAFT_TOKENS};
use crate::engine::LoadedModel;
use crate::model::ModelDir;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// Most sequences decoding together in a lane for speculation to run
/// (`--spec-max-batch`): above it the step is the plain `[B, 1]` one. A
/// reasoned default, not measured yet: the verify forward reads the weights
/// once for B (k + 1) tokens, which stays nearly free while the forward is
/// bound by memory bandwidth, but every drafting row adds k draft
/// positions, the padded rows of shorter drafts cost compute, and the step
/// loses pipelining (the host reads the acceptance before the next step).
/// At 8 rows with k = 3 the verify forward holds 32 positions, well inside
/// the bandwidth-bound range of a GPU for models of 0.5B-8B parameters.
pub const DEFAULT_SPEC_MAX_BATCH: usize = 8;

/// A served model's draft model, as configured (`--draft-model`,
/// `[[server.models]] draft_model`).
#[derive(Debug, Clone)]
pub struct DraftSpec {
    pub path: PathBuf,
    /// Draft tokens per round at first (adaptive per sequence after).
    pub num_draft_tokens: usize,
    pub kind: DraftKind,
}

impl DraftSpec {
    pub fn new(path: PathBuf, num_draft_tokens: Option<usize>, kind: Option<&str>) -> Result<Self> {
        let kind = DraftKind::parse(kind.unwrap_or("draft"))?;
        if kind == DraftKind::Mtp {
            bail!("--draft-kind mtp drafts in `rmlx generate` so far; the server speculates with a draft model (--draft-kind draft)");
        }
        let k = num_draft_tokens.unwrap_or(DEFAULT_DRAFT_TOKENS);
        if k == 0 {
            bail!("--num-draft-tokens must be at least 1 (a request's num_draft_tokens of 0 turns speculation off)");
        }
        Ok(Self { path, num_draft_tokens: k, kind })
    }
}

/// The drafter kind's name in metrics labels and logs.
pub fn kind_label(kind: DraftKind) -> &'static str {
    match kind {
        DraftKind::Draft => "draft",
        DraftKind::Mtp => "mtp",
    }
}

/// `vocab_size` of a model directory's config (or its `text_config`).
fn config_vocab(dir: &ModelDir) -> Option<u64> {
    let c = &dir.config;
    c.get("vocab_size").or_else(|| c.get("text_config").and_then(|t| t.get("vocab_size"))).and_then(|v| v.as_u64())
}

/// The check made when the server starts, from the config files only (the
/// models load on demand): the draft directory opens and its vocabulary
/// size is the model's.
pub fn check_at_start(model_id: &str, model_dir: &Path, spec: &DraftSpec) -> Result<()> {
    let draft = ModelDir::open(&spec.path).with_context(|| format!("the draft model of `{model_id}`"))?;
    let main = ModelDir::open(model_dir)?;
    if let (Some(v), Some(d)) = (config_vocab(&main), config_vocab(&draft)) {
        if v != d {
            bail!(
                "the draft model {} has a vocabulary of {d} tokens but the model `{model_id}` ({}) has {v}: speculative decoding needs a draft model with the same tokenizer",
                spec.path.display(),
                model_dir.display()
            );
        }
    }
    Ok(())
}

/// A loaded draft model beside its verifier.
pub struct Drafter {
    pub model: LoadedModel,
    pub num_draft_tokens: usize,
    pub kind: DraftKind,
}

/// Loads `spec`'s draft model for `model` (`LoadedModel::draft`). An Err is
/// the load's error (a draft model that cannot load, or that cannot draft
/// for this model). A verifier whose cache cannot be rolled back
/// (recurrent-state layers) serves without speculation, with a warning.
pub fn attach(model: &mut LoadedModel, spec: &DraftSpec, registry: &crate::plugins::Registry) -> Result<()> {
    if let Some(why) = refusal(model) {
        tracing::warn!("{}: speculative decoding is off for this model ({why}); it runs without its draft model", model.dir.path.display());
        return Ok(());
    }
    let draft = LoadedModel::load(&spec.path, registry).with_context(|| format!("loading the draft model {}", spec.path.display()))?;
    check_pair(model, &draft)?;
    if let Some(why) = refusal(&draft).or_else(|| draft.paged_refusal()) {
        bail!("the draft model {} cannot draft in the server: {why}", spec.path.display());
    }
    tracing::info!(
        "{}: speculative decoding with draft model {} ({} draft tokens at first)",
        model.dir.path.display(),
        spec.path.display(),
        spec.num_draft_tokens
    );
    model.draft = Some(Box::new(Drafter { model: draft, num_draft_tokens: spec.num_draft_tokens, kind: spec.kind }));
    Ok(())
}

/// Why a model's paged KV cannot be rolled back by a length, if it cannot.
fn refusal(model: &LoadedModel) -> Option<String> {
    model.has_state().then(|| "a layer keeps a recurrent state, which a roll-back would need snapshots of".to_string())
}

/// What a speculating sequence keeps between steps: its draft KV (a block
/// table in its lane's draft pool and how many tokens it holds), its draft
/// length, and the randomness of its acceptance.
pub struct SpecRow {
    pub table: Vec<u32>,
    pub kv_len: usize,
    pub len: DraftLength,
    pub rng: ChaCha8Rng,
}

impl SpecRow {
    /// `k` draft tokens at first; the request's seed seeds the acceptance
    /// (so a seed reproduces the same tokens with the same draft model).
    pub fn new(k: usize, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s ^ 0x5eed_d4af_7000_0001),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { table: Vec::new(), kv_len: 0, len: DraftLength::new(k, true), rng }
    }
}
