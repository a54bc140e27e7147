//! The gated delta recurrence of gated_delta.rs: the composed path (mlx-lm's
//! `gated_delta_ops`, one recurrent step of ops per token; the CPU's path and
//! the reference) and the fused kernel where a GPU backend serves it, its
//! first output in a process checked against the composed path.
//!
//! Shapes: B batch, L new tokens, Hk key heads, Hv value heads, Dk key head
//! size, Dv value head size.
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{author::Result, PluginError};

/// One recurrent step (mlx-lm's `_gated_delta_step_ops`, scalar gate), on
/// inputs laid out for it by [`composed`]: q, k [B, H, 1, Dk], v
/// [B, H, Dv, 1], g, beta [B, H, 1, 1], state [B, H, Dv, Dk] ->
/// (y [B, H, Dv, 1], state [B, H, Dv, Dk]). The same products and sums in
/// the same order as mlx-lm's; the sums keep their axis, so nothing is
/// expanded again, and k is broadcast once for its two products.
fn step(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: &Array) -> Result<(Array, Array)> {
    let state = state.multiply(g)?; // decay
    let k = ops::broadcast_to(k, state.shape())?; // [B, H, Dv, Dk]
    let kv_mem = state.multiply(&k)?.sum_axis(-1, true)?; // [B, H, Dv, 1]
    let delta = v.subtract(&kv_mem)?.multiply(beta)?; // [B, H, Dv, 1]
    let state = state.add(k.multiply(&delta)?)?; // [B, H, Dv, Dk]
    let y = state.multiply(q)?.sum_axis(-1, true)?; // [B, H, Dv, 1]
    Ok((y, state))
}

/// x [B, L, ...] as L arrays of `shape` (token t's values, reshaped): one
/// reshape at L = 1 (a decode step), else one split and a reshape each.
fn per_token(x: &Array, shape: &[i32]) -> Result<Vec<Array>> {
    if x.dim(1) == 1 {
        return Ok(vec![x.reshape(shape)?]);
    }
    x.split_equal(x.dim(1), 1)?.iter().map(|t| Ok(t.reshape(shape)?)).collect()
}

/// The gated delta rule over L tokens, one step at a time (mlx-lm's
/// `gated_delta_ops`), with an optional padding mask bool [B, L] (a false
/// token leaves the state as it is and its y is 0). Shapes as
/// [`gated_delta_ops`].
///
/// q, k, v and beta are cast to the state's float32 once, where MLX's
/// type promotion cast them inside every step's products (the same
/// values), and y back to q's dtype once, after the last token.
fn composed(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: Array, mask: Option<&Array>) -> Result<(Array, Array)> {
    let (b, l, hk, dk) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (hv, dv) = (v.dim(2), v.dim(3));
    let (mut q, mut k) = (q.clone(), k.clone());
    if hv / hk > 1 {
        q = Array::repeat_axis::<f32>(q, hv / hk, -2)?; // [B, L, Hv, Dk]
        k = Array::repeat_axis::<f32>(k, hv / hk, -2)?;
    }
    let out = q.dtype();
    let f32_of = |x: &Array| -> Result<Array> {
        Ok(if state.dtype() == Dtype::Float32 { x.as_dtype(Dtype::Float32)? } else { x.clone() })
    };
    let row = [b, hv, 1, dk];
    let (qs, ks) = (per_token(&f32_of(&q)?, &row)?, per_token(&f32_of(&k)?, &row)?);
    let vs = per_token(&f32_of(v)?, &[b, hv, dv, 1])?;
    let (gs, betas) = (per_token(g, &[b, hv, 1, 1])?, per_token(&f32_of(beta)?, &[b, hv, 1, 1])?);
    let masks = match mask {
        Some(m) => per_token(&m.reshape(&[b, l, 1])?, &[b, 1, 1, 1])?.into_iter().map(Some).collect(),
        None => vec![None; l as usize],
    };
    let mut state = state;
    let mut ys = Vec::with_capacity(l as usize);
    for t in 0..l as usize {
        let (y, s) = step(&qs[t], &ks[t], &vs[t], &gs[t], &betas[t], &state)?;
        let y = match &masks[t] {
            Some(m) => {
                state = ops::select(m, &s, &state)?; // [B, H, Dv, Dk]
                ops::select(m, &y, Array::from_f32(0.0).as_dtype(y.dtype())?)?
            }
            None => {
                state = s;
                y
            }
        };
        ys.push(y.reshape(&[b, 1, hv, dv])?); // [B, 1, Hv, Dv]
    }
    let y = if ys.len() == 1 { ys.pop().expect("one token") } else { ops::concatenate(&ys, 1)? };
    Ok((y.as_dtype(out)?, state)) // [B, L, Hv, Dv]
}

