//! model_type `bert`, `roberta` and `xlm-roberta`: BERT-family encoders
//! (all-MiniLM-L6-v2, BGE, E5, XLM-R based embedders), as transformers'
//! `BertModel` / `RobertaModel` compute them, without the pooler:
//! - embeddings: word + absolute position + token type (type 0 for every
//!   token: one-segment inputs), then LayerNorm;
//! - `num_hidden_layers` post-norm blocks: bidirectional self-attention
//!   (q/k/v/o with biases, softmax scale 1/sqrt(head_dim), padded keys
//!   masked by the host), residual + LayerNorm, then the intermediate
//!   dense layer with GELU, the output dense layer, residual + LayerNorm;
//! - the output is the last block's hidden states (there is no final norm
//!   and no LM head: `Output::Hidden` only).
//!
//! RoBERTa differs only in its positions: they start at `pad_token_id + 1`
//! (transformers' `create_position_ids_from_input_ids`, with the rows padded
//! at the end so valid tokens are numbered 0.. in order), and its position
//! table holds that many more rows, which `max_context` leaves out.
//!
//! Checkpoint names: HF's `BertModel` saves `embeddings.*`, `encoder.*`;
//! `BertForMaskedLM` and friends save the same under `bert.` (`roberta.`);
//! both are accepted (whichever holds `embeddings.word_embeddings.weight`).
//!
//! Shapes: B batch, L tokens, D hidden, H heads, hd head_dim, F intermediate.
use crate::layers::{gelu, LayerNorm};
use mlx_rs::{ops::arange, Array};
use rmlx_nn::{gemma::gelu_approx, merge_heads, parse_config, require_positive, split_heads};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys of transformers' `BertConfig` / `RobertaConfig` this file reads,
/// with their defaults, and those that would change the computation (checked
/// so that a config needing them is refused by name rather than run wrongly).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub intermediate_size: i32,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i32,
    #[serde(default = "d_type_vocab")]
    pub type_vocab_size: i32,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "d_pos_type")]
    pub position_embedding_type: String,
    pub pad_token_id: Option<i32>,
    #[serde(default)]
    pub is_decoder: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    /// Set by `check`: the first position id (0 for BERT, pad + 1 for RoBERTa).
    #[serde(skip)]
    pub position_offset: i32,
}

fn d_act() -> String {
    "gelu".into()
}
fn d_max_pos() -> i32 {
    512
}
fn d_type_vocab() -> i32 {
    2
}
fn d_eps() -> f32 {
    1e-12
}
fn d_pos_type() -> String {
    "absolute".into()
}

impl Config {
    pub fn parse(model_type: &str, json: &str) -> Result<Self> {
        let mut c: Config = parse_config(json)?;
        c.position_offset = match model_type {
            // transformers' RobertaConfig defaults pad_token_id to 1.
            "roberta" | "xlm-roberta" => c.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        };
        c.check()?;
        Ok(c)
    }

    fn head_dim(&self) -> i32 {
        self.hidden_size / self.num_attention_heads
    }

    /// Tokens one row may hold: the position table less the offset.
    pub fn max_tokens(&self) -> i32 {
        self.max_position_embeddings - self.position_offset
    }

    /// Refuses, by name, what this file does not implement.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        require_positive(&positive)?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size < 1 {
            return bad(format!("type_vocab_size must be at least 1, got {}", self.type_vocab_size));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_pytorch_tanh") {
            return bad(format!("hidden_act `{}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)", self.hidden_act));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (absolute only)",
                self.position_embedding_type
            ));
        }
        if self.is_decoder || self.add_cross_attention {
            return bad("is_decoder / add_cross_attention are not supported (encoders only)".into());
        }
        if self.position_offset < 0 || self.max_tokens() < 1 {
            return bad(format!(
                "pad_token_id {:?} leaves no positions in a table of {}",
                self.pad_token_id, self.max_position_embeddings
            ));
        }
        if !(self.layer_norm_eps > 0.0) {
            return bad(format!("layer_norm_eps must be positive, got {}", self.layer_norm_eps));
        }
        Ok(())
    }
}

// ---- attention ----

pub struct BertAttention {
    query: LinearLayer, // [D] -> [D]
    key: LinearLayer,   // [D] -> [D]
    value: LinearLayer, // [D] -> [D]
    dense: LinearLayer, // [D] -> [D]
    norm: LayerNorm,    // [D]
    heads: i32,
    scale: f32,
}

impl BertAttention {
    fn load(w: &mut Weights, p: &str, c: &Config) -> Result<Self> {
        Ok(Self {
            query: w.linear(&format!("{p}.self.query"))?,
            key: w.linear(&format!("{p}.self.key"))?,
            value: w.linear(&format!("{p}.self.value"))?,
            dense: w.linear(&format!("{p}.output.dense"))?,
            norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            scale: (c.head_dim() as f32).powf(-0.5),
        })
    }

