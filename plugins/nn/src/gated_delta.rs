//! Gated DeltaNet, the linear-attention mixer of the Qwen3-Next / Qwen3.5
//! hybrids, after mlx-lm's `gated_delta.py` (`compute_g`, `normalize_qk`,
//! `gated_delta_ops`, `gated_delta_update`) and the parts of its
//! `Qwen3NextGatedDeltaNet` that both hybrids share: the causal depthwise
//! conv1d with its rolling state, the recurrence, the gated RMSNorm
//! (`Qwen3NextRMSNormGated`) and `out_proj`.
//!
//! The recurrence has two paths (gated_delta_recurrence.rs, re-exported
//! here). On a GPU backend (`rmlx_kernels::enabled()`:
//! CUDA or Metal, unless `RMLX_FUSED_KERNELS=0`) it is one fused kernel over
//! all L new tokens (`rmlx_kernels::gated_delta`: the float32 state stays in
//! registers from the first token to the last), prefill and decode alike; its
//! first output in a process is checked against the composed path
//! (`rmlx_kernels::verified`). Everywhere else, and as the reference, it is
//! composed ops ([`gated_delta_ops`], mlx-lm's `gated_delta_ops`: a loop over
//! the L new tokens, one recurrent step each).
//!
//! The recurrent state lives in the host (plugin-api 3.3 `cache_kind::STATE`):
//! each forward reads `[conv_state, ssm_state]` with `Attend::state` (empty
//! for a new sequence: zeros) and hands the new one back with `set_state`.
//!
//! Shapes: B batch, L new tokens, D hidden, Hk key heads, Hv value heads,
//! Dk key head size, Dv value head size, C = 2*Hk*Dk + Hv*Dv conv channels,
//! K conv kernel size.
use mlx_rs::{fast, nn, ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{Attend, LinearLayer, Result, Weights},
    PluginError,
};

// ---- the recurrence ----

/// The per-head decay g = exp(-exp(A_log) * softplus(a + dt_bias)), in
/// float32 as mlx-lm's `compute_g`: a [B, L, Hv], A_log, dt_bias [Hv] ->
/// [B, L, Hv].
pub fn compute_g(a_log: &Array, a: &Array, dt_bias: &Array) -> Result<Array> {
    compute_g_from(&neg_decay_rate(a_log)?, a, dt_bias)
}

/// -exp(A_log) in float32 [Hv]: the factor of `compute_g` that depends on
/// the weights alone (a layer computes it once, at load).
pub fn neg_decay_rate(a_log: &Array) -> Result<Array> {
    Ok(a_log.as_dtype(Dtype::Float32)?.exp()?.negative()?)
}

/// `compute_g` with its weight-only factor given: `neg_decay` =
/// [`neg_decay_rate`] (A_log) [Hv]; the same ops in the same order.
pub fn compute_g_from(neg_decay: &Array, a: &Array, dt_bias: &Array) -> Result<Array> {
    let sp = nn::softplus(a.add(dt_bias)?)?; // [B, L, Hv]
    Ok(neg_decay.multiply(&sp)?.exp()?)
}

/// A layer's weight-only inputs of `compute_g`, shaped [1, 1, Hv] and
/// evaluated at load: at B = L = 1 (a batch-1 decode step) they match
/// a [1, 1, Hv] exactly, so MLX broadcasts none of them.
struct Decay {
    neg_decay: Array, // [1, 1, Hv] float32: -exp(A_log)
    dt_bias: Array,   // [1, 1, Hv]
    /// softplus's 0 (mlx.nn.softplus is logaddexp(x, 0)) in dt_bias's
    /// dtype: mlx-rs's `nn::softplus` passes an int32 0, cast and
    /// broadcast in every call.
    zero: Array, // [1, 1, Hv]
}

impl Decay {
    fn new(a_log: &Array, dt_bias: &Array) -> Result<Self> {
        let hv = dt_bias.dim(0);
        let neg_decay = neg_decay_rate(a_log)?.reshape(&[1, 1, hv])?;
        let dt_bias = dt_bias.reshape(&[1, 1, hv])?;
        let zero = ops::zeros_dtype(&[1, 1, hv], dt_bias.dtype())?;
        mlx_rs::transforms::eval([&neg_decay, &dt_bias, &zero])?; // once, not in every step's graph
        Ok(Self { neg_decay, dt_bias, zero })
    }