/// The gated delta rule over L tokens, one step at a time (mlx-lm's
/// `gated_delta_ops`): q, k [B, L, Hk, Dk], v [B, L, Hv, Dv], g, beta
/// [B, L, Hv], state [B, Hv, Dv, Dk] (float32) -> (y [B, L, Hv, Dv], state).
/// Key heads are repeated to the value heads when Hv > Hk.
pub fn gated_delta_ops(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: Array) -> Result<(Array, Array)> {
    composed(q, k, v, g, beta, state, None)
}

/// The composed path with a padding mask (mlx-lm's `gated_delta_ops` with
/// `mask`, except that a masked token's y is 0 here, as in its kernel):
/// shapes as [`gated_delta_ops`], `mask` bool [B, L]; a false token leaves
/// the state as it is.
pub fn gated_delta_ops_masked(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: Array,
    mask: &Array,
) -> Result<(Array, Array)> {
    composed(q, k, v, g, beta, state, Some(mask))
}

/// The key of the fused kernel's first-output check.
const FUSED: &str = "gated_delta";

/// The fused kernel alone, unchecked: Some((y, state)) as [`gated_delta_ops`]
/// (y in q's dtype, state float32) when a GPU backend serves it and
/// `RMLX_FUSED_KERNELS` is not 0; None on the CPU or for a shape the kernel
/// does not take. `mask` bool [B, L] as [`gated_delta_ops_masked`].
pub fn gated_delta_fused(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
    mask: Option<&Array>,
) -> Result<Option<(Array, Array)>> {
    if !rmlx_kernels::enabled() {
        return Ok(None);
    }
    rmlx_kernels::gated_delta(q, k, v, g, beta, state, mask)
        .map_err(|e| PluginError::other(format!("fused gated delta kernel: {e}")))
}

/// The fused kernel where it serves, its first output in the process checked
/// against the composed path (a kernel that fails or disagrees is turned off
/// and that call answers composed); None where it does not serve.
fn fused_checked(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
    mask: Option<&Array>,
) -> Result<Option<(Array, Array)>> {
    if !rmlx_kernels::usable(FUSED) {
        return Ok(None);
    }
    let Some((y, s)) = gated_delta_fused(q, k, v, g, beta, state, mask)? else { return Ok(None) };
    let mut reference_state = None;
    let y = rmlx_kernels::verified(FUSED, y, 2e-2, || {
        let (yr, sr) = match mask {
            Some(m) => gated_delta_ops_masked(q, k, v, g, beta, state.clone(), m)?,
            None => gated_delta_ops(q, k, v, g, beta, state.clone())?,
        };
        reference_state = Some(sr);
        Ok(yr)
    })?;
    // Turned off by this call's check: y is the reference, so is the state.
    let s = match reference_state {
        Some(sr) if !rmlx_kernels::usable(FUSED) => sr,
        _ => s,
    };
    Ok(Some((y, s)))
}

/// The gated delta rule over L tokens on the path that serves: the fused
/// kernel on a GPU backend, else [`gated_delta_ops`]. Shapes as there.
pub fn gated_delta(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: Array) -> Result<(Array, Array)> {
    match fused_checked(q, k, v, g, beta, &state, None)? {
        Some(out) => Ok(out),
        None => gated_delta_ops(q, k, v, g, beta, state),
    }
}

/// As [`gated_delta`] with a padding mask bool [B, L] (see
/// [`gated_delta_ops_masked`]).
pub fn gated_delta_masked(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: Array,
    mask: &Array,
) -> Result<(Array, Array)> {
    match fused_checked(q, k, v, g, beta, &state, Some(mask))? {
        Some(out) => Ok(out),
        None => gated_delta_ops_masked(q, k, v, g, beta, state, mask),
    }
}
