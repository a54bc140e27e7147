//! Mixture-of-experts layers shared by the MoE architectures, after mlx-lm's
//! `switch_layers.py` (`SwitchGLU`, `_gather_sort`, `_scatter_unsort`) and
//! its top-k routed blocks (qwen3_moe's `Qwen3MoeSparseMoeBlock`).
//!
//! The experts of a projection are one switch layer (`Weights::switch_linear`:
//! `weight` [E, out, in] in any format, run through MLX's `gather_mm` /
//! `gather_qmm` by the WeightQuant plugin that owns the format); nothing here
//! loops over experts at run time or names a format. Hugging Face's
//! per-expert float tensors are stacked once at load into the same
//! [E, out, in] layer ([`SwitchGlu::load_per_expert`]).
//!
//! Shapes: B batch, L new tokens, N = B*L tokens, D hidden, F expert
//! intermediate, E experts, k experts per token.
use crate::decoder::{FeedForward, GateAct};
use mlx_rs::{nn, ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{add_expert_bias, switch_box, LinearLayer, Result, SwitchLayer, SwitchLinearImpl, Weights},
    PluginError,
};

/// mlx-lm sorts the tokens by expert when a call routes at least this many
/// (token, expert) pairs (`indices.size >= 64`), so that each expert's
/// weights are read once.
pub const SORT_THRESHOLD: usize = 64;

// ---- activation ----

/// mlx-lm's `swiglu_oai` (activations.py), gpt-oss's experts' gate with
/// `SwigluOAI()`'s alpha 1.702 and limit 7: the gate clipped from above, the
/// linear part clipped both ways and shifted by one. gate, up: [..., F].
pub fn swiglu_oai(gate: &Array, up: &Array) -> Result<Array> {
    const ALPHA: f32 = 1.702;
    const LIMIT: f32 = 7.0;
    // Python scalars are weakly typed in MLX: they take the array's dtype.
    let s = |v: f32, like: &Array| Array::from_f32(v).as_dtype(like.dtype());
    let g = ops::minimum(gate, s(LIMIT, gate)?)?;
    let x = ops::clip(up, (s(-LIMIT, up)?, s(LIMIT, up)?))?;
    let glu = g.multiply(nn::sigmoid(g.multiply(s(ALPHA, &g)?)?)?)?;
    Ok(x.add(s(1.0, &x)?)?.multiply(&glu)?)
}

// ---- routing ----

/// Softmax router with top-k selection (qwen3_moe, qwen2_moe, qwen3_next):
/// gates [..., E] logits -> (indices uint32 [..., k], scores [..., k]).
/// The softmax is `precise` (float32 inside); `norm_topk_prob` renormalises
/// the k scores to sum to 1.
pub fn softmax_top_k(logits: &Array, k: i32, norm_topk_prob: bool) -> Result<(Array, Array)> {
    let gates = ops::softmax_axis(logits, -1, true)?; // [..., E]
    let e = gates.dim(-1);
    // argpartition puts the k largest last; mlx-lm keeps them in that order.
    let part = ops::argpartition_axis(&gates, -k, -1)?; // [..., E]
    let inds = part.split_at_indices(&[e - k], -1)?.pop().expect("two parts"); // [..., k]
    let mut scores = gates.take_along_axis(&inds, -1)?; // [..., k]
    if norm_topk_prob {
        scores = scores.divide(scores.sum_axis(-1, true)?)?;
    }
    Ok((inds, scores))
}

/// Top-k of the router's logits, then a softmax over the k (gpt-oss's
/// `mlx_topk` + softmax; mixtral routes the same way): logits [..., E] ->
/// (indices uint32 [..., k], scores [..., k] summing to 1). The softmax is
/// `precise`; the k are kept in `argpartition`'s order, as mlx-lm keeps them.
pub fn top_k_softmax(logits: &Array, k: i32) -> Result<(Array, Array)> {
    let e = logits.dim(-1);
    let part = ops::argpartition_axis(logits, -k, -1)?; // [..., E]
    let inds = part.split_at_indices(&[e - k], -1)?.pop().expect("two parts"); // [..., k]
    let top = logits.take_along_axis(&inds, -1)?; // [..., k]
    Ok((inds, ops::softmax_axis(&top, -1, true)?))
}

