//! model_type `whisper`: OpenAI's Whisper, as mlx-whisper's `whisper.py`
//! computes it, from the layout `rmlx convert --from-ct2` writes (mlx-
//! whisper's parameter names, conv weights `[out, k, in]`):
//! - encoder: log-mel frames [B, 2A, n_mels] -> conv1d (k 3, pad 1) + GELU
//!   -> conv1d (k 3, stride 2, pad 1) + GELU -> + sinusoidal positions ->
//!   `n_audio_layer` pre-LN blocks (non-causal self-attention, GELU MLP) ->
//!   LayerNorm: [B, A, D] (A = n_audio_ctx, 1500 for 30 s);
//! - decoder: token embedding + learned positions -> `n_text_layer` pre-LN
//!   blocks (causal self-attention, cross-attention over the encoder
//!   output, GELU MLP) -> LayerNorm -> logits through the tied embedding.
//!
//! Attention: q, v and out have biases, k has none; softmax scale
//! hd^-0.5 (mlx-whisper scales q and k by hd^-0.25 each). GELU is the exact
//! erf one (`mlx.nn.gelu`); LayerNorm eps 1e-5.
//!
//! How it uses the ABI 3.3 contract (no addition was needed):
//! - **Encoder forward**: the host asks for `Output::Hidden` and lends the
//!   log-mel window as `input_embeddings()` features [B, 2A, n_mels] (the
//!   tokens [B, 2A] are placeholders, the mask all true); self-attention goes
//!   through `attend` with `causal: false` (the host's cacheless encoder
//!   store, whose rows are A long). Returns [B, A, D].
//! - **Decoder forward**: the host asks for logits and lends the encoder
//!   output as `input_embeddings()` features [B, A, D] (mask all false: they
//!   replace no token embedding). Self-attention K/V live in the host's
//!   cache as layers 0..N (`cache_kind::FULL`); each block's cross-attention
//!   K/V [B, H, A, hd] are layer N + i's recurrent state
//!   (`cache_kind::STATE`): computed from the features on a sequence's first
//!   forward (`state()` empty) and `set_state`, read back on later steps.
//!
//! Shapes: B batch, L tokens, A audio positions, D state, H heads, hd
//! head_dim, V vocab, M mels.
use mlx_rs::{
    fast::{layer_norm, scaled_dot_product_attention},
    ops::{arange, concatenate, conv1d, exp},
    Array, Dtype,
};
use rmlx_nn::{merge_heads, parse_config, require_positive, split_heads};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, Output, Result, Weights},
    cache_kind, LayerCache, ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// mlx-whisper's `ModelDimensions`.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub n_mels: i32,
    pub n_audio_ctx: i32,
    pub n_audio_state: i32,
    pub n_audio_head: i32,
    pub n_audio_layer: i32,
    pub n_vocab: i32,
    pub n_text_ctx: i32,
    pub n_text_state: i32,
    pub n_text_head: i32,
    pub n_text_layer: i32,
}

const LN_EPS: f32 = 1e-5;

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        require_positive(&[
            ("n_mels", c.n_mels),
            ("n_audio_ctx", c.n_audio_ctx),
            ("n_audio_state", c.n_audio_state),
            ("n_audio_head", c.n_audio_head),
            ("n_audio_layer", c.n_audio_layer),
            ("n_vocab", c.n_vocab),
            ("n_text_ctx", c.n_text_ctx),
            ("n_text_state", c.n_text_state),
            ("n_text_head", c.n_text_head),
            ("n_text_layer", c.n_text_layer),
        ])?;
        for (name, state, heads) in
            [("n_audio_state", c.n_audio_state, c.n_audio_head), ("n_text_state", c.n_text_state, c.n_text_head)]
        {
            if state % heads != 0 {
                return Err(PluginError::config(format!("{name} {state} is not a multiple of its heads {heads}")));
            }
        }
        if c.n_audio_state != c.n_text_state {
            return Err(PluginError::config(format!(
                "n_audio_state {} differs from n_text_state {}: the decoder's cross-attention reads the encoder output as it is",
                c.n_audio_state, c.n_text_state
            )));
        }
        if c.n_audio_state % 2 != 0 {
            return Err(PluginError::config("n_audio_state must be even (sinusoidal positions)"));
        }
        Ok(c)
    }
}

// ---- layers ----

