//! A plugin built against plugin ABI 3.6 (the frozen copy in plugin-api-3.6),
//! before 3.7 appended `ForwardCtx::positions`: architecture
//! `rmlx_prev_abi_36`, whose forward (through the 3.3 `ForwardCtx`, which a
//! 3.7 host lends with one more method than this plugin knows) reads the
//! rows' offsets and returns logits with (token + 1) % vocab the most likely
//! at every position, or the hidden states [B, L, 1] (the token ids) when
//! the host asks for them, so a test can check that the host really runs it.
use mlx_rs::{ops, ops::indexing::IndexOp, Array};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Output, PluginImpl, Result, Weights},
    export_plugin, Manifest, ModelSpec, PluginError,
};

struct Prev36;

struct Prev36Model {
    vocab: i32,
}

impl PluginImpl for Prev36 {
    fn manifest() -> Manifest {
        Manifest::new("test-prev-abi-36", "3.6.0", "Built against plugin ABI 3.6").architectures(&["rmlx_prev_abi_36"])
    }
    fn load_model(_t: &str, _config: &str, _w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        Ok(Box::new(Prev36Model { vocab: 16 }))
    }
}

impl ModelImpl for Prev36Model {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            vocab_size: self.vocab as u32,
            hidden_size: 1,
            max_context: 0,
            sliding_window: vec![0].into(),
        }
    }
    /// tokens [B, L] -> logits [B, L | 1, vocab], one-hot at (token + 1) % vocab.
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let offsets = attn.offsets(); // int32 [B]
        if offsets.shape() != [tokens.dim(0)] || attn.batch() as i32 != tokens.dim(0) {
            return Err(PluginError::other(format!("offsets {:?} for tokens {:?}", offsets.shape(), tokens.shape())));
        }
        if attn.output() == Output::Hidden {
            return Ok(tokens.as_type::<f32>()?.expand_dims(-1)?); // [B, L, 1]
        }
        let next = ops::remainder(&ops::add(tokens, &Array::from_int(1))?, &Array::from_int(self.vocab))?;
        let vocab = ops::arange::<_, i32>(None, self.vocab, None)?;
        let onehot = ops::eq(&ops::expand_dims(&next, -1)?, &vocab)?.as_type::<f32>()?;
        if attn.output() == Output::LastLogits {
            let l = onehot.dim(1);
            return Ok(onehot.index((.., (l - 1)..l, ..)));
        }
        Ok(onehot)
    }
}

export_plugin!(Prev36);