/// The routed experts' outputs weighted by their scores:
/// y [..., k, D], scores [..., k] -> [..., D] in y's dtype.
pub fn combine(y: &Array, scores: &Array) -> Result<Array> {
    Ok(y.multiply(scores.expand_dims(-1)?)?.sum_axis(-2, false)?.as_dtype(y.dtype())?)
}

// ---- sorting ----

/// mlx-lm's `_gather_sort`: x [..., 1, 1, D] and indices [..., k] ->
/// (x per (token, expert) pair sorted by expert [N*k, 1, D], the sorted
/// expert ids [N*k], the inverse permutation [N*k]).
fn gather_sort(x: &Array, indices: &Array) -> Result<(Array, Array, Array)> {
    let m = indices.dim(-1) as u32;
    let flat = indices.flatten(None, None)?; // [N*k]
    let order = ops::argsort_axis(&flat, 0)?; // [N*k]
    let inv_order = ops::argsort_axis(&order, 0)?; // [N*k]
    let token = order.floor_divide(Array::from_slice(&[m], &[1]))?; // [N*k]: the pair's token
    let xs = x.flatten(0, -3)?.take_axis(&token, 0)?; // [N, 1, D] -> [N*k, 1, D]
    Ok((xs, flat.take_axis(&order, 0)?, inv_order))
}

/// mlx-lm's `_scatter_unsort`: x [N*k, 1, D] back to the tokens' order,
/// unflattened to `shape` [..., k] -> [..., k, 1, D].
fn scatter_unsort(x: &Array, inv_order: &Array, shape: &[i32]) -> Result<Array> {
    Ok(ops::unflatten(x.take_axis(inv_order, 0)?, 0, shape)?)
}

// ---- experts ----

/// mlx-lm's `SwitchGLU`: down(act(gate(x)) * up(x)) through the experts each
/// token was routed to, SwiGLU unless told otherwise.
pub struct SwitchGlu {
    gate_up: GateUp,
    down_proj: SwitchLayer, // E x ([F] -> [D])
    act: GateAct,
}

/// The gate and up projections of the experts: two switch layers (mlx-lm's
/// `switch_mlp.{gate,up}_proj`), or one whose outputs are gate then up
/// (Hugging Face's fused `experts.gate_up_proj` [E, 2F, D]), split after
/// the matmul instead of at load (one expert matmul instead of two).
enum GateUp {
    Separate {
        gate: SwitchLayer, // E x ([D] -> [F])
        up: SwitchLayer,   // E x ([D] -> [F])
    },
    Fused(SwitchLayer), // E x ([D] -> [2F]): gate | up
}

impl SwitchGlu {
    /// `p`: the module holding `gate_proj`, `up_proj` and `down_proj`
    /// (mlx-lm's `...mlp.switch_mlp`); their shapes must agree.
    pub fn load(w: &mut Weights, p: &str) -> Result<Self> {
        let gate_proj = w.switch_linear(&format!("{p}.gate_proj"))?;
        let up_proj = w.switch_linear(&format!("{p}.up_proj"))?;
        let down_proj = w.switch_linear(&format!("{p}.down_proj"))?;
        let (g, u, d) = (gate_proj.dims(), up_proj.dims(), down_proj.dims()); // (E, in, out)
        if g != u || d != (g.0, g.2, g.1) {
            return Err(PluginError::config(format!(
                "{p}: expert shapes disagree: gate_proj {g:?}, up_proj {u:?}, down_proj {d:?} \
                 (experts, in, out); expected up_proj = gate_proj and down_proj = (E, F, D)"
            )));
        }
        Ok(Self { gate_up: GateUp::Separate { gate: gate_proj, up: up_proj }, down_proj, act: GateAct::Silu })
    }

