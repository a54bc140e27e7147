//! The decoder-only transformer that llama, qwen2 and qwen3 share (mlx-lm's
//! `Attention`, `MLP`, `TransformerBlock` and `LlamaModel`), parameterised by
//! what differs between them: per-head q/k RMSNorm (qwen3), a sliding window
//! per layer (llama's `layer_types`), RoPE. Projection biases (qwen2's q/k/v,
//! llama's `attention_bias` / `mlp_bias`) need no option: the WeightQuant
//! plugin that builds a linear adds `bias` when the checkpoint has one.
//! BitNet's hooks are opt-in: an RMSNorm before `o_proj`
//! (`SelfAttention::with_sub_norm`), another before `down_proj` and the ReLU²
//! gate (`Mlp::with_activation`, `Mlp::with_sub_norm`), and blocks assembled
//! from such parts (`Block::from_parts`, `Decoder::load_blocks`). A block's
//! feed-forward may be any [`FeedForward`] (`Block::with_ffn`): the dense
//! [`Mlp`] or a mixture of experts (moe.rs).
//!
//! The residual stream runs as rows [N, D], N = B*L, from the embedding to
//! the final norm: every linear then gets a 2-D input, which MLX's matmul
//! takes as is (a [B, L, D] input costs it a Flatten and an Unflatten per
//! linear, the same product otherwise). [B, L, ...] appears only where the
//! shape means something: the heads, the host's hidden states, the merge of
//! input features and the logits.
//!
//! Shapes: B batch, L new tokens, N = B*L rows, D hidden, H query heads,
//! K kv heads, hd head_dim, F intermediate, V vocab.
use crate::{
    finish_rows, merge_heads, merge_heads_to_rows, merge_inputs, offer_hidden_rows, relu2, rms_norm, split_heads_of, swiglu,
    Positions, Rope,
};
use crate::moe::swiglu_oai;
use mlx_rs::Array;
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, Linears, Result, Weights},
    ModelSpec, PluginError,
};

// ---- attention ----

/// What one layer's attention looks like.
pub struct AttentionSpec {
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    /// RMSNorm over hd on queries and keys before RoPE (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    pub eps: f32,
    /// Attention window in tokens, 0 for full attention.
    pub window: u32,
    pub rope: Rope,
}

pub struct SelfAttention {
    qkv: Linears,           // q_proj, k_proj, v_proj: [D] -> [H*hd], [K*hd], [K*hd] (one matmul where the format stacks)
    o_proj: LinearLayer,    // [H*hd] -> [D]
    q_norm: Option<Array>, // [hd]
    k_norm: Option<Array>, // [hd]
    sub_norm: Option<Array>, // [H*hd]: RMSNorm before o_proj (BitNet's attn_sub_norm)
    sinks: Option<Array>,    // [H]: per-head attention-sink logits (gpt-oss)
    spec: AttentionSpec,
    /// Softmax scale and window (0: full) of `AttendOpts`.
    scale: f32,
    window: u32,
}

impl SelfAttention {
    pub fn load(w: &mut Weights, p: &str, spec: AttentionSpec) -> Result<Self> {
        let norm = |w: &mut Weights, n: &str| -> Result<Option<Array>> {
            if spec.qk_norm {
                Ok(Some(w.tensor(&format!("{p}.{n}.weight"))?))
            } else {
                Ok(None)
            }
        };
        let (q_norm, k_norm) = (norm(w, "q_norm")?, norm(w, "k_norm")?);
        let (scale, window) = ((spec.head_dim as f32).powf(-0.5), spec.window);
        Ok(Self {
            qkv: w.linears(&[&format!("{p}.q_proj"), &format!("{p}.k_proj"), &format!("{p}.v_proj")])?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm,
            k_norm,
            sub_norm: None,
            sinks: None,
            spec,
            scale,
            window,
        })
    }

    /// RMSNorm (weight `norm` [H*hd], eps of the spec) over the merged heads
    /// before `o_proj`, as BitNet's `attn_sub_norm`.
    pub fn with_sub_norm(mut self, norm: Array) -> Self {
        self.sub_norm = Some(norm);
        self
    }

