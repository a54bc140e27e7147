//! DeepSeek-V3's mixture of experts (mlx-lm's `DeepseekV3MoE`, `MoEGate`
//! and `group_expert_select`): routed experts chosen by sigmoid scores with
//! a load-balancing correction bias (`noaux_tc`), optionally limited to the
//! best groups of experts, plus always-on shared experts.
//!
//! Routing, per token (float32): s = sigmoid(x W_gate^T); the choice uses
//! s + `e_score_correction_bias`; with `n_group` > 1 the experts split into
//! n_group groups, each scored by the sum of its two best (biased) scores,
//! and all but the best `topk_group` groups are zeroed; the top
//! `num_experts_per_tok` experts are then picked, weighted by their
//! unbiased s (renormalised to sum to 1 when `norm_topk_prob` and k > 1),
//! times `routed_scaling_factor`. Experts are SwiGLU switch layers
//! (plugins/nn moe.rs); the shared experts one SwiGLU MLP of
//! `moe_intermediate_size * n_shared_experts`, added unweighted.
//!
//! Shapes: [...] any leading token shape (rows N = B*L in deepseek_v3.rs),
//! D hidden, E experts, G groups, k experts per token.
use mlx_rs::{nn, ops, Array, Dtype};
use rmlx_nn::decoder::{FeedForward, Mlp};
use rmlx_nn::moe::{combine, SwitchGlu};
use rmlx_plugin_api::{
    author::{LinearLayer, Result, Weights},
    PluginError,
};