    /// [`compute_g_from`] over a [B, L, Hv]: the same ops in the same
    /// order, the 0 of softplus in a + dt_bias's dtype as MLX casts it.
    fn g(&self, a: &Array) -> Result<Array> {
        let x = a.add(&self.dt_bias)?; // [B, L, Hv]
        let sp = if x.dtype() == self.zero.dtype() {
            ops::logaddexp(&x, &self.zero)?
        } else {
            nn::softplus(&x)?
        };
        Ok(self.neg_decay.multiply(&sp)?.exp()?) // float32
    }
}

/// L2-normalises q and k over the head size and folds the `Dk^-0.5`
/// readout scale into q (mlx-lm's `normalize_qk`): `eps` is added to
/// sum(x²), so `fast::rms_norm` (which adds it to mean(x²)) gets
/// eps * inv_scale². q, k: [B, L, Hk, Dk].
pub fn normalize_qk(q: &Array, k: &Array, inv_scale: f32, eps: f32) -> Result<(Array, Array)> {
    normalize_qk_by(q, k, &QkScales::new(inv_scale, eps, q.dim(-1), q.dtype())?)
}

/// The constants of [`normalize_qk`] for one head size and dtype: made (and
/// cast) once, so a step's graph holds no cast of a scalar.
///
/// The scales are the RMSNorm's weight, each a [Dk] vector of one value:
/// `fast::rms_norm` rounds x * rsqrt(mean(x²) + eps) to the dtype and then
/// multiplies by the weight in the dtype (MLX's CUDA and Metal kernels and
/// its CPU fallback alike), which is mlx-lm's `scale * rms_norm(x, None)`
/// bit for bit, one primitive where a norm, a broadcast of the scalar and a
/// multiply were three on a GPU.
struct QkScales {
    rms_eps: f32,
    q: Array, // [Dk]: inv_scale², in `dtype`
    k: Array, // [Dk]: inv_scale, in `dtype`
}

impl QkScales {
    fn new(inv_scale: f32, eps: f32, dk: i32, dtype: Dtype) -> Result<Self> {
        let s = |v: f32| Array::from_slice(&vec![v; dk as usize], &[dk]).as_dtype(dtype);
        Ok(Self { rms_eps: eps * inv_scale * inv_scale, q: s(inv_scale * inv_scale)?, k: s(inv_scale)? })
    }
}

/// [`normalize_qk`] with its constants given (in q's and k's dtype).
fn normalize_qk_by(q: &Array, k: &Array, s: &QkScales) -> Result<(Array, Array)> {
    let q = fast::rms_norm(q, Some(&s.q), s.rms_eps)?;
    let k = fast::rms_norm(k, Some(&s.k), s.rms_eps)?;
    Ok((q, k))
}

#[path = "gated_delta_recurrence.rs"]
mod recurrence;
pub use recurrence::{gated_delta, gated_delta_fused, gated_delta_masked, gated_delta_ops, gated_delta_ops_masked};

/// mlx-lm's `gated_delta_update`: beta = sigmoid(b),
/// g = compute_g(A_log, a, dt_bias), zero state when none is given, then
/// [`gated_delta`] (the fused kernel on a GPU, else composed).
/// q, k [B, L, Hk, Dk] (normalised), v [B, L, Hv, Dv], a, b [B, L, Hv] ->
/// (y [B, L, Hv, Dv], state [B, Hv, Dv, Dk] float32).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update(
    q: &Array,
    k: &Array,
    v: &Array,
    a: &Array,
    b: &Array,
    a_log: &Array,
    dt_bias: &Array,
    state: Option<Array>,
) -> Result<(Array, Array)> {
    let g = compute_g(a_log, a, dt_bias)?; // [B, L, Hv] float32
    update_with_g(q, k, v, &g, b, state)
}

