//! What the drafter heads share: the conditioning a multi-token-prediction
//! head reads (the verifier's hidden states, lent as the host's
//! `input_embeddings()`), fetched and checked in one place.
//!
//! Shapes: B batch, L new tokens, d the conditioning's width.
use mlx_rs::Array;
use rmlx_plugin_api::{
    author::{Attend, Result},
    PluginError,
};

/// The conditioning [B, L, d] lent to the head `what` (e.g. "MTP head") as
/// input embeddings; `bl` = (B, L) from its tokens. A config error names
/// `what` when none was lent or its shape is not [B, L, d].
pub fn head_conditioning(attn: &dyn Attend, (b, l): (i32, i32), d: i32, what: &str) -> Result<Array> {
    let (cond, _) = attn.input_embeddings().ok_or_else(|| {
        PluginError::config(format!(
            "the {what} needs its conditioning (the verifier's hidden states) as input embeddings"
        ))
    })?;
    if cond.shape() != [b, l, d] {
        return Err(PluginError::config(format!(
            "the {what}'s conditioning is {:?}, expected [{b}, {l}, {d}]",
            cond.shape()
        )));
    }
    Ok(cond) // [B, L, d]
}
