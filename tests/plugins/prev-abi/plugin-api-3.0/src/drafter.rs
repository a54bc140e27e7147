//! Drafter capability: proposes tokens for speculative decoding.
//!
//! Declared in ABI 1 so plugins can advertise drafter kinds; the engine's
//! speculative loop (a later milestone) calls it.
use crate::{MlxArray, PResult};
use abi_stable::{sabi_trait, std_types::RBox};

#[sabi_trait]
pub trait Drafter: Send {
    /// Propose up to `k` tokens after `last_tokens` (int32 [B, L]); returns int32 [B, k].
    fn propose(&mut self, last_tokens: MlxArray, k: u32) -> PResult<MlxArray>;
}

pub type DrafterBox = Drafter_TO<'static, RBox<()>>;