    /// x: [B, L, D] -> LayerNorm(x + attention(x)): [B, L, D]
    fn forward(&self, x: &Array, layer: u32, attn: &mut dyn Attend) -> Result<Array> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?; // [B, H, L, hd]
        let k = split_heads(&self.key.forward(x)?, self.heads)?; // [B, H, L, hd]
        let v = split_heads(&self.value.forward(x)?, self.heads)?; // [B, H, L, hd]
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(self.scale).bidirectional())?; // [B, H, L, hd]
        let o = self.dense.forward(&merge_heads(&o)?)?; // [B, L, D]
        self.norm.forward(&x.add(&o)?)
    }
}

// ---- feed-forward ----

pub struct BertFfn {
    intermediate: LinearLayer, // [D] -> [F]
    output: LinearLayer,       // [F] -> [D]
    norm: LayerNorm,           // [D]
    exact_gelu: bool,
}

impl BertFfn {
    fn load(w: &mut Weights, p: &str, c: &Config) -> Result<Self> {
        Ok(Self {
            intermediate: w.linear(&format!("{p}.intermediate.dense"))?,
            output: w.linear(&format!("{p}.output.dense"))?,
            norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), c.layer_norm_eps)?,
            exact_gelu: c.hidden_act == "gelu",
        })
    }

    /// x: [B, L, D] -> LayerNorm(x + output(gelu(intermediate(x)))): [B, L, D]
    fn forward(&self, x: &Array) -> Result<Array> {
        let h = self.intermediate.forward(x)?; // [B, L, F]
        let h = if self.exact_gelu { gelu(&h)? } else { gelu_approx(&h)? }; // [B, L, F]
        let h = self.output.forward(&h)?; // [B, L, D]
        self.norm.forward(&x.add(&h)?)
    }
}

// ---- block ----

pub struct BertLayer {
    attention: BertAttention,
    ffn: BertFfn,
}

impl BertLayer {
    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array, layer: u32, attn: &mut dyn Attend) -> Result<Array> {
        let h = self.attention.forward(x, layer, attn)?;
        self.ffn.forward(&h)
    }
}

// ---- model ----

pub struct Bert {
    config: Config,
    word: EmbeddingLayer,     // [V, D]
    position: EmbeddingLayer, // [P, D]
    token_type: EmbeddingLayer, // [T, D]
    norm: LayerNorm,          // [D]
    layers: Vec<BertLayer>,
}

/// The prefix the checkpoint's names carry: none (`BertModel`), or the
/// base model's attribute of a task model (`bert.`, `roberta.`, `model.`).
fn root(w: &Weights) -> Result<&'static str> {
    ["", "bert.", "roberta.", "model."]
        .into_iter()
        .find(|p| w.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .ok_or_else(|| {
            PluginError::missing(
                "no embeddings.word_embeddings.weight (nor under bert., roberta. or model.): not a BERT-family checkpoint",
            )
        })
}

impl Bert {
    pub fn load(model_type: &str, config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(model_type, config_json)?;
        let r = root(w)?;
        let word = w.embedding(&format!("{r}embeddings.word_embeddings"))?;
        let position = w.embedding(&format!("{r}embeddings.position_embeddings"))?;
        let token_type = w.embedding(&format!("{r}embeddings.token_type_embeddings"))?;
        let norm = LayerNorm::load(w, &format!("{r}embeddings.LayerNorm"), c.layer_norm_eps)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("{r}encoder.layer.{i}");
                Ok(BertLayer {
                    attention: BertAttention::load(w, &format!("{p}.attention"), &c)?,
                    ffn: BertFfn::load(w, &p, &c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config: c, word, position, token_type, norm, layers })
    }

    /// tokens: [B, L] -> LayerNorm(word + position + token type 0): [B, L, D]
    fn embed(&self, tokens: &Array) -> Result<Array> {
        let l = tokens.dim(1);
        if l > self.config.max_tokens() {
            return Err(PluginError::config(format!(
                "{l} tokens exceed this encoder's {} positions (max_position_embeddings)",
                self.config.max_tokens()
            )));
        }
        let off = self.config.position_offset;
        let pos = arange::<_, i32>(off, off + l, None)?.reshape(&[1, l])?; // [1, L]
        let types = Array::from_slice(&[0i32], &[1, 1]); // [1, 1]
        let h = self.word.lookup(tokens)?; // [B, L, D]
        let h = h.add(&self.position.lookup(&pos)?)?; // + [1, L, D]
        let h = h.add(&self.token_type.lookup(&types)?)?; // + [1, 1, D]
        self.norm.forward(&h)
    }
}

impl ModelImpl for Bert {
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        ModelSpec {
            num_layers: c.num_hidden_layers as u32,
            num_kv_heads: c.num_attention_heads as u32,
            head_dim: c.head_dim() as u32,
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            max_context: c.max_tokens() as u32,
            sliding_window: vec![0; c.num_hidden_layers as usize].into(),
        }
    }

    /// tokens: [B, L] -> hidden states [B, L, D]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        if attn.output() != Output::Hidden {
            return Err(PluginError::unsupported(
                "a BERT-family encoder has no LM head: it returns hidden states (embeddings), never logits",
            ));
        }
        let mut h = self.embed(tokens)?; // [B, L, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, i as u32, attn)?;
            if attn.wants_hidden(i as u32) {
                attn.put_hidden(i as u32, &h)?;
            }
        }
        Ok(h)
    }
}