    /// The Hugging Face fused layout under `p` (`...mlp.experts`):
    /// `{p}.gate_up_proj` [E, 2F, D] (gate rows first, as mlx-lm's
    /// qwen3_5_moe sanitize splits it) and `{p}.down_proj` [E, D, F], stored
    /// as bare tensors that the host lends as each layer's weight.
    pub fn load_fused(w: &mut Weights, p: &str) -> Result<Self> {
        let gate_up = w.switch_linear(&format!("{p}.gate_up_proj"))?;
        let down_proj = w.switch_linear(&format!("{p}.down_proj"))?;
        let (g, d) = (gate_up.dims(), down_proj.dims()); // (E, in, out)
        if g.2 % 2 != 0 || d != (g.0, g.2 / 2, g.1) {
            return Err(PluginError::config(format!(
                "{p}: expert shapes disagree: gate_up_proj {g:?}, down_proj {d:?} (experts, in, out); \
                 expected gate_up_proj = (E, D, 2F) and down_proj = (E, F, D)"
            )));
        }
        Ok(Self { gate_up: GateUp::Fused(gate_up), down_proj, act: GateAct::Silu })
    }

    /// Hugging Face's per-expert layout under `p` (`...mlp.experts`):
    /// `{p}.{e}.{gate,up,down}_proj.weight` [out, in] for each of the
    /// `num_experts` experts, stacked once at load into switch layers of
    /// [E, out, in] as mlx-lm's qwen3_moe / qwen3_next / deepseek_v3 `sanitize` does, so
    /// the forward is the stacked layout's (`gather_mm`).
    pub fn load_per_expert(w: &mut Weights, p: &str, num_experts: i32) -> Result<Self> {
        let gate = stack_experts(w, p, "gate_proj", num_experts)?;
        let up = stack_experts(w, p, "up_proj", num_experts)?;
        let down_proj = stack_experts(w, p, "down_proj", num_experts)?;
        let (g, u, d) = (gate.dims(), up.dims(), down_proj.dims()); // (E, in, out)
        if g != u || d != (g.0, g.2, g.1) {
            return Err(PluginError::config(format!(
                "{p}: expert shapes disagree: gate_proj {g:?}, up_proj {u:?}, down_proj {d:?} \
                 (experts, in, out); expected up_proj = gate_proj and down_proj = (E, F, D)"
            )));
        }
        Ok(Self { gate_up: GateUp::Separate { gate, up }, down_proj, act: GateAct::Silu })
    }

    pub fn with_activation(mut self, act: GateAct) -> Self {
        self.act = act;
        self
    }

    /// (experts, hidden D, intermediate F)
    pub fn dims(&self) -> (u32, u32, u32) {
        match &self.gate_up {
            GateUp::Separate { gate, .. } => gate.dims(),
            GateUp::Fused(gu) => {
                let (e, d, f2) = gu.dims();
                (e, d, f2 / 2)
            }
        }
    }

    /// x: [..., D], indices uint32 [..., k] -> [..., k, D]
    pub fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let x = x.expand_dims_axes(&[-2, -3])?; // [..., 1, 1, D]
        let sorted = indices.size() >= SORT_THRESHOLD;
        // sorted: pairs [N*k, 1, D] with expert ids [N*k]; else [..., 1, 1, D] with [..., k]
        let (x, idx, inv_order) = if sorted {
            let (xs, idx, inv) = gather_sort(&x, indices)?;
            (xs, idx, Some(inv))
        } else {
            (x, indices.clone(), None)
        };
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (
                gate.forward(&x, &idx, sorted)?, // [..., k, 1, F] | [N*k, 1, F]
                up.forward(&x, &idx, sorted)?,   // [..., k, 1, F] | [N*k, 1, F]
            ),
            GateUp::Fused(gu) => {
                let f = (gu.dims().2 / 2) as i32;
                let mut parts = gu.forward(&x, &idx, sorted)?.split_at_indices(&[f], -1)?; // [..., 2F] -> 2 x [..., F]
                let up = parts.pop().expect("two parts");
                (parts.pop().expect("two parts"), up)
            }
        };
        let h = self.act.apply(&gate, &up)?;
        let mut y = self.down_proj.forward(&h, &idx, sorted)?; // [..., k, 1, D] | [N*k, 1, D]
        if let Some(inv) = inv_order {
            y = scatter_unsort(&y, &inv, indices.shape())?; // [..., k, 1, D]
        }
        Ok(y.squeeze_axes(&[-2])?) // [..., k, D]
    }
}

