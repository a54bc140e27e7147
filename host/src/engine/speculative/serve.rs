//! Speculative decoding in the server (`rmlx serve --draft-model`): the
//! drafters loaded beside a served model (`LoadedModel::drafters`: one per
//! kind, the first the model's default, a request picking another with
//! `draft_kind`), the checks made at start and at load, and what each
//! speculating sequence keeps between steps. The batched step itself is
//! engine/scheduler/spec.rs; docs/SPECULATIVE.md.
//!
//! Draft KV: each drafter has its own paged pool and block manager per
//! lane of the verifier (`Lane::drafts`), drawing its blocks from the
//! engine's one KV budget, and each speculating sequence holds a block table
//! in it (`SpecRow`). A paged pool (rather than a contiguous cache per
//! sequence) is what lets the k draft steps run batched, `[B_d, 1]` per
//! step for every drafting row at once, through the same `PagedForward` as
//! the verifier, and what rolls back by a length (blocks wholly past the
//! kept context go back to the manager). Draft blocks are never put in the
//! prefix cache: a sequence's draft KV is rebuilt from its tokens (one
//! batched catch-up forward) when it starts speculating or after a preemption.
//!
//! Drafter heads (plugin ABI 3.6: `Model::conditioning`; the `mtp` kind, and
//! any head kind whose architecture the registry builds as
//! `{model_type}_{kind}`) take the same per-lane paged pool for their own
//! K/V. What differs is where their input comes from: the verifier's hidden
//! states at the layers the head names, returned by the verify forward
//! itself, and the head's own state (`HEAD_STATE`) for its chained draft
//! steps. A speculating row keeps the head's last output (`HeadSeed`)
//! between steps; the host never asks which head it is.
//!
//! A block drafter (`dflash`: proposes a whole block in one forward over a
//! context it attends to non-causally, which the paged pool refuses) keeps
//! no pool: each speculating sequence holds its own `ContextStore`
//! (`SpecRow::block`), charged to the engine's KV budget
//! (scheduler/spec/dflash.rs, spec/prompt.rs).
//!
//! A verifier with recurrent-state layers (gated DeltaNet) rolls back by
//! restoring the state from before the verify forward (the sequence's own
//! state is only replaced when a row keeps every position it verified) and
//! feeding the kept tokens again (scheduler/spec.rs).
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

/// `rmlx serve`'s `spec_max_batch` for the backend in use: the GPU's
/// [`DEFAULT_SPEC_MAX_BATCH`], and 1 on a CPU (a lone sequence speculates).
/// A CPU's forward stops being bound by reading the weights after a few
/// rows: measured with the real Qwen2.5-Coder 0.5B -> 1.5B pair at 8
/// streams on this project's 2-core CPU, speculation ran at 0.73x the plain
/// step (docs/SPECULATIVE.md, "Real pair on CPU"); 2 to 7 rows are not
/// measured. `--spec-max-batch` tunes it.
pub fn default_spec_max_batch() -> usize {
    if crate::model::policy::on_cpu() {
        1
    } else {
        DEFAULT_SPEC_MAX_BATCH
    }
}

/// A served model's draft model, as configured (`--draft-model`,
/// `[[server.models]] draft_model`).
#[derive(Debug, Clone)]
pub struct DraftSpec {
    pub path: PathBuf,
    /// Draft tokens per round at first (adaptive per sequence after); 0
    /// for a DFlash drafter: its block size less one.
    pub num_draft_tokens: usize,
    pub kind: DraftKind,
}

impl DraftSpec {
    pub fn new(path: PathBuf, num_draft_tokens: Option<usize>, kind: Option<&str>) -> Result<Self> {
        let kind = DraftKind::parse(kind.unwrap_or("draft"))?;
        if num_draft_tokens == Some(0) {
            bail!("--num-draft-tokens must be at least 1 (a request's num_draft_tokens of 0 turns speculation off)");
        }
        // A DFlash drafter's default is its trained block less one (set at load).
        let k = num_draft_tokens.unwrap_or(if kind == DraftKind::Dflash { 0 } else { DEFAULT_DRAFT_TOKENS });
        Ok(Self { path, num_draft_tokens: k, kind })
    }
}

