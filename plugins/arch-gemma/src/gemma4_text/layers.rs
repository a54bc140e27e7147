//! gemma4_text's decoder block: attention (own or shared K/V, per-type
//! head size and RoPE), the GELU MLP with optional experts beside it, and
//! the per-layer input gate. Shapes as in gemma4_text.rs (rows [N, D],
//! N = B*L, outside the heads).
use super::config::Config;
use mlx_rs::{ops, Array};
use rmlx_nn::decoder::GateAct;
use rmlx_nn::gemma::{gelu_approx, rms_norm_no_scale, GeluMlp, ScaledRouter};
use rmlx_nn::moe::{combine, SwitchGlu};
use rmlx_nn::{merge_heads_to_rows, rms_norm, split_heads_of, Positions, Rope};
use rmlx_plugin_api::author::{Attend, AttendOpts, LinearLayer, Result, Weights};

// ---- attention ----

/// The K/V side of a layer that computes its own.
struct KvProj {
    k_proj: LinearLayer,         // [D] -> [K*hd]
    v_proj: Option<LinearLayer>, // [D] -> [K*hd]; None: values are the raw keys (k_eq_v)
    k_norm: Array,               // [hd]
}

pub struct Gemma4Attention {
    q_proj: LinearLayer, // [D] -> [H*hd]
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: Array,       // [hd]
    kv: Option<KvProj>,  // None: a shared layer
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    rope: Rope,
    window: u32,
    eps: f32,
}

impl Gemma4Attention {
    fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let kv = if i < c.first_shared() {
            let v_proj = if c.k_eq_v(i) { None } else { Some(w.linear(&format!("{p}.v_proj"))?) };
            Some(KvProj { k_proj: w.linear(&format!("{p}.k_proj"))?, v_proj, k_norm: w.tensor(&format!("{p}.k_norm.weight"))? })
        } else {
            None
        };
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: w.tensor(&format!("{p}.q_norm.weight"))?,
            kv,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(i),
            head_dim: c.head_dim(i),
            rope: c.rope(i)?,
            window: c.window(i),
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D], N = B*L -> [N, D]; `bl` = (B, L).
    fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let q = split_heads_of(&self.q_proj.forward(x)?, bl, self.heads)?; // [B, H, L, hd]
        let q = self.rope.apply_at(&rms_norm(&q, &self.q_norm, self.eps)?, pos)?; // [B, H, L, hd]
        let (k, v) = match &self.kv {
            Some(kv) => {
                let raw = split_heads_of(&kv.k_proj.forward(x)?, bl, self.kv_heads)?; // [B, K, L, hd]
                let v = match &kv.v_proj {
                    Some(v_proj) => split_heads_of(&v_proj.forward(x)?, bl, self.kv_heads)?, // [B, K, L, hd]
                    None => raw.clone(),
                };
                let k = self.rope.apply_at(&rms_norm(&raw, &kv.k_norm, self.eps)?, pos)?; // [B, K, L, hd]
                (k, rms_norm_no_scale(&v, self.eps)?)
            }
            None => {
                // A SHARED layer: the host attends over its source layer's
                // K/V and ignores these (no positions).
                let none = ops::zeros_dtype(&[q.dim(0), self.kv_heads, 0, self.head_dim], q.dtype())?; // [B, K, 0, hd]
                (none.clone(), none)
            }
        };
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(1.0).window(self.window))?; // [B, H, L, hd]
        self.o_proj.forward(&merge_heads_to_rows(&o)?) // [N, H*hd] -> [N, D]
    }
}

// ---- feed-forward: rmlx_nn::gemma::GeluMlp, and the experts beside it ----

/// `enable_moe_block`: the routed GELU experts and their norms.
struct MoeBranch {
    router: ScaledRouter, // [D] -> k of E
    experts: SwitchGlu,   // E x ([D] -> [F] -> [D])
    pre_feedforward_layernorm_2: Array,  // [D]
    post_feedforward_layernorm_1: Array, // [D]
    post_feedforward_layernorm_2: Array, // [D]
}

/// Per-layer input gating: h + norm(proj(gelu(gate(h)) * per_layer_input)).
struct PerLayerGate {
    per_layer_input_gate: LinearLayer,  // [D] -> [P]
    per_layer_projection: LinearLayer,  // [P] -> [D]
    post_per_layer_input_norm: Array,   // [D]
}

// ---- block ----