/// [`gated_delta_update`] with the decay g [B, L, Hv] (float32) given.
fn update_with_g(q: &Array, k: &Array, v: &Array, g: &Array, b: &Array, state: Option<Array>) -> Result<(Array, Array)> {
    let beta = nn::sigmoid(b)?; // [B, L, Hv]
    let state = match state {
        Some(s) => s,
        None => ops::zeros_dtype(&[q.dim(0), v.dim(2), v.dim(3), q.dim(3)], Dtype::Float32)?,
    };
    gated_delta(q, k, v, g, &beta, state) // fused on a GPU, else gated_delta_ops
}

// ---- gated RMSNorm ----

/// `Qwen3NextRMSNormGated` with a gate: rms_norm(x) * silu(gate), the
/// product in float32 (mlx-lm's `precise_swiglu`), cast back to x's dtype.
/// x: [..., Dv], weight [Dv]; gate: x's shape, or another shape of as many
/// values (the rows [N, Hv*Dv] of x [B, L, Hv, Dv]): the normed x takes
/// gate's shape, and so does the result.
pub fn rms_norm_gated(x: &Array, gate: &Array, weight: &Array, eps: f32) -> Result<Array> {
    let mut n = fast::rms_norm(x, Some(weight), eps)?;
    if n.shape() != gate.shape() {
        n = n.reshape(gate.shape())?;
    }
    precise_swiglu(gate, &n, x.dtype())
}

/// silu(float32(gate)) * float32(x), cast to `out` (mlx-lm's
/// `_precise_swiglu`), compiled (shapeless) as mlx-lm compiles it: one
/// fused primitive where the casts, the SiLU and the product were five
/// (bf16) or two (float32). Each intermediate keeps its dtype in the fused
/// kernel, so the values are the step-by-step ones bit for bit (test
/// `precise_swiglu_equals_the_steps`). Compiled per call, as
/// `rmlx_nn::swiglu` and mlx-rs's `nn::silu` are (docs/decisions.md).
fn precise_swiglu(gate: &Array, x: &Array, out: Dtype) -> Result<Array> {
    let f = move |(g, x): (&Array, &Array)| -> std::result::Result<Array, mlx_rs::error::Exception> {
        let g = g.as_dtype(Dtype::Float32)?;
        g.multiply(nn::sigmoid(&g)?)?.multiply(x.as_dtype(Dtype::Float32)?)?.as_dtype(out)
    };
    let mut fused = mlx_rs::transforms::compile::compile(f, true);
    Ok(fused((gate, x))?)
}

// ---- the mixer ----

/// Head counts and sizes of a gated DeltaNet layer.
#[derive(Clone, Copy, Debug)]
pub struct DeltaDims {
    pub hidden: i32,
    /// Hk, Hv: key and value heads (Hv a multiple of Hk).
    pub k_heads: i32,
    pub v_heads: i32,
    /// Dk, Dv: key and value head sizes.
    pub k_dim: i32,
    pub v_dim: i32,
    /// K: the causal conv's kernel size.
    pub conv_kernel: i32,
    /// The gated RMSNorm's epsilon.
    pub eps: f32,
}

impl DeltaDims {
    /// Hk*Dk
    pub fn key_dim(&self) -> i32 {
        self.k_heads * self.k_dim
    }
    /// Hv*Dv
    pub fn value_dim(&self) -> i32 {
        self.v_heads * self.v_dim
    }
    /// C = 2*Hk*Dk + Hv*Dv: q, k and v through the conv.
    pub fn conv_dim(&self) -> i32 {
        2 * self.key_dim() + self.value_dim()
    }
}