/// mlx.nn.LayerNorm (affine): weight and bias [D].
struct LayerNorm {
    weight: Array,
    bias: Array,
}

impl LayerNorm {
    fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self { weight: w.tensor(&format!("{p}.weight"))?, bias: w.tensor(&format!("{p}.bias"))? })
    }
    /// x: [..., D] -> [..., D]
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(layer_norm(x, Some(&self.weight), Some(&self.bias), LN_EPS)?)
    }
}

/// GELU with the exact erf (mlx.nn.gelu).
fn gelu(x: &Array) -> Result<Array> {
    Ok(mlx_rs::nn::gelu(x)?)
}

/// mlx-whisper's `MultiHeadAttention`: query/value/out with biases, key without.
struct Mha {
    query: LinearLayer, // [D] -> [D]
    key: LinearLayer,   // [D] -> [D]
    value: LinearLayer, // [D] -> [D]
    out: LinearLayer,   // [D] -> [D]
    heads: i32,
    scale: f32,
}

impl Mha {
    fn load(w: &mut Weights, p: &str, state: i32, heads: i32) -> Result<Self> {
        Ok(Self {
            query: w.linear(&format!("{p}.query"))?,
            key: w.linear(&format!("{p}.key"))?,
            value: w.linear(&format!("{p}.value"))?,
            out: w.linear(&format!("{p}.out"))?,
            heads,
            scale: ((state / heads) as f32).powf(-0.5),
        })
    }

    /// Self-attention through the host: x [B, L, D] -> [B, L, D].
    fn self_attend(&self, x: &Array, layer: u32, causal: bool, attn: &mut dyn Attend) -> Result<Array> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?; // [B, H, L, hd]
        let k = split_heads(&self.key.forward(x)?, self.heads)?; // [B, H, L, hd]
        let v = split_heads(&self.value.forward(x)?, self.heads)?; // [B, H, L, hd]
        let opts = AttendOpts::plain(self.scale);
        let opts = if causal { opts } else { opts.bidirectional() };
        let o = attn.attend(layer, q, k, v, &opts)?; // [B, H, L, hd]
        self.out.forward(&merge_heads(&o)?)
    }

    /// Cross-attention K/V of the encoder output xa [B, A, D]: [B, H, A, hd] each.
    fn cross_kv(&self, xa: &Array) -> Result<(Array, Array)> {
        let k = split_heads(&self.key.forward(xa)?, self.heads)?;
        let v = split_heads(&self.value.forward(xa)?, self.heads)?;
        Ok((k, v))
    }

    /// Cross-attention of x [B, L, D] over k/v [B, H, A, hd] (no mask) -> [B, L, D].
    fn cross_attend(&self, x: &Array, k: &Array, v: &Array) -> Result<Array> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?; // [B, H, L, hd]
        let o = scaled_dot_product_attention(&q, k, v, self.scale, None, None)?; // [B, H, L, hd]
        self.out.forward(&merge_heads(&o)?)
    }
}

/// mlx-whisper's `ResidualAttentionBlock`: pre-LN self-attention, optional
/// pre-LN cross-attention, pre-LN GELU MLP.
struct Block {
    attn: Mha,
    attn_ln: LayerNorm,
    cross: Option<(Mha, LayerNorm)>,
    mlp1: LinearLayer, // [D] -> [4D]
    mlp2: LinearLayer, // [4D] -> [D]
    mlp_ln: LayerNorm,
}

impl Block {
    fn load(w: &mut Weights, p: &str, state: i32, heads: i32, cross: bool) -> Result<Self> {
        let cross = if cross {
            Some((Mha::load(w, &format!("{p}.cross_attn"), state, heads)?, LayerNorm::load(w, &format!("{p}.cross_attn_ln"))?))
        } else {
            None
        };
        Ok(Self {
            attn: Mha::load(w, &format!("{p}.attn"), state, heads)?,
            attn_ln: LayerNorm::load(w, &format!("{p}.attn_ln"))?,
            cross,
            mlp1: w.linear(&format!("{p}.mlp1"))?,
            mlp2: w.linear(&format!("{p}.mlp2"))?,
            mlp_ln: LayerNorm::load(w, &format!("{p}.mlp_ln"))?,
        })
    }

    /// x + mlp2(gelu(mlp1(mlp_ln(x)))): [B, L, D]
    fn mlp(&self, x: &Array) -> Result<Array> {
        let h = gelu(&self.mlp1.forward(&self.mlp_ln.forward(x)?)?)?; // [B, L, 4D]
        Ok(x.add(&self.mlp2.forward(&h)?)?)
    }
}