/// h = x + post_attn_norm(attn(input_norm(x)));
/// f = mlp(pre_ff_norm(h)), or with experts post_ff_norm_1(mlp(pre_ff_norm(h)))
///     + post_ff_norm_2(experts(pre_ff_norm_2(h)) routed on h);
/// h = h + post_ff_norm(f); h = h + per-layer gate; out = h * layer_scalar.
pub struct Gemma4Block {
    self_attn: Gemma4Attention,
    mlp: GeluMlp,
    moe: Option<MoeBranch>,
    per_layer: Option<PerLayerGate>,
    input_layernorm: Array,            // [D]
    post_attention_layernorm: Array,   // [D]
    pre_feedforward_layernorm: Array,  // [D]
    post_feedforward_layernorm: Array, // [D]
    layer_scalar: Array,               // [1]
    eps: f32,
}

impl Gemma4Block {
    pub(super) fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let norm = |w: &mut Weights, n: &str| w.tensor(&format!("{p}.{n}.weight"));
        let moe = if c.enable_moe_block {
            let (e, k) = (c.num_experts.unwrap_or(0), c.top_k_experts.unwrap_or(0));
            let experts = SwitchGlu::load(w, &format!("{p}.experts.switch_glu"))?.with_activation(GateAct::GeluApprox);
            Some(MoeBranch {
                router: ScaledRouter::load(w, &format!("{p}.router"), e, k, c.rms_norm_eps)?,
                experts,
                pre_feedforward_layernorm_2: norm(w, "pre_feedforward_layernorm_2")?,
                post_feedforward_layernorm_1: norm(w, "post_feedforward_layernorm_1")?,
                post_feedforward_layernorm_2: norm(w, "post_feedforward_layernorm_2")?,
            })
        } else {
            None
        };
        let per_layer = match c.per_layer_input() {
            Some(_) => Some(PerLayerGate {
                per_layer_input_gate: w.linear(&format!("{p}.per_layer_input_gate"))?,
                per_layer_projection: w.linear(&format!("{p}.per_layer_projection"))?,
                post_per_layer_input_norm: norm(w, "post_per_layer_input_norm")?,
            }),
            None => None,
        };
        Ok(Self {
            self_attn: Gemma4Attention::load(w, &format!("{p}.self_attn"), c, i)?,
            mlp: GeluMlp::load(w, &format!("{p}.mlp"))?,
            moe,
            per_layer,
            input_layernorm: norm(w, "input_layernorm")?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
            layer_scalar: w.tensor(&format!("{p}.layer_scalar"))?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D], N = B*L, per_layer_input: [N, P] -> [N, D]; `bl` = (B, L).
    pub(super) fn forward(
        &self,
        x: &Array,
        bl: (i32, i32),
        per_layer_input: Option<&Array>,
        layer: u32,
        pos: &Positions,
        attn: &mut dyn Attend,
    ) -> Result<Array> {
        let norm = |x: &Array, w: &Array| rms_norm(x, w, self.eps);
        let r = self.self_attn.forward(&norm(x, &self.input_layernorm)?, bl, layer, pos, attn)?;
        let h = x.add(&norm(&r, &self.post_attention_layernorm)?)?; // [N, D]
        let dense = self.mlp.forward(&norm(&h, &self.pre_feedforward_layernorm)?)?; // [N, D]
        let f = match &self.moe {
            None => dense,
            Some(m) => {
                let h1 = norm(&dense, &m.post_feedforward_layernorm_1)?;
                let (inds, weights) = m.router.route(&h)?; // [N, k]
                let y = m.experts.forward(&norm(&h, &m.pre_feedforward_layernorm_2)?, &inds)?; // [N, k, D]
                let h2 = norm(&combine(&y, &weights)?, &m.post_feedforward_layernorm_2)?; // [N, D]
                h1.add(&h2)?
            }
        };
        let mut h = h.add(&norm(&f, &self.post_feedforward_layernorm)?)?; // [N, D]
        if let (Some(g), Some(pli)) = (&self.per_layer, per_layer_input) {
            let gate = gelu_approx(&g.per_layer_input_gate.forward(&h)?)?.multiply(pli)?; // [N, P]
            let gate = norm(&g.per_layer_projection.forward(&gate)?, &g.post_per_layer_input_norm)?; // [N, D]
            h = h.add(&gate)?;
        }
        Ok(h.multiply(&self.layer_scalar)?)
    }
}