/// The conv's output [B, L, C] as q, k [B, L, Hk, Dk] and v [B, L, Hv, Dv]
/// (views of the same values). With Dk = Dv the channels are Hk + Hk + Hv
/// heads of one size: one reshape, one split over heads; else a split over
/// channels and a reshape of each part.
fn split_qkv(conv_out: &Array, d: &DeltaDims) -> Result<[Array; 3]> {
    let (bsz, l) = (conv_out.dim(0), conv_out.dim(1));
    let parts = if d.k_dim == d.v_dim {
        let heads = conv_out.reshape(&[bsz, l, 2 * d.k_heads + d.v_heads, d.k_dim])?; // [B, L, 2Hk+Hv, Dk]
        heads.split_at_indices(&[d.k_heads, 2 * d.k_heads], 2)?
    } else {
        let parts = conv_out.split_at_indices(&[d.key_dim(), 2 * d.key_dim()], -1)?;
        vec![
            parts[0].reshape(&[bsz, l, d.k_heads, d.k_dim])?,
            parts[1].reshape(&[bsz, l, d.k_heads, d.k_dim])?,
            parts[2].reshape(&[bsz, l, d.v_heads, d.v_dim])?,
        ]
    };
    parts.try_into().map_err(|_| PluginError::other("q, k, v: three parts expected"))
}

/// What a gated DeltaNet layer does after its input projections: the causal
/// depthwise conv over [q, k, v] (with the last K-1 inputs as state), SiLU,
/// q/k normalisation, the gated delta recurrence, the gated RMSNorm with z,
/// and `out_proj`. The projections differ between qwen3_next (fused
/// `in_proj_qkvz`, `in_proj_ba`) and qwen3_5 (four of them), so the
/// architectures compute them and call [`GatedDeltaNet::mix`].
pub struct GatedDeltaNet {
    conv1d: Array, // [C, K, 1]: one K-tap filter per channel
    decay: Decay,  // -exp(A_log) float32, dt_bias, softplus's 0: [1, 1, Hv] each
    norm: Array,    // [Dv]
    out_proj: LinearLayer, // [Hv*Dv] -> [D]
    /// normalize_qk's constants in the norm weight's dtype (the activations'
    /// as loaded; a step in another dtype makes its own).
    qk_scales: QkScales,
    dims: DeltaDims,
}

/// normalize_qk's readout scale Dk^-0.5 and epsilon (mlx-lm's).
fn qk_scales(dims: &DeltaDims, dtype: Dtype) -> Result<QkScales> {
    QkScales::new((dims.k_dim as f32).powf(-0.5), 1e-6, dims.k_dim, dtype)
}

impl GatedDeltaNet {
    /// `p`: the layer's `linear_attn` module: `conv1d.weight` [C, K, 1]
    /// (mlx's Conv1d layout, as mlx-lm's sanitize leaves it), `A_log`,
    /// `dt_bias`, `norm.weight` and `out_proj`.
    pub fn load(w: &mut Weights, p: &str, dims: DeltaDims) -> Result<Self> {
        Self::load_layout(w, p, dims, false)
    }

    /// As `load`; with `hf_conv`, `conv1d.weight` is in the Hugging Face
    /// layout [C, 1, K] and is moved to [C, K, 1] (mlx-lm's sanitize).
    pub fn load_layout(w: &mut Weights, p: &str, dims: DeltaDims, hf_conv: bool) -> Result<Self> {
        let mut conv1d = w.tensor(&format!("{p}.conv1d.weight"))?;
        let (c, k) = (dims.conv_dim(), dims.conv_kernel);
        if hf_conv && conv1d.shape() == [c, 1, k] {
            conv1d = conv1d.swap_axes(1, 2)?; // [C, 1, K] -> [C, K, 1]
        }
        if conv1d.shape() != [c, k, 1] {
            let hint = if conv1d.shape() == [c, 1, k] {
                " (the Hugging Face layout [C, 1, K]: convert the checkpoint with mlx_lm.convert first)"
            } else {
                ""
            };
            return Err(PluginError::config(format!(
                "{p}.conv1d.weight: expected [{c}, {k}, 1] (conv channels, linear_conv_kernel_dim, 1), got {:?}{hint}",
                conv1d.shape()
            )));
        }
        let vec = |w: &mut Weights, n: &str, len: i32| -> Result<Array> {
            let t = w.tensor(&format!("{p}.{n}"))?;
            if t.shape() != [len] {
                return Err(PluginError::config(format!("{p}.{n}: expected [{len}], got {:?}", t.shape())));
            }
            Ok(t)
        };
        let decay = Decay::new(&vec(w, "A_log", dims.v_heads)?, &vec(w, "dt_bias", dims.v_heads)?)?;
        let norm = vec(w, "norm.weight", dims.v_dim)?;
        let out_proj = w.linear(&format!("{p}.out_proj"))?;
        let qk_scales = qk_scales(&dims, norm.dtype())?;
        mlx_rs::transforms::eval([&qk_scales.q, &qk_scales.k])?;
        Ok(Self { conv1d, decay, norm, out_proj, qk_scales, dims })
    }