    /// Learned per-head sink logits `sinks` [H] (gpt-oss): one more column
    /// in each head's softmax that takes probability mass and adds no value.
    pub fn with_sinks(mut self, sinks: Array) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// x: [N, D], N = B*L -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    pub fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let s = &self.spec;
        let [q, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().map_err(|_| PluginError::other("q/k/v: three outputs expected"))?;
        let mut q = split_heads_of(&q, bl, s.heads)?; // [B, H, L, hd]
        let mut k = split_heads_of(&k, bl, s.kv_heads)?; // [B, K, L, hd]
        let v = split_heads_of(&v, bl, s.kv_heads)?; // [B, K, L, hd]
        // RMSNorm over hd commutes with the head transpose.
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, s.eps)?;
            k = rms_norm(&k, kn, s.eps)?;
        }
        let q = s.rope.apply_at(&q, pos)?;
        let k = s.rope.apply_at(&k, pos)?;
        let opts = AttendOpts::plain(self.scale).window(self.window).sinks(self.sinks.as_ref());
        let o = attn.attend(layer, q, k, v, &opts)?; // [B, H, L, hd]
        let mut o = if x.ndim() == 2 { merge_heads_to_rows(&o)? } else { merge_heads(&o)? }; // [N | B, L, H*hd]
        if let Some(n) = &self.sub_norm {
            o = rms_norm(&o, n, s.eps)?;
        }
        self.o_proj.forward(&o)
    }
}

// ---- MLP ----

/// The gate's activation in `act(gate(x)) * up(x)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateAct {
    /// silu: SwiGLU (llama, qwen).
    Silu,
    /// max(x, 0)²: mlx.nn.relu2 (BitNet).
    Relu2,
    /// gpt-oss's clamped SwiGLU, mlx-lm's `swiglu_oai` (alpha 1.702, limit 7):
    /// (clip(up, ±7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7).
    SwigluOai,
    /// tanh-approximated GELU: mlx-lm's `geglu` (Gemma 4's experts).
    GeluApprox,
}

impl GateAct {
    /// act(gate) * up, or gpt-oss's variant of it.
    pub fn apply(self, gate: &Array, up: &Array) -> Result<Array> {
        match self {
            GateAct::Silu => swiglu(gate, up),
            GateAct::Relu2 => Ok(relu2(gate)?.multiply(up)?),
            GateAct::SwigluOai => swiglu_oai(gate, up),
            GateAct::GeluApprox => Ok(crate::gemma::gelu_approx(gate)?.multiply(up)?),
        }
    }
}

/// Gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU unless told
/// otherwise, with an optional RMSNorm before `down_proj`.
pub struct Mlp {
    gate_up: Linears,       // gate_proj, up_proj: [D] -> [F] each (one matmul where the format stacks)
    down_proj: LinearLayer, // [F] -> [D]
    act: GateAct,
    sub_norm: Option<(Array, f32)>, // [F], eps: BitNet's ffn_sub_norm
}

impl Mlp {
    pub fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            gate_up: w.linears(&[&format!("{p}.gate_proj"), &format!("{p}.up_proj")])?,
            down_proj: w.linear(&format!("{p}.down_proj"))?,
            act: GateAct::Silu,
            sub_norm: None,
        })
    }

    pub fn with_activation(mut self, act: GateAct) -> Self {
        self.act = act;
        self
    }

    /// RMSNorm (weight `norm` [F]) over act(gate) * up before `down_proj`.
    pub fn with_sub_norm(mut self, norm: Array, eps: f32) -> Self {
        self.sub_norm = Some((norm, eps));
        self
    }

    /// x: [..., D] ([N, D] in a `Decoder`, or [B, L, D]) -> [..., D]
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up]: [Array; 2] = self.gate_up.forward(x)?.try_into().map_err(|_| PluginError::other("gate/up: two outputs expected"))?; // [..., F]
        let mut h = self.act.apply(&gate, &up)?;
        if let Some((n, eps)) = &self.sub_norm {
            h = rms_norm(&h, n, *eps)?;
        }
        self.down_proj.forward(&h)
    }
}

/// A block's feed-forward: the dense [`Mlp`], or a mixture of experts
/// (`moe::SparseMoe`). Token-wise, so any leading shape: a `Decoder`'s
/// blocks pass rows [N, D], architectures with their own blocks [B, L, D].
pub trait FeedForward: Send {
    /// x: [..., D] -> [..., D]
    fn forward(&self, x: &Array) -> Result<Array>;
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        Mlp::forward(self, x)
    }
}

