//! A loaded Whisper model as the transcription loop sees it: the
//! architecture plugin (`arch-whisper`) behind the engine's forward, the
//! tokenizer and the special tokens of the converted directory
//! (`generation_config.json`, written by `rmlx convert --from-ct2`).
//!
//! The encoder runs as one cacheless forward (`engine::encoder::EncoderStore`,
//! non-causal attention) that asks for hidden states and lends the log-mel
//! window as input features; the decoder runs over a one-sequence `KvCache`
//! whose first forward lends the encoder output as features (the plugin
//! keeps each block's cross-attention K/V as that layer's state), see
//! plugins/arch-whisper/src/whisper.rs.
use crate::engine::{attend::ForwardRequest, cache::KvCache, encoder::EncoderStore, LoadedModel};
use crate::plugins::Registry;
use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{ops::zeros, Array, Dtype};
use rmlx_plugin_api::author::Output;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// mlx-whisper's `ModelDimensions` (the parts the host needs).
#[derive(Deserialize, Debug, Clone)]
pub struct Dims {
    pub n_mels: usize,
    pub n_audio_ctx: usize,
    pub n_vocab: usize,
    pub n_text_ctx: usize,
}

/// The special tokens, from generation_config.json and the tokenizer.
#[derive(Debug, Clone)]
pub struct Specials {
    pub eot: u32,
    pub sot: u32,
    pub sot_prev: u32,
    pub sot_lm: Option<u32>,
    pub no_speech: Option<u32>,
    pub no_timestamps: u32,
    pub timestamp_begin: u32,
    pub transcribe: Option<u32>,
    pub translate: Option<u32>,
    /// Language code ("en") -> token id, for multilingual models.
    pub languages: BTreeMap<String, u32>,
    pub multilingual: bool,
    /// Suppressed at every step (mlx-whisper's `suppress_tokens="-1"`:
    /// the non-speech tokens, plus the task and SOT-family tokens).
    pub suppress: Vec<u32>,
    /// Suppressed at the first sampled position (" " and EOT).
    pub begin_suppress: Vec<u32>,
    /// The latest initial timestamp, in timestamp steps (1 s: 50).
    pub max_initial_timestamp_index: Option<u32>,
}

#[derive(Deserialize)]
struct GenConfig {
    eos_token_id: u32,
    decoder_start_token_id: u32,
    prev_sot_token_id: u32,
    no_timestamps_token_id: u32,
    timestamp_begin: Option<u32>,
    #[serde(default)]
    is_multilingual: bool,
    #[serde(default)]
    lang_to_id: BTreeMap<String, u32>,
    #[serde(default)]
    task_to_id: BTreeMap<String, u32>,
    #[serde(default)]
    suppress_tokens: Vec<u32>,
    #[serde(default)]
    begin_suppress_tokens: Vec<u32>,
    max_initial_timestamp_index: Option<u32>,
}

pub struct WhisperModel {
    pub loaded: LoadedModel,
    pub dims: Dims,
    pub tokenizer: tokenizers::Tokenizer,
    pub specials: Specials,
}

impl WhisperModel {
    /// Loads a converted Whisper directory (config.json `model_type: whisper`,
    /// weights, tokenizer.json, generation_config.json).
    pub fn load(dir: &Path, registry: &Registry) -> Result<Self> {
        let loaded = LoadedModel::load(dir, registry)?;
        if loaded.dir.model_type != "whisper" {
            bail!(
                "{} is a `{}` model, not a Whisper model (model_type whisper; `rmlx convert --from-ct2` makes one)",
                dir.display(),
                loaded.dir.model_type
            );
        }
        let dims: Dims = serde_json::from_value(loaded.dir.config.clone())
            .with_context(|| format!("{}: config.json lacks Whisper's dimensions", dir.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("loading {}: {e}", tok_path.display()))?;
        let gc_path = dir.join("generation_config.json");
        let text = std::fs::read_to_string(&gc_path)
            .with_context(|| format!("reading {} (the special tokens; `rmlx convert --from-ct2` writes it)", gc_path.display()))?;
        let gc: GenConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", gc_path.display()))?;
        let specials = Specials::new(gc, &tokenizer)?;
        Ok(Self { loaded, dims, tokenizer, specials })
    }

    /// The encoder over one window of log-mel frames `mel` ([2A, n_mels],
    /// frame-major) -> the audio features [1, A, D], evaluated.
    pub fn encode(&mut self, mel: &[f32]) -> Result<Array> {
        let (frames, m) = (2 * self.dims.n_audio_ctx, self.dims.n_mels);
        if mel.len() != frames * m {
            bail!("the encoder takes {frames} frames of {m} mels, got {} values", mel.len());
        }
        let out = encode(&mut self.loaded, Array::from_slice(mel, &[1, frames as i32, m as i32]))?;
        out.eval()?;
        Ok(out)
    }

    /// A fresh decoder cache: self-attention layers, then the cross-attention state layers.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.loaded.spec.num_layers as usize)
    }