/// The drafter kind's name in metrics labels and logs, and the suffix of a
/// head kind's architecture (`{model_type}_{kind}`): `draft`, `mtp`, ...
pub fn kind_label(kind: DraftKind) -> String {
    format!("{kind:?}").to_lowercase()
}

/// `key` of a model directory's config (or its `text_config`).
fn config_u64(dir: &ModelDir, key: &str) -> Option<u64> {
    let c = &dir.config;
    c.get(key).or_else(|| c.get("text_config").and_then(|t| t.get(key))).and_then(|v| v.as_u64())
}

/// `vocab_size` of a model directory's config (or its `text_config`).
fn config_vocab(dir: &ModelDir) -> Option<u64> {
    config_u64(dir, "vocab_size")
}

/// The check made when the server starts, from the config files only (the
/// models load on demand): the draft directory opens and its vocabulary
/// size is the model's.
pub fn check_at_start(model_id: &str, model_dir: &Path, spec: &DraftSpec) -> Result<()> {
    let same = spec.path == model_dir || std::fs::canonicalize(&spec.path).ok() == std::fs::canonicalize(model_dir).ok();
    if spec.kind == DraftKind::Eagle3 && same {
        bail!("--draft-kind eagle3 for `{model_id}` needs --draft-model DIR: the Eagle-3 head's own directory (it shares the model's embedding)");
    }
    if spec.kind == DraftKind::Dflash && same {
        bail!("--draft-kind dflash for `{model_id}` needs --draft-model DIR: the DFlash drafter's own directory (it shares the model's embedding and LM head)");
    }
    let draft = ModelDir::open(&spec.path).with_context(|| format!("the draft model of `{model_id}`"))?;
    let main = ModelDir::open(model_dir)?;
    if spec.kind == DraftKind::Dflash {
        if let (Some(v), Some(d)) = (config_u64(&main, "hidden_size"), config_u64(&draft, "hidden_size")) {
            if v != d {
                bail!(
                    "the DFlash drafter {} has a hidden size of {d} but the model `{model_id}` ({}) has {v}: it reads the model's hidden states and embedding",
                    spec.path.display(),
                    model_dir.display()
                );
            }
        }
    }
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

/// The check made at start for a head read from the model's own checkpoint
/// (`mtp`): some plugin builds `{model_type}_{kind}` for the model's type
/// (whether the checkpoint holds the head's tensors shows at load).
pub fn check_head_at_start(model_id: &str, spec: &DraftSpec, registry: &crate::plugins::Registry) -> Result<()> {
    if spec.kind == DraftKind::Draft {
        return Ok(());
    }
    let dir = ModelDir::open(&spec.path)?;
    let label = kind_label(spec.kind);
    let arch = format!("{}_{label}", dir.model_type);
    if registry.architecture_plugin(&arch).is_err() {
        bail!("--draft-kind {label} for `{model_id}`: no architecture plugin builds a `{label}` drafter head for model_type `{}` (it would register `{arch}`)", dir.model_type);
    }
    Ok(())
}

/// A loaded draft model (or drafter head) beside its verifier.
pub struct Drafter {
    pub model: LoadedModel,
    pub num_draft_tokens: usize,
    pub kind: DraftKind,
    /// A drafter head's conditioning: the verifier layers (absolute
    /// indices, in the head's order) whose hidden states it reads, which
    /// the verify forward returns. Empty for a draft model.
    pub conditioning: Vec<u32>,
    /// A block drafter (DFlash): proposes a whole block in one forward over
    /// a context store of its own per sequence (scheduler/spec/dflash.rs).
    pub block: Option<BlockDrafter>,
}

/// A DFlash drafter's block settings (dflash.rs `block_settings`).
#[derive(Debug, Clone, Copy)]
pub struct BlockDrafter {
    /// The token of the block's masked positions.
    pub mask_id: u32,
    /// The block it was trained with (the bonus and the drafts): a step
    /// drafts at most `size - 1`.
    pub size: usize,
    /// Its conditioning's width (target layers x hidden size).
    pub width: i32,
}

impl Drafter {
    /// Whether it is a drafter head (fed the verifier's hidden states)
    /// rather than a separate draft model (fed tokens).
    pub fn is_head(&self) -> bool {
        !self.conditioning.is_empty()
    }

    /// Whether it is a head that chains one token per step over the lane's
    /// paged pool (mtp, eagle3), as opposed to a block drafter.
    pub fn is_chained_head(&self) -> bool {
        self.is_head() && self.block.is_none()
    }
}

/// A head's conditioning layers as absolute verifier layer indices
/// (negative counts from the end).
pub fn absolute_layers(conditioning: &[i32], num_layers: u32) -> Result<Vec<u32>> {
    let n = num_layers as i32;
    conditioning
        .iter()
        .map(|&l| {
            let i = if l < 0 { n + l } else { l };
            if !(0..n).contains(&i) {
                bail!("the drafter head conditions on layer {l}, but the model has {n} layers");
            }
            Ok(i as u32)
        })
        .collect()
}

/// Loads `spec`'s drafter for `model`, after those it has
/// (`LoadedModel::drafters`; the first is the model's default). An Err is
/// the load's error (a draft model that cannot load, or that cannot draft
/// for this model). A verifier whose cache cannot be rolled back
/// (recurrent-state layers) serves without speculation, with a warning.
pub fn attach(model: &mut LoadedModel, spec: &DraftSpec, registry: &crate::plugins::Registry) -> Result<()> {
    let label = kind_label(spec.kind);
    if model.drafters.iter().any(|d| d.kind == spec.kind) {
        bail!("{}: a `{label}` drafter is attached already (each kind once per model)", model.dir.path.display());
    }
    let (draft, what) = if spec.kind == DraftKind::Draft {
        let d = LoadedModel::load(&spec.path, registry).with_context(|| format!("loading the draft model {}", spec.path.display()))?;
        (d, "draft model")
    } else {
        // A drafter head from `spec.path` (the verifier's own checkpoint
        // for `mtp`; for `eagle3` a directory of its own whose missing
        // tensors, the embedding, are the verifier's), built by whichever
        // plugin registers `{model_type}_{kind}`.
        let policy = crate::model::policy::resolve(&ModelDir::open(&model.dir.path)?)?.policy;
        let h = if matches!(spec.kind, DraftKind::Eagle3 | DraftKind::Dflash) {
            LoadedModel::load_head_from(&spec.path, &model.dir.path, &label, registry, policy)
        } else {
            LoadedModel::load_head(&spec.path, &label, registry, policy)
        };
        let h = h.with_context(|| format!("loading the `{label}` drafter head of {}", spec.path.display()))?;
        (h, "drafter head")
    };
    check_pair(model, &draft)?;
    let conditioning = absolute_layers(&draft.conditioning, model.spec.num_layers)?;
    if spec.kind != DraftKind::Draft && conditioning.is_empty() {
        bail!("the `{label}` drafter of {} names no verifier layers to condition on", spec.path.display());
    }
    if let Some(why) = (spec.kind != DraftKind::Draft).then(|| refusal(&draft)).flatten() {
        tracing::warn!("{}: speculative decoding is off for this model ({why}); it runs without its {what}", model.dir.path.display());
        return Ok(());
    }
    let mut num_draft_tokens = spec.num_draft_tokens;
    let block = if spec.kind == DraftKind::Dflash {
        if draft.spec.hidden_size != model.spec.hidden_size {
            bail!(
                "the DFlash drafter's hidden size is {} but the model's is {}: it reads the model's hidden states and embedding",
                draft.spec.hidden_size,
                model.spec.hidden_size
            );
        }
        let (mask_id, size) = super::dflash::block_settings(&draft)?;
        if mask_id >= draft.spec.vocab_size {
            bail!("the DFlash mask token {mask_id} is outside the vocabulary of {}", draft.spec.vocab_size);
        }
        if num_draft_tokens == 0 {
            num_draft_tokens = size - 1;
        }
        // Its context store is its own (the paged pool does not attend
        // non-causally), so the paged pool's refusals do not apply.
        Some(BlockDrafter { mask_id, size, width: super::dflash::context_width(&draft) })
    } else {
        if let Some(why) = draft.paged_refusal() {
            bail!("the {what} {} cannot draft in the server: {why}", spec.path.display());
        }
        None
    };
    let num_draft_tokens = num_draft_tokens.max(1);
    tracing::info!(
        "{}: speculative decoding with the {what} {} (`{label}`, {} draft tokens at first{})",
        model.dir.path.display(),
        spec.path.display(),
        num_draft_tokens,
        if model.has_state() { "; recurrent state rolled back by re-feeding kept tokens" } else { "" }
    );
    model.drafters.push(Drafter { model: draft, num_draft_tokens, kind: spec.kind, conditioning, block });
    Ok(())
}

/// The drafter a request of `kind` drafts with among a model's `drafters`
/// (an index): the one of that kind, or the first loaded when the request
/// names none (the API names the model's default). None: the model has no
/// such drafter (it has none, or that kind's was not attached: `attach`
/// serves a head it cannot roll back without it).
pub fn drafter_for(drafters: &[Drafter], kind: Option<DraftKind>) -> Option<usize> {
    match kind {
        Some(k) => drafters.iter().position(|d| d.kind == k),
        None => (!drafters.is_empty()).then_some(0),
    }
}

/// Refuses a model's drafter list with a kind twice (a request names its
/// drafter by kind, so each kind appears once per model).
pub fn check_distinct(model_id: &str, specs: &[DraftSpec]) -> Result<()> {
    for (i, a) in specs.iter().enumerate() {
        if specs[..i].iter().any(|b| b.kind == a.kind) {
            let label = kind_label(a.kind);
            bail!("model `{model_id}` has two `{label}` drafters: each kind may be given once per model (a request picks its drafter by kind, `draft_kind`)");
        }
    }
    Ok(())
}

/// Why a drafter head's own KV cannot be rolled back by a length, if it
/// cannot (the verifier's state is rolled back by re-feeding, a draft
/// model's by the state each draft step left; a head's is not).
fn refusal(model: &LoadedModel) -> Option<String> {
    model.has_state().then(|| "a layer of the drafter head keeps a recurrent state, which is not rolled back".to_string())
}

/// What a speculating sequence keeps between steps: its draft KV (a block
/// table in its lane's draft pool and how many tokens it holds), its draft
/// length, and the randomness of its acceptance.
pub struct SpecRow {
    /// The drafter it drafts with (the request's `draft_kind`, else the
    /// model's first): its table is in that drafter's pool of the lane.
    pub kind: DraftKind,
    pub table: Vec<u32>,
    pub kv_len: usize,
    pub len: DraftLength,
    pub rng: ChaCha8Rng,
    /// A drafter head's last output, which proposes the next draft.
    pub seed: Option<HeadSeed>,
    /// A draft model's recurrent state after its `kv_len` tokens.
    pub state: crate::engine::recurrent::RowState,
    /// A drafter head's or block drafter's context: the verifier position
    /// whose hidden states its next context entry takes. Its entries cover
    /// consecutive verifier positions ending here (fed by the prefill and
    /// after each step); when the sequence's `kv_len` is elsewhere (plain
    /// steps, preemption) its context starts over.
    pub ctx_at: usize,
    /// A block drafter's (DFlash) own context store and the context rows it
    /// has not taken in yet.
    pub block: Option<BlockContext>,
}

/// A DFlash drafter's context for one sequence: its store (K/V of the
/// context rows, outside the paged pool: docs/SPECULATIVE.md) and the
/// verifier's hidden states of the positions kept since its last forward.
pub struct BlockContext {
    pub store: super::dflash::ContextStore,
    /// Tokens and hidden states [1, n, C] not taken into the store yet.
    pub tokens: Vec<u32>,
    pub pending: Option<mlx_rs::Array>,
    /// Bytes charged to the engine's KV budget for the store.
    pub charged: u64,
}

/// A drafter head's output after its last entry: its logits propose the
/// first draft of the next step, its state (`HEAD_STATE`) conditions the
/// chained step after that.
pub struct HeadSeed {
    /// [1, 1, V] and [1, 1, C]
    pub logits: mlx_rs::Array,
    pub state: mlx_rs::Array,
    /// The verifier's `kv_len` it follows: the seed is stale when the
    /// sequence decoded since without the head (plain steps, preemption).
    pub at: usize,
}

impl SpecRow {
    /// `k` draft tokens at first; the request's seed seeds the acceptance
    /// (so a seed reproduces the same tokens with the same draft model).
    pub fn new(kind: DraftKind, k: usize, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s ^ 0x5eed_d4af_7000_0001),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { kind, table: Vec::new(), kv_len: 0, len: DraftLength::new(k, true), rng, seed: None, state: Default::default(), ctx_at: 0, block: None }
    }
}
