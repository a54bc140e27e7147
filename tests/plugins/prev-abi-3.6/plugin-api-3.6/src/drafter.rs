//! The ABI 1 `Drafter` slot, kept for layout compatibility and unused: no
//! host calls it, and `export!` always leaves it `None`.
//!
//! Drafters are built another way since ABI 3.6. A drafter head (an MTP,
//! Eagle-3 or DFlash head) is an architecture plugin's model that names the
//! verifier layers it conditions on (`arch::Model::conditioning`); the host
//! loads it as `{model_type}_{kind}` (`LoadedModel::load_head` /
//! `load_head_from`), runs its forwards through the same `ForwardCtx`, and
//! owns the draft loop, verification and sampling. A plugin lists its heads
//! in `Manifest::drafters` (as well as in `architectures`), which is what
//! `rmlx plugins` shows as drafters. A separate draft model is any
//! architecture.
use crate::{MlxArray, PResult};
use abi_stable::{sabi_trait, std_types::RBox};

#[sabi_trait]
pub trait Drafter: Send {
    /// Propose up to `k` tokens after `last_tokens` (int32 [B, L]); returns int32 [B, k].
    fn propose(&mut self, last_tokens: MlxArray, k: u32) -> PResult<MlxArray>;
}

pub type DrafterBox = Drafter_TO<'static, RBox<()>>;
