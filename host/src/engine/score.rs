//! Scoring a prompt (`echo` with `logprobs` on /v1/completions): one
//! teacher-forced forward over the prompt, every position's logits at once
//! (in `--prefill-chunk` pieces through a one-sequence cache), and for each
//! token after the first its log-probability and the most likely
//! alternatives, computed on the device (only [L] values and [L, n] ids
//! cross to the host, never [L, vocab]).
use super::LoadedModel;
use anyhow::{bail, Result};
use mlx_rs::{
    ops::{
        argpartition_axis,
        indexing::{take_along_axis, TryIndexOp},
    },
    transforms::eval,
    Array, Dtype,
};

/// One prompt token's score: its log-probability given the tokens before
/// it, and the `top_n` most likely tokens there (id, log-probability), most
/// likely first.
pub type TokenScore = (f32, Vec<(u32, f32)>);

/// Scores for `prompt`: None for the first token (no context), then one per
/// token.
pub fn score_prompt(model: &mut LoadedModel, prompt: &[u32], top_n: usize, chunk: usize) -> Result<Vec<Option<TokenScore>>> {
    let vocab = model.spec.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        bail!("prompt token id {bad} is out of range for a vocabulary of {vocab}");
    }
    let mut out: Vec<Option<TokenScore>> = vec![None; prompt.len().min(1)];
    if prompt.len() < 2 {
        return Ok(out);
    }
    let n = top_n.min(vocab as usize);
    let mut cache = model.kv_cache();
    // Position p's logits score token p + 1: feed all but the last token.
    let inputs = &prompt[..prompt.len() - 1];
    let mut start = 0;
    for piece in inputs.chunks(chunk.max(1)) {
        let ids: Vec<i32> = piece.iter().map(|&t| t as i32).collect();
        let len = ids.len() as i32;
        let input = Array::from_slice(&ids, &[1, len]);
        let logits = model.logits(&input, &mut cache, false)?;
        cache.advance(len);
        let logits = logits.as_dtype(Dtype::Float32)?; // [1, L, V]
        let lp = logits.subtract(logits.logsumexp_axis(-1, true)?)?; // [1, L, V]
        let targets: Vec<i32> = prompt[start + 1..start + 1 + piece.len()].iter().map(|&t| t as i32).collect();
        let targets = Array::from_slice(&targets, &[1, len, 1]);
        let chosen = take_along_axis(&lp, &targets, -1)?; // [1, L, 1]
        let top = if n > 0 {
            // The n largest, in no order: [1, L, n] ids and their logprobs.
            let ids = argpartition_axis(lp.negative()?, n as i32 - 1, -1)?.try_index((.., .., ..n as i32))?;
            let vals = take_along_axis(&lp, &ids, -1)?;
            Some((ids.as_dtype(Dtype::Int32)?, vals))
        } else {
            None
        };
        match &top {
            Some((ids, vals)) => eval([&chosen, ids, vals])?,
            None => chosen.eval()?,
        }
        let chosen = chosen.try_as_slice::<f32>()?;
        let top = match &top {
            Some((ids, vals)) => Some((ids.try_as_slice::<i32>()?, vals.try_as_slice::<f32>()?)),
            None => None,
        };
        for (i, &c) in chosen.iter().enumerate() {
            let mut alts: Vec<(u32, f32)> = match top {
                Some((ids, vals)) => (0..n).map(|j| (ids[i * n + j] as u32, vals[i * n + j])).collect(),
                None => Vec::new(),
            };
            alts.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.push(Some((c, alts)));
        }
        start += piece.len();
    }
    Ok(out)
}