// ---- block ----

/// Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)).
pub struct Block {
    self_attn: SelfAttention,
    mlp: Box<dyn FeedForward>,
    input_layernorm: Array,          // [D]
    post_attention_layernorm: Array, // [D]
    eps: f32,
}

impl Block {
    pub fn load(w: &mut Weights, p: &str, spec: AttentionSpec) -> Result<Self> {
        let eps = spec.eps;
        let self_attn = SelfAttention::load(w, &format!("{p}.self_attn"), spec)?;
        let mlp = Mlp::load(w, &format!("{p}.mlp"))?;
        Self::from_parts(w, p, self_attn, mlp, eps)
    }

    /// A block around an attention and MLP built (and hooked) by the caller;
    /// loads the two norms under `p`.
    pub fn from_parts(w: &mut Weights, p: &str, self_attn: SelfAttention, mlp: Mlp, eps: f32) -> Result<Self> {
        Self::with_ffn(w, p, self_attn, Box::new(mlp), eps)
    }

    /// As `from_parts`, with any feed-forward (e.g. an MoE block) as `mlp`.
    pub fn with_ffn(
        w: &mut Weights,
        p: &str,
        self_attn: SelfAttention,
        mlp: Box<dyn FeedForward>,
        eps: f32,
    ) -> Result<Self> {
        Ok(Self {
            self_attn,
            mlp,
            input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
            eps,
        })
    }

    /// x: [N, D], N = B*L -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    pub fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let norms = (&self.input_layernorm, &self.post_attention_layernorm);
        pre_norm_residual(x, norms, self.eps, |n| self.self_attn.forward(n, bl, layer, pos, attn), &*self.mlp)
    }
}

/// The pre-norm residual pair every decoder block here runs:
/// h = x + mixer(rms_norm(x, norms.0)); out = h + mlp(rms_norm(h, norms.1)).
/// x: [N, D] or [B, L, D] -> the same shape; `mixer` maps the normed x to
/// [..., D] (self-attention, MLA, a DeltaNet layer...).
pub fn pre_norm_residual(
    x: &Array,
    (input_norm, post_norm): (&Array, &Array), // [D], [D]
    eps: f32,
    mixer: impl FnOnce(&Array) -> Result<Array>,
    mlp: &dyn FeedForward,
) -> Result<Array> {
    let r = mixer(&rms_norm(x, input_norm, eps)?)?;
    let h = x.add(&r)?;
    let r = mlp.forward(&rms_norm(&h, post_norm, eps)?)?;
    Ok(h.add(&r)?)
}

// ---- model ----

/// Embedding, blocks, final norm, and the output head (tied to the
/// embedding when `tied`).
pub struct Decoder {
    embed_tokens: EmbeddingLayer, // [V, D]
    layers: Vec<Block>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]; None when tied
    eps: f32,
}

impl Decoder {
    /// `spec(i)`: layer i's attention. Tensors under `model.` as mlx-lm names them.
    pub fn load(
        w: &mut Weights,
        num_layers: i32,
        eps: f32,
        tie_word_embeddings: bool,
        mut spec: impl FnMut(i32) -> Result<AttentionSpec>,
    ) -> Result<Self> {
        Self::load_blocks(w, num_layers, eps, tie_word_embeddings, |w, i, p| Block::load(w, p, spec(i)?))
    }

    /// As `load`, with each block built by `block(w, i, "model.layers.{i}")`.
    pub fn load_blocks(
        w: &mut Weights,
        num_layers: i32,
        eps: f32,
        tie_word_embeddings: bool,
        block: impl FnMut(&mut Weights, i32, &str) -> Result<Block>,
    ) -> Result<Self> {
        Self::load_blocks_under(w, "", num_layers, eps, tie_word_embeddings, block)
    }