/// The router's settings.
#[derive(Debug, Clone)]
pub struct Routing {
    pub experts: i32,
    pub top_k: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl Routing {
    /// Refuses groupings mlx-lm's router cannot run.
    pub fn new(experts: i32, top_k: i32, n_group: i32, topk_group: i32, norm_topk_prob: bool, routed_scaling_factor: f32) -> Result<Self> {
        if experts % n_group != 0 {
            return Err(PluginError::config(format!("n_routed_experts {experts} is not a multiple of n_group {n_group}")));
        }
        if n_group > 1 && experts / n_group < 2 {
            return Err(PluginError::config(format!(
                "n_group {n_group} leaves fewer than 2 experts per group (a group scores by its two best)"
            )));
        }
        if topk_group > n_group {
            return Err(PluginError::config(format!("topk_group {topk_group} exceeds n_group {n_group}")));
        }
        let reachable = if n_group > 1 { topk_group * (experts / n_group) } else { experts };
        if top_k > reachable {
            return Err(PluginError::config(format!(
                "num_experts_per_tok {top_k} exceeds the {reachable} experts the best topk_group {topk_group} groups hold"
            )));
        }
        Ok(Self { experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor })
    }

    /// gates [..., E] (router logits), bias [E] -> (indices uint32 [..., k],
    /// weights float32 [..., k]).
    pub fn select(&self, gates: &Array, bias: &Array) -> Result<(Array, Array)> {
        let f32 = |x: f32| Array::from_f32(x);
        let scores = nn::sigmoid(gates.as_dtype(Dtype::Float32)?)?; // [..., E]
        let mut biased = scores.add(bias.as_dtype(Dtype::Float32)?)?; // [..., E]
        if self.n_group > 1 {
            let g = ops::unflatten(&biased, -1, &[self.n_group, -1])?; // [..., G, E/G]
            let best2 = mlx_rs::ops::indexing::topk_axis(&g, 2, -1)?.sum_axis(-1, true)?; // [..., G, 1]
            let drop = self.n_group - self.topk_group;
            let g = if drop > 0 {
                let part = ops::argpartition_axis(&best2, drop - 1, -2)?; // [..., G, 1]
                let worst = part.split_at_indices(&[drop], -2)?.swap_remove(0); // [..., drop, 1]
                let zero = ops::broadcast_to(f32(0.0), worst.shape())?;
                g.put_along_axis(&worst, &zero, -2)? // the dropped groups' scores set to 0
            } else {
                g
            };
            biased = g.flatten(-2, -1)?; // [..., E]
        }
        let k = self.top_k;
        let part = ops::argpartition_axis(&biased.negative()?, k - 1, -1)?; // [..., E]
        let inds = part.split_at_indices(&[k], -1)?.swap_remove(0); // [..., k]
        let mut weights = scores.take_along_axis(&inds, -1)?; // [..., k]
        if k > 1 && self.norm_topk_prob {
            weights = weights.divide(weights.sum_axis(-1, true)?)?;
        }
        let weights = weights.multiply(f32(self.routed_scaling_factor))?;
        Ok((inds.as_dtype(Dtype::Uint32)?, weights))
    }
}

pub struct DeepseekMoe {
    gate: LinearLayer,   // [D] -> [E]
    e_score_correction_bias: Array, // [E]
    switch_mlp: SwitchGlu,          // E x SwiGLU [D] -> [F] -> [D]
    shared_experts: Option<Mlp>,    // [D] -> [F * n_shared] -> [D]
    routing: Routing,
}

impl DeepseekMoe {
    /// `p`: the layer's `mlp`: the router `{p}.gate` (`weight` [E, D],
    /// `e_score_correction_bias` [E]), the experts as mlx-lm stacks them
    /// (`{p}.switch_mlp.*`) or as Hugging Face stores them one by one
    /// (`{p}.experts.{e}.*`, stacked at load), and `{p}.shared_experts`.
    pub fn load(w: &mut Weights, p: &str, routing: Routing, shared: bool) -> Result<Self> {
        let e = routing.experts;
        let gate = w.linear(&format!("{p}.gate"))?;
        let e_score_correction_bias = w.tensor(&format!("{p}.gate.e_score_correction_bias"))?;
        let switch_mlp = if w.contains(&format!("{p}.experts.0.gate_proj.weight")) {
            SwitchGlu::load_per_expert(w, &format!("{p}.experts"), e)?
        } else {
            SwitchGlu::load(w, &format!("{p}.switch_mlp"))?
        };
        let (experts, d, _) = switch_mlp.dims();
        let (gate_in, gate_out) = { let t = gate.0.dims(); (t.0, t.1) };
        if experts as i32 != e || gate_out as i32 != e || e_score_correction_bias.shape() != [e] {
            return Err(PluginError::config(format!(
                "{p}: n_routed_experts is {e} but the router `gate` has {gate_out} outputs, its correction bias shape {:?} and the experts {experts}",
                e_score_correction_bias.shape()
            )));
        }
        if gate_in != d {
            return Err(PluginError::config(format!("{p}: router `gate` takes {gate_in} inputs, the experts {d}")));
        }
        let shared_experts = if shared { Some(Mlp::load(w, &format!("{p}.shared_experts"))?) } else { None };
        Ok(Self { gate, e_score_correction_bias, switch_mlp, shared_experts, routing })
    }
}

impl FeedForward for DeepseekMoe {
    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array) -> Result<Array> {
        let gates = self.gate.forward(x)?; // [..., E]
        let (inds, weights) = self.routing.select(&gates, &self.e_score_correction_bias)?; // [..., k]
        let y = self.switch_mlp.forward(x, &inds)?; // [..., k, D]
        let y = combine(&y, &weights)?; // [..., D]
        match &self.shared_experts {
            Some(s) => Ok(y.add(s.forward(x)?)?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 experts in 4 groups of 2, best 2 groups, top-3: the values of
    /// mlx-lm 0.32.2's `group_expert_select` on the same inputs, worked by
    /// hand: sigmoid(0) = 0.5 everywhere, so the bias alone decides.
    #[test]
    fn grouped_selection_keeps_the_best_groups() {
        let r = Routing::new(8, 3, 4, 2, true, 2.0).unwrap();
        let gates = Array::from_slice(&[0f32; 8], &[1, 8]);
        // groups: (0,1) 0.1+0.0, (2,3) 0.9+0.8, (4,5) 0.3+0.2, (6,7) 0.7+0.0
        let bias = Array::from_slice(&[0.1f32, 0.0, 0.9, 0.8, 0.3, 0.2, 0.7, 0.0], &[8]);
        let (inds, w) = r.select(&gates, &bias).unwrap();
        let mut ids: Vec<u32> = inds.as_slice::<u32>().to_vec();
        ids.sort();
        // groups (2,3) and (6,7) survive; the best three of 2, 3, 6, 7 by bias
        assert_eq!(ids, [2, 3, 6]);
        // unbiased scores 0.5 each, renormalised to 1/3, times 2
        for v in w.as_slice::<f32>() {
            assert!((v - 2.0 / 3.0).abs() < 1e-6, "{v}");
        }
        assert!(Routing::new(8, 3, 3, 1, true, 1.0).is_err());
        assert!(Routing::new(8, 5, 4, 2, true, 1.0).unwrap_err().message.contains("num_experts_per_tok 5"));
    }
}