    /// One decoder forward of `tokens` over `cache` (the audio features
    /// `xa` [1, A, D] are read on the cache's first forward only) -> f32
    /// logits per position, [L][V] when `all` else the last position's only.
    pub fn decode(&mut self, cache: &mut KvCache, tokens: &[u32], xa: &Array, all: bool) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let out = decode(&mut self.loaded, cache, &Array::from_slice(&ids, &[1, ids.len() as i32]), xa, all)?;
        let out = out.as_dtype(Dtype::Float32)?;
        out.eval()?;
        let v = out.dim(2) as usize;
        Ok(out.as_slice::<f32>().chunks(v).map(<[f32]>::to_vec).collect())
    }

    /// Text of `ids`, timestamp and special tokens left out.
    pub fn text(&self, ids: &[u32]) -> Result<String> {
        let text: Vec<u32> = ids.iter().copied().filter(|&t| t < self.specials.eot).collect();
        self.tokenizer.decode(&text, false).map_err(|e| anyhow!("decoding tokens: {e}"))
    }
}

/// The encoder: log-mel frames `mel` [B, 2A, n_mels] -> audio features
/// [B, A, D] (lazy). One cacheless forward that asks for hidden states,
/// the frames lent as input features over placeholder tokens [B, 2A].
pub fn encode(loaded: &mut LoadedModel, mel: Array) -> Result<Array> {
    let (b, frames) = (mel.dim(0), mel.dim(1));
    let tokens = zeros::<i32>(&[b, frames])?; // [B, 2A]
    let mask = Array::from_slice(&vec![true; (b * frames) as usize], &[b, frames]); // [B, 2A]
    let a = frames / 2;
    let mut store = EncoderStore::new(&vec![a; b as usize], a);
    let req = ForwardRequest { output: Some(Output::Hidden), inputs: Some((mel, mask)), ..ForwardRequest::default() };
    Ok(loaded.run(&tokens, &mut store, req)?.out)
}

/// One decoder forward of `tokens` [1, L] over `cache` -> logits [1, L | 1, V]
/// (lazy). The audio features `xa` [1, A, D] are lent on the cache's first
/// forward only: later ones read the cross-attention K/V the plugin kept
/// as state. Advances the cache by L.
pub fn decode(loaded: &mut LoadedModel, cache: &mut KvCache, tokens: &Array, xa: &Array, all: bool) -> Result<Array> {
    let (b, l) = (tokens.dim(0), tokens.dim(1));
    let inputs = (cache.offset() == 0).then(|| (xa.clone(), Array::from_slice(&vec![false; (b * l) as usize], &[b, l])));
    let output = if all { Output::AllLogits } else { Output::LastLogits };
    let req = ForwardRequest { output: Some(output), inputs, ..ForwardRequest::default() };
    let out = loaded.run(tokens, cache, req)?.out;
    cache.advance(l);
    Ok(out)
}

impl Specials {
    fn new(gc: GenConfig, tok: &tokenizers::Tokenizer) -> Result<Self> {
        let id = |t: &str| tok.token_to_id(t);
        let timestamp_begin = gc
            .timestamp_begin
            .or_else(|| id("<|0.00|>"))
            .unwrap_or(gc.no_timestamps_token_id + 1);
        let no_speech = id("<|nospeech|>").or_else(|| id("<|nocaptions|>"));
        let sot_lm = id("<|startoflm|>");
        let (transcribe, translate) = (gc.task_to_id.get("transcribe").copied(), gc.task_to_id.get("translate").copied());
        let languages = gc
            .lang_to_id
            .iter()
            .map(|(k, &v)| (k.trim_start_matches("<|").trim_end_matches("|>").to_string(), v))
            .collect();
        let mut suppress = gc.suppress_tokens;
        suppress.extend([transcribe, translate, Some(gc.decoder_start_token_id), Some(gc.prev_sot_token_id), sot_lm, no_speech].into_iter().flatten());
        suppress.sort_unstable();
        suppress.dedup();
        let begin_suppress = if gc.begin_suppress_tokens.is_empty() {
            let mut v: Vec<u32> = id("Ġ").into_iter().collect();
            v.push(gc.eos_token_id);
            v
        } else {
            gc.begin_suppress_tokens
        };
        Ok(Self {
            eot: gc.eos_token_id,
            sot: gc.decoder_start_token_id,
            sot_prev: gc.prev_sot_token_id,
            sot_lm,
            no_speech,
            no_timestamps: gc.no_timestamps_token_id,
            timestamp_begin,
            transcribe,
            translate,
            languages,
            multilingual: gc.is_multilingual,
            suppress,
            begin_suppress,
            // mlx-whisper's default max_initial_timestamp = 1.0 s (50 steps of 0.02 s).
            max_initial_timestamp_index: Some(gc.max_initial_timestamp_index.unwrap_or(50)),
        })
    }
}