    /// As `load_blocks`, every tensor under `root` (`""`: `model.*` and
    /// `lm_head` as mlx-lm names them; `"language_model."`: mlx-vlm's layout
    /// of a multimodal model's language model).
    pub fn load_blocks_under(
        w: &mut Weights,
        root: &str,
        num_layers: i32,
        eps: f32,
        tie_word_embeddings: bool,
        block: impl FnMut(&mut Weights, i32, &str) -> Result<Block>,
    ) -> Result<Self> {
        Self::load_blocks_named(w, &format!("{root}model"), &format!("{root}lm_head"), num_layers, eps, tie_word_embeddings, block)
    }

    /// As `load_blocks_under`, the body under `model` (`embed_tokens`,
    /// `layers.{i}`, `norm`) and the head at `head`, named apart (Hugging
    /// Face's Qwen3-VL: `model.language_model.*` beside a top-level `lm_head`).
    pub fn load_blocks_named(
        w: &mut Weights,
        model: &str,
        head: &str,
        num_layers: i32,
        eps: f32,
        tie_word_embeddings: bool,
        mut block: impl FnMut(&mut Weights, i32, &str) -> Result<Block>,
    ) -> Result<Self> {
        let embed_tokens = w.embedding(&format!("{model}.embed_tokens"))?;
        let layers = (0..num_layers)
            .map(|i| block(w, i, &format!("{model}.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor(&format!("{model}.norm.weight"))?;
        // mlx-lm drops `lm_head` when embeddings are tied; a checkpoint that
        // says untied but has no `lm_head` is treated as tied, as HF does.
        let tied = tie_word_embeddings || !w.contains(&format!("{head}.weight"));
        let lm_head = if tied { None } else { Some(w.linear(head)?) };
        Ok(Self { embed_tokens, layers, norm, lm_head, eps })
    }

    /// tokens: [B, L] -> logits [B, L | 1, V], or hidden states [B, L, D]
    pub fn forward(&self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let pos = Positions::of(attn); // each row's first position
        self.forward_at(tokens, attn, &pos)
    }

    /// `forward` with the new tokens' RoPE positions given (multimodal RoPE).
    pub fn forward_at(&self, tokens: &Array, attn: &mut dyn Attend, pos: &Positions) -> Result<Array> {
        self.forward_with(tokens, attn, pos, merge_inputs, |_, h| Ok(h))
    }

    /// `forward_at` with the token embeddings [B, L, D] merged with the
    /// host's input features by `merge` (`merge_inputs` by default), and
    /// each block's output as rows [N, D] (N = B*L, row-major over (B, L))
    /// passed through `after(layer, h)` before the next block sees it
    /// (Qwen3-VL's deepstack adds image features after its first layers).
    pub fn forward_with(
        &self,
        tokens: &Array,
        attn: &mut dyn Attend,
        pos: &Positions,
        merge: impl FnOnce(Array, &dyn Attend) -> Result<Array>,
        mut after: impl FnMut(u32, Array) -> Result<Array>,
    ) -> Result<Array> {
        let bl = (tokens.dim(0), tokens.dim(1));
        let h = merge(self.embed_tokens.lookup(tokens)?, &*attn)?; // [B, L, D]
        let mut h = h.reshape(&[bl.0 * bl.1, -1])?; // [N, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = after(i as u32, layer.forward(&h, bl, i as u32, pos, attn)?)?;
            offer_hidden_rows(attn, i as u32, &h, bl)?;
        }
        let h = rms_norm(&h, &self.norm, self.eps)?; // [N, D]
        finish_rows(h, bl, attn, |h| match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.as_linear(h),
        })
    }
}

// ---- cache spec ----

/// What the engine needs for a decoder's KV cache: every layer has
/// `kv_heads` x `head_dim`; `window(i)` is layer i's window (0: full).
pub struct Dims {
    pub num_layers: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub vocab_size: i32,
    pub hidden_size: i32,
    /// 0 when unknown.
    pub max_context: i32,
}

pub fn model_spec(d: Dims, window: impl Fn(i32) -> u32) -> ModelSpec {
    ModelSpec {
        num_layers: d.num_layers as u32,
        num_kv_heads: d.kv_heads as u32,
        head_dim: d.head_dim as u32,
        vocab_size: d.vocab_size as u32,
        hidden_size: d.hidden_size as u32,
        max_context: d.max_context as u32,
        sliding_window: (0..d.num_layers).map(window).collect::<Vec<_>>().into(),
    }
}