// ---- encoder ----

struct Encoder {
    conv1_w: Array, // [D, 3, M]
    conv1_b: Array, // [D]
    conv2_w: Array, // [D, 3, D]
    conv2_b: Array, // [D]
    positions: Array, // [A, D] sinusoids
    blocks: Vec<Block>,
    ln_post: LayerNorm,
}

/// mlx-whisper's `sinusoids(length, channels)`: [length, channels],
/// sin then cos of `pos * exp(-ln(10000) / (channels/2 - 1) * i)`.
fn sinusoids(length: i32, channels: i32) -> Result<Array> {
    let half = channels / 2;
    let inc = (10000f32).ln() / (half - 1).max(1) as f32;
    let inv = exp(&arange::<_, f32>(0, half, None)?.multiply(Array::from_f32(-inc))?)?; // [C/2]
    let t = arange::<_, f32>(0, length, None)?.reshape(&[length, 1])?; // [len, 1]
    let scaled = t.multiply(&inv.reshape(&[1, half])?)?; // [len, C/2]
    Ok(concatenate(&[scaled.sin()?, scaled.cos()?], 1)?)
}

impl Encoder {
    fn load(w: &mut Weights, c: &Config, dtype: Dtype) -> Result<Self> {
        let blocks = (0..c.n_audio_layer)
            .map(|i| Block::load(w, &format!("encoder.blocks.{i}"), c.n_audio_state, c.n_audio_head, false))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1_w: w.tensor("encoder.conv1.weight")?,
            conv1_b: w.tensor("encoder.conv1.bias")?,
            conv2_w: w.tensor("encoder.conv2.weight")?,
            conv2_b: w.tensor("encoder.conv2.bias")?,
            positions: sinusoids(c.n_audio_ctx, c.n_audio_state)?.as_dtype(dtype)?,
            blocks,
            ln_post: LayerNorm::load(w, "encoder.ln_post")?,
        })
    }

    /// mel: [B, 2A, M] -> [B, A, D]
    fn forward(&self, mel: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let mel = mel.as_dtype(self.conv1_w.dtype())?;
        let x = gelu(&conv1d(&mel, &self.conv1_w, 1, 1, 1, 1)?.add(&self.conv1_b)?)?; // [B, 2A, D]
        let x = gelu(&conv1d(&x, &self.conv2_w, 2, 1, 1, 1)?.add(&self.conv2_b)?)?; // [B, A, D]
        let mut x = x.add(&self.positions)?; // [B, A, D]
        for (i, b) in self.blocks.iter().enumerate() {
            x = x.add(&b.attn.self_attend(&b.attn_ln.forward(&x)?, i as u32, false, attn)?)?;
            x = b.mlp(&x)?;
        }
        self.ln_post.forward(&x)
    }
}

// ---- decoder ----

struct Decoder {
    token_embedding: EmbeddingLayer, // [V, D], tied head
    positions: Array,                // [n_text_ctx, D] learned
    blocks: Vec<Block>,
    ln: LayerNorm,
}

impl Decoder {
    fn load(w: &mut Weights, c: &Config) -> Result<Self> {
        let blocks = (0..c.n_text_layer)
            .map(|i| Block::load(w, &format!("decoder.blocks.{i}"), c.n_text_state, c.n_text_head, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: w.embedding("decoder.token_embedding")?,
            positions: w.tensor("decoder.positional_embedding")?,
            blocks,
            ln: LayerNorm::load(w, "decoder.ln")?,
        })
    }

