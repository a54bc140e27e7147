//! `wquant-dense`: unquantized linear and embedding layers (bf16, f16, f32),
//! mode `none`. Matches mlx.nn.Linear / mlx.nn.Embedding.
use mlx_rs::{ops, Array};
use rmlx_plugin_api::{
    author::{EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, Tensors},
    export_plugin, Manifest, PluginError, QuantParams,
};

pub struct Dense;

impl PluginImpl for Dense {
    fn manifest() -> Manifest {
        Manifest::new("wquant-dense", env!("CARGO_PKG_VERSION"), "Unquantized bf16/f16/f32 layers")
            .weight_quants(&["none"])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        match mode {
            "none" => Ok(Box::new(Dense)),
            _ => Err(PluginError::unsupported(format!("wquant-dense has no mode {mode}"))),
        }
    }
}

/// weight: [out, in], bias: [out]
struct DenseLinear {
    weight_t: Array,
    bias: Option<Array>,
    dims: (u32, u32),
}

impl LinearImpl for DenseLinear {
    fn forward(&self, x: &Array) -> Result<Array> {
        // nn.Linear: addmm(bias, x, W^T) with a bias, x @ W^T without.
        Ok(match &self.bias {
            Some(b) => ops::addmm(b, x, &self.weight_t, None, None)?,
            None => x.matmul(&self.weight_t)?,
        })
    }
    fn dims(&self) -> (u32, u32) {
        self.dims
    }
}

/// weight: [vocab, dim]
struct DenseEmbedding {
    weight: Array,
}

impl EmbeddingImpl for DenseEmbedding {
    fn lookup(&self, ids: &Array) -> Result<Array> {
        Ok(self.weight.take_axis(ids, 0)?)
    }
    fn as_linear(&self, x: &Array) -> Result<Array> {
        Ok(x.matmul(self.weight.t())?)
    }
    fn dims(&self) -> (u32, u32) {
        (self.weight.dim(0) as u32, self.weight.dim(1) as u32)
    }
}

fn check_2d(t: &Tensors, w: &Array) -> Result<()> {
    if w.ndim() != 2 {
        return Err(PluginError::config(format!("{}weight must be 2-D, got shape {:?}", t.prefix, w.shape())));
    }
    Ok(())
}

impl QuantImpl for Dense {
    fn linear(&self, mut t: Tensors, _p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let weight = t.take("weight")?;
        check_2d(&t, &weight)?;
        let dims = (weight.dim(1) as u32, weight.dim(0) as u32);
        Ok(Box::new(DenseLinear { weight_t: weight.t(), bias: t.take_opt("bias"), dims }))
    }
    fn embedding(&self, mut t: Tensors, _p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        let weight = t.take("weight")?;
        check_2d(&t, &weight)?;
        Ok(Box::new(DenseEmbedding { weight }))
    }
}

export_plugin!(Dense);