/// Experts stored one by one, stacked at load: weight [E, out, in] kept
/// transposed [E, in, out] for `gather_mm`, as mlx-lm's `SwitchLinear`
/// after its sanitize stacked them; `bias` [E, out] when the experts have one.
struct StackedExperts {
    weight_t: Array,      // [E, in, out]
    bias: Option<Array>,  // [E, out]
    dims: (u32, u32, u32), // (E, in, out)
}

impl SwitchLinearImpl for StackedExperts {
    /// x [..., 1 | k, 1, in], indices [..., k] -> [..., k, 1, out]
    fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        let y = ops::gather_mm(x, &self.weight_t, None, indices, sorted)?;
        add_expert_bias(y, self.bias.as_ref(), indices)
    }
    fn dims(&self) -> (u32, u32, u32) {
        self.dims
    }
}

/// `{p}.{e}.{proj}.weight` [out, in] for e in 0..n (and `bias` [out] when
/// expert 0 has one), stacked into one switch layer [n, out, in]. The
/// stack is lazy like every loaded tensor: MLX computes it once, at the first
/// forward, and keeps the result (the per-expert tensors are then released).
fn stack_experts(w: &mut Weights, p: &str, proj: &str, n: i32) -> Result<SwitchLayer> {
    let name = |e: i32, t: &str| format!("{p}.{e}.{proj}.{t}");
    let stored = (0..).take_while(|&e| w.contains(&name(e, "weight"))).count() as i32;
    if stored != n {
        let which = if stored < n { format!("{} is missing", name(stored, "weight")) } else { format!("{} is there too", name(n, "weight")) };
        return Err(PluginError::config(format!(
            "{p}: num_experts is {n} but the checkpoint stores {stored} experts one by one ({which})"
        )));
    }
    let with_bias = w.contains(&name(0, "bias"));
    let (mut weights, mut biases) = (Vec::with_capacity(n as usize), Vec::new());
    for e in 0..n {
        let t = w.tensor(&name(e, "weight"))?; // [out, in]
        if !matches!(t.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16) {
            return Err(PluginError::unsupported(format!(
                "{}: {:?}, not plain float: quantized experts stored one by one are not a layout rmlx reads \
                 (no tool we know writes it); load the float checkpoint (its experts are stacked at load), \
                 or quantize it with `rmlx convert` or mlx_lm.convert, which stack the experts of \
                 qwen3_moe, qwen3_next and deepseek_v3 checkpoints",
                name(e, "weight"),
                t.dtype()
            )));
        }
        let first: &Array = weights.first().unwrap_or(&t);
        if t.ndim() != 2 || t.shape() != first.shape() {
            return Err(PluginError::config(format!(
                "{}: shape {:?}; every expert's {proj} must be 2-D [out, in] of one shape ({:?})",
                name(e, "weight"),
                t.shape(),
                first.shape()
            )));
        }
        if with_bias {
            let b = w.tensor(&name(e, "bias"))?;
            if b.shape() != [t.dim(0)] {
                return Err(PluginError::config(format!("{}: shape {:?}, expected [{}]", name(e, "bias"), b.shape(), t.dim(0))));
            }
            biases.push(b);
        }
        weights.push(t);
    }
    let (out, inp) = (weights[0].dim(0), weights[0].dim(1));
    let weight = ops::stack(&weights, 0)?; // n x [out, in] -> [E, out, in]
    let bias = if with_bias { Some(ops::stack(&biases, 0)?) } else { None }; // [E, out]
    let experts = StackedExperts { weight_t: weight.swap_axes(-1, -2)?, bias, dims: (n as u32, inp as u32, out as u32) };
    Ok(SwitchLayer(switch_box(Box::new(experts))))
}