    /// tokens [B, L], xa [B, A, D] (read on a sequence's first forward only)
    /// -> logits [B, 1 | L, V]
    fn forward(&self, tokens: &Array, xa: Option<&Array>, attn: &mut dyn Attend) -> Result<Array> {
        let (l, n_ctx) = (tokens.dim(1), self.positions.dim(0));
        if attn.offset() + l > n_ctx {
            return Err(PluginError::config(format!(
                "{} tokens exceed the decoder's {n_ctx} positions (n_text_ctx)",
                attn.offset() + l
            )));
        }
        let pos = attn.offsets().reshape(&[-1, 1])?.add(&arange::<_, i32>(0, l, None)?.reshape(&[1, l])?)?; // [B, L]
        let mut x = self.token_embedding.lookup(tokens)?.add(&self.positions.take_axis(&pos, 0)?)?; // [B, L, D]
        let n = self.blocks.len() as u32;
        for (i, b) in self.blocks.iter().enumerate() {
            let i = i as u32;
            x = x.add(&b.attn.self_attend(&b.attn_ln.forward(&x)?, i, true, attn)?)?;
            let (cross, cross_ln) = b.cross.as_ref().expect("decoder blocks have cross-attention");
            let mut kv = attn.state(n + i)?;
            if kv.is_empty() {
                let xa = xa.ok_or_else(|| {
                    PluginError::config("the Whisper decoder's first forward needs the encoder output as input features")
                })?;
                let (k, v) = cross.cross_kv(xa)?; // [B, H, A, hd] each
                attn.set_state(n + i, vec![k.clone(), v.clone()])?;
                kv = vec![k, v];
            }
            if kv.len() != 2 {
                return Err(PluginError::other(format!("cross-attention state of layer {} holds {} arrays, not 2", n + i, kv.len())));
            }
            x = x.add(&cross.cross_attend(&cross_ln.forward(&x)?, &kv[0], &kv[1])?)?;
            x = b.mlp(&x)?;
        }
        let x = self.ln.forward(&x)?; // [B, L, D]
        match attn.output() {
            Output::AllLogits => self.token_embedding.as_linear(&x),
            Output::LastLogits => self.token_embedding.as_linear(&rmlx_nn::last_position(&x)?),
            Output::Hidden => Ok(x),
            Output::Media => Err(PluginError::unsupported("whisper's encoder runs as Output::Hidden with log-mel features, not as a media (image) encoder")),
        }
    }
}

// ---- model ----

pub struct Whisper {
    config: Config,
    encoder: Encoder,
    decoder: Decoder,
}

impl Whisper {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let decoder = Decoder::load(w, &c)?;
        let encoder = Encoder::load(w, &c, decoder.positions.dtype())?;
        if w.contains("alignment_heads") {
            // Word-level timestamps' heads; unused until word timestamps are.
            let _ = w.tensor("alignment_heads")?;
        }
        Ok(Self { config: c, encoder, decoder })
    }
}

impl ModelImpl for Whisper {
    /// The decoder's cache: N self-attention layers, then N cross-attention
    /// state layers (see `layers`).
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let n = 2 * c.n_text_layer as u32;
        ModelSpec {
            num_layers: n,
            num_kv_heads: c.n_text_head as u32,
            head_dim: (c.n_text_state / c.n_text_head) as u32,
            vocab_size: c.n_vocab as u32,
            hidden_size: c.n_text_state as u32,
            max_context: c.n_text_ctx as u32,
            sliding_window: vec![0; n as usize].into(),
        }
    }

    fn layers(&self) -> Vec<LayerCache> {
        let c = &self.config;
        let (kv_heads, head_dim) = (c.n_text_head as u32, (c.n_text_state / c.n_text_head) as u32);
        let full = LayerCache { kind: cache_kind::FULL, window: 0, kv_heads, head_dim, shared_with: 0 };
        let state = LayerCache { kind: cache_kind::STATE, ..full.clone() };
        (0..c.n_text_layer).map(|_| full.clone()).chain((0..c.n_text_layer).map(|_| state.clone())).collect()
    }

    /// Encoder (`Output::Hidden`): features = log-mel [B, 2A, M] -> [B, A, D].
    /// Decoder (logits): tokens [B, L], features = encoder output [B, A, D]
    /// on a sequence's first forward -> [B, 1 | L, V].
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let features = attn.input_embeddings().map(|(f, _)| f);
        if attn.output() == Output::Hidden {
            let c = &self.config;
            let mel = features.ok_or_else(|| {
                PluginError::config("the Whisper encoder takes the log-mel frames as input features; none were given")
            })?;
            if mel.ndim() != 3 || mel.dim(1) != 2 * c.n_audio_ctx || mel.dim(2) != c.n_mels {
                return Err(PluginError::config(format!(
                    "the Whisper encoder takes log-mel frames [B, {}, {}], got {:?}",
                    2 * c.n_audio_ctx,
                    c.n_mels,
                    mel.shape()
                )));
            }
            return self.encoder.forward(&mel, attn);
        }
        self.decoder.forward(tokens, features.as_ref(), attn)
    }
}
