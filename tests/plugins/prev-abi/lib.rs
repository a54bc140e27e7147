//! A plugin built against plugin ABI 3.0 (the frozen copy in plugin-api-3.0),
//! before the contract grew: architecture `rmlx_prev_abi`, whose forward
//! returns logits with token id + 1 the most likely, so a test can check that
//! the host really runs it.
use mlx_rs::{ops, ops::indexing::IndexOp, Array};
use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Attention, Manifest, ModelSpec,
};

struct Prev;

struct PrevModel {
    vocab: i32,
}

impl PluginImpl for Prev {
    fn manifest() -> Manifest {
        Manifest::new("test-prev-abi", "3.0.0", "Built against plugin ABI 3.0").architectures(&["rmlx_prev_abi"])
    }
    fn load_model(_t: &str, _config: &str, _w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        Ok(Box::new(PrevModel { vocab: 16 }))
    }
}

impl ModelImpl for PrevModel {
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
    fn forward(&mut self, tokens: &Array, _attn: &mut Attention, last_only: bool) -> Result<Array> {
        let next = ops::remainder(&ops::add(tokens, &Array::from_int(1))?, &Array::from_int(self.vocab))?;
        let vocab = ops::arange::<_, i32>(None, self.vocab, None)?;
        let onehot = ops::eq(&ops::expand_dims(&next, -1)?, &vocab)?.as_type::<f32>()?;
        if last_only {
            let l = onehot.dim(1);
            return Ok(onehot.index((.., (l - 1)..l, ..)));
        }
        Ok(onehot)
    }
}

export_plugin!(Prev);