    pub fn dims(&self) -> DeltaDims {
        self.dims
    }

    /// The conv over `qkv` [B, L, C] after the K-1 inputs before it
    /// (`conv_state` [B, K-1, C]): (silu(conv) [B, L, C], the new state: the
    /// last K-1 inputs [B, K-1, C]).
    fn conv(&self, qkv: &Array, conv_state: &Array) -> Result<(Array, Array)> {
        let c = self.dims.conv_dim();
        let input = ops::concatenate(&[conv_state, qkv], 1)?; // [B, K-1+L, C]
        let n = input.dim(1);
        let keep = self.dims.conv_kernel - 1;
        let new_state = input.split_at_indices(&[n - keep], 1)?.pop().expect("two parts"); // [B, K-1, C]
        let out = ops::conv1d(&input, &self.conv1d, 1, 0, 1, c)?; // [B, L, C]
        Ok((nn::silu(out)?, new_state))
    }


    /// The mixer after the projections: `qkv` [B, L, C] (q, k, v each
    /// flattened over heads, in that order), `z` rows [N, Hv*Dv] (N = B*L;
    /// another shape is reshaped to them), `b`, `a` [B, L, Hv] -> rows
    /// [N, D]. Reads and sets `layer`'s state.
    pub fn mix(&self, qkv: &Array, z: &Array, b: &Array, a: &Array, layer: u32, attn: &mut dyn Attend) -> Result<Array> {
        let d = self.dims;
        let (bsz, l) = (qkv.dim(0), qkv.dim(1));
        if attn.lengths().is_some() {
            return Err(PluginError::unsupported(
                "gated DeltaNet layers cannot run padded rows yet (their state would take in the padding)",
            ));
        }
        let conv_shape = [bsz, d.conv_kernel - 1, d.conv_dim()];
        let ssm_shape = [bsz, d.v_heads, d.v_dim, d.k_dim];
        let (conv_state, ssm_state) = match attn.state(layer)?.as_slice() {
            [] => (ops::zeros_dtype(&conv_shape, qkv.dtype())?, None),
            [c, s] if c.shape() == conv_shape && s.shape() == ssm_shape => (c.clone(), Some(s.clone())),
            other => {
                return Err(PluginError::other(format!(
                    "layer {layer}: the host returned a recurrent state of shapes {:?}, expected {conv_shape:?} and {ssm_shape:?}",
                    other.iter().map(|a| a.shape().to_vec()).collect::<Vec<_>>()
                )))
            }
        };
        let (conv_out, conv_state) = self.conv(qkv, &conv_state)?; // [B, L, C], [B, K-1, C]
        let [q, k, v] = split_qkv(&conv_out, &d)?;
        let (q, k) = if q.dtype() == self.qk_scales.q.dtype() {
            normalize_qk_by(&q, &k, &self.qk_scales)?
        } else {
            normalize_qk_by(&q, &k, &qk_scales(&d, q.dtype())?)?
        };
        let g = self.decay.g(a)?; // [B, L, Hv] float32
        let (y, ssm_state) = update_with_g(&q, &k, &v, &g, b, ssm_state)?;
        attn.set_state(layer, vec![conv_state, ssm_state])?;
        let z = if z.ndim() == 2 { z.clone() } else { z.reshape(&[bsz * l, -1])? }; // [N, Hv*Dv]
        let y = rms_norm_gated(&y, &z, &self.norm, d.eps)?; // [B, L, Hv, Dv] normed -> [N, Hv*Dv]
        self.out_proj.forward(&y) // [N, D]
    }
}

#[cfg(test)]
#[path = "gated_delta_tests.rs"]
mod tests;