// ---- block ----

/// A sparse MoE feed-forward routed by a softmax over the experts with top-k
/// selection (mlx-lm's `Qwen3MoeSparseMoeBlock`): router `gate` [D] -> [E],
/// then the k chosen experts' SwiGLU outputs weighted by their scores.
pub struct SparseMoe {
    gate: LinearLayer, // [D] -> [E]
    switch_mlp: SwitchGlu,
    top_k: i32,
    norm_topk_prob: bool,
}

impl SparseMoe {
    /// `p`: the block (`model.layers.{i}.mlp`): the router `{p}.gate` and the
    /// experts `{p}.switch_mlp.{gate,up,down}_proj`, Hugging Face's fused
    /// `{p}.experts.{gate_up,down}_proj` ([`SwitchGlu::load_fused`]) or its
    /// experts one by one, `{p}.experts.{e}.{gate,up,down}_proj`
    /// ([`SwitchGlu::load_per_expert`]). `num_experts` is checked against
    /// the router and the experts.
    pub fn load(w: &mut Weights, p: &str, num_experts: i32, top_k: i32, norm_topk_prob: bool) -> Result<Self> {
        let gate = w.linear(&format!("{p}.gate"))?;
        let switch_mlp = if w.contains(&format!("{p}.experts.gate_up_proj")) {
            SwitchGlu::load_fused(w, &format!("{p}.experts"))?
        } else if w.contains(&format!("{p}.experts.0.gate_proj.weight")) {
            SwitchGlu::load_per_expert(w, &format!("{p}.experts"), num_experts)?
        } else {
            SwitchGlu::load(w, &format!("{p}.switch_mlp"))?
        };
        let router_out = gate.0.dims().1;
        let (experts, d, _) = switch_mlp.dims();
        if router_out as i32 != num_experts || experts as i32 != num_experts {
            return Err(PluginError::config(format!(
                "{p}: num_experts is {num_experts} but the router `gate` has {router_out} outputs and \
                 switch_mlp {experts} experts"
            )));
        }
        if gate.0.dims().0 != d {
            return Err(PluginError::config(format!(
                "{p}: router `gate` takes {} inputs, the experts {d}",
                gate.0.dims().0
            )));
        }
        if !(1..=num_experts).contains(&top_k) {
            return Err(PluginError::config(format!("{p}: top-k {top_k} is not in 1..={num_experts}")));
        }
        Ok(Self { gate, switch_mlp, top_k, norm_topk_prob })
    }
}

impl FeedForward for SparseMoe {
    /// x: [..., D] -> [..., D] (rows [N, D] in a `Decoder`)
    fn forward(&self, x: &Array) -> Result<Array> {
        let logits = self.gate.forward(x)?; // [..., E]
        let (inds, scores) = softmax_top_k(&logits, self.top_k, self.norm_topk_prob)?; // [..., k]
        let y = self.switch_mlp.forward(x, &inds)?; // [..., k, D]
        combine(&y, &scores) // [..., D]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swiglu;
    use mlx_rs::random;

    /// A dense switch layer: weight [E, out, in].
    struct DenseExperts(Array);

    impl SwitchLinearImpl for DenseExperts {
        fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
            Ok(ops::gather_mm(x, self.0.swap_axes(-1, -2)?, None, indices, sorted)?)
        }
        fn dims(&self) -> (u32, u32, u32) {
            (self.0.dim(0) as u32, self.0.dim(2) as u32, self.0.dim(1) as u32)
        }
    }

