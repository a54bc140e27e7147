//! A routed MoE plus an always-on shared expert scaled by its own sigmoid
//! gate, as mlx-lm's `Qwen3NextSparseMoeBlock` (also qwen3_5's MoE and
//! qwen2_moe's): y = moe(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x).
//!
//! Shapes: [...] any leading token shape ([B, L] or rows N = B*L), D hidden.
use crate::decoder::{FeedForward, Mlp};
use mlx_rs::{nn, Array};
use rmlx_plugin_api::{
    author::{LinearLayer, Result, Weights},
    PluginError,
};

pub struct WithSharedExpert {
    routed: Box<dyn FeedForward>, // [D] -> [D]: the top-k experts
    shared_expert: Mlp,           // [D] -> [F_shared] -> [D]
    shared_expert_gate: LinearLayer, // [D] -> [1]
}

impl WithSharedExpert {
    /// `p`: the block (`...mlp`) holding `shared_expert.{gate,up,down}_proj`
    /// and `shared_expert_gate`; `routed` is its routed part.
    pub fn load(w: &mut Weights, p: &str, routed: Box<dyn FeedForward>) -> Result<Self> {
        let shared_expert = Mlp::load(w, &format!("{p}.shared_expert"))?;
        let shared_expert_gate = w.linear(&format!("{p}.shared_expert_gate"))?;
        let out = shared_expert_gate.0.dims().1;
        if out != 1 {
            return Err(PluginError::config(format!("{p}.shared_expert_gate: expected 1 output, got {out}")));
        }
        Ok(Self { routed, shared_expert, shared_expert_gate })
    }
}

impl FeedForward for WithSharedExpert {
    /// x: [..., D] -> [..., D]
    fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.routed.forward(x)?; // [..., D]
        let shared = self.shared_expert.forward(x)?; // [..., D]
        let gate = nn::sigmoid(self.shared_expert_gate.forward(x)?)?; // [..., 1]
        Ok(y.add(gate.multiply(&shared)?)?)
    }
}