    fn layer(w: &Array) -> SwitchLayer {
        SwitchLayer(switch_box(Box::new(DenseExperts(w.clone()))))
    }

    /// x [..., 1|k, 1, in] @ W[idx]^T -> [..., k, 1, out], by plain matmuls.
    fn per_expert(x: &Array, w: &Array, idx: &Array) -> Array {
        x.matmul(w.take_axis(idx, 0).unwrap().swap_axes(-1, -2).unwrap()).unwrap()
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.subtract(b).unwrap().abs().unwrap().max(None).unwrap().item_cast::<f32>()
    }

    #[test]
    fn switch_glu_sorted_and_unsorted_equal_per_expert_reference() {
        random::seed(3).unwrap();
        let (e, d, f, k) = (4, 8, 16, 2);
        let normal = |s: &[i32]| random::normal::<f32>(s, None, None, None).unwrap();
        let (wg, wu, wd) = (normal(&[e, f, d]), normal(&[e, f, d]), normal(&[e, d, f]));
        let glu = SwitchGlu {
            gate_up: GateUp::Separate { gate: layer(&wg), up: layer(&wu) },
            down_proj: layer(&wd),
            act: GateAct::Silu,
        };
        for l in [3, 40] {
            // 2*3*2 = 12 pairs: unsorted; 2*40*2 = 160 >= 64: sorted, then unsorted back
            let x = normal(&[2, l, d]);
            let (inds, scores) = softmax_top_k(&normal(&[2, l, e]), k, true).unwrap();
            assert_eq!(inds.shape(), [2, l, k]);
            let y = glu.forward(&x, &inds).unwrap(); // [2, l, k, d]
            let xe = x.expand_dims_axes(&[-2, -3]).unwrap(); // [2, l, 1, 1, d]
            let h = swiglu(&per_expert(&xe, &wg, &inds), &per_expert(&xe, &wu, &inds)).unwrap();
            let want = per_expert(&h, &wd, &inds).squeeze_axes(&[-2]).unwrap();
            assert!(max_diff(&y, &want) < 1e-4, "L={l}: {}", max_diff(&y, &want));
            // scores: the k largest softmax probabilities, renormalised
            let s = scores.sum_axis(-1, false).unwrap();
            assert!(max_diff(&s, &ops::ones_like(&s).unwrap()) < 1e-6);
            let out = combine(&y, &scores).unwrap();
            assert_eq!(out.shape(), [2, l, d]);
        }
    }

    /// Values from mlx-lm 0.32.2's `swiglu_oai(gate, x)` (dev venv): both
    /// clips (gate above 7, up beyond ±7) and the +1.
    #[test]
    fn swiglu_oai_matches_mlx_lm() {
        let g = Array::from_slice(&[-9.0f32, -1.5, 0.0, 0.3, 2.0, 6.9, 7.5, 12.0], &[8]);
        let x = Array::from_slice(&[-8.0f32, -2.0, 0.5, 1.0, -0.7, 3.0, 7.2, -7.5], &[8]);
        let want = [1.201_908e-5_f32, 0.108_337_8, 0.0, 0.374_968_3, 0.580_697_6, 27.599_78, 55.999_626, -41.999_718];
        let got = swiglu_oai(&g, &x).unwrap();
        for (a, b) in got.as_slice::<f32>().iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn top_k_picks_the_largest_gates() {
        let logits = Array::from_slice(&[0.1f32, 2.0, -1.0, 1.5, 0.0, 3.0], &[1, 1, 6]);
        let (inds, scores) = softmax_top_k(&logits, 2, false).unwrap();
        let mut ids: Vec<u32> = inds.as_slice::<u32>().to_vec();
        ids.sort();
        assert_eq!(ids, [1, 5]);
        let p = ops::softmax_axis(&logits, -1, true).unwrap();
        let want = p.take_along_axis(&inds, -1).unwrap();
        assert!(max_diff(&scores, &want) == 0.0, "unnormalised scores are the softmax probabilities");
    }
}
