//! `wquant-example`: a weight format written the way a third party would,
//! against `rmlx-plugin-api` alone. Mode `example-int8`: per-row symmetric
//! int8, the layout
//!
//! * `weight`: int8 `[out, in]`
//! * `scales`: float32 `[out, 1]`, w = scale * q
//!
//! declared in config.json as
//! `"quantization": {"mode": "example-int8", "bits": 8, "group_size": 0}`
//! (the host asks for integer `bits`/`group_size`; this format ignores the
//! group size). The layer dequantizes once at load and multiplies densely.
use mlx_rs::{Array, Dtype};
use rmlx_plugin_api::{
    author::{EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, Tensors},
    export_plugin, Manifest, PluginError, QuantParams,
};

pub const MODE: &str = "example-int8";

pub struct ExampleInt8;

impl PluginImpl for ExampleInt8 {
    fn manifest() -> Manifest {
        Manifest::new("wquant-example", env!("CARGO_PKG_VERSION"), "Example: per-row symmetric int8 weights")
            .weight_quants(&[MODE])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        if mode == MODE {
            Ok(Box::new(ExampleInt8))
        } else {
            Err(PluginError::unsupported(format!("wquant-example has no mode {mode}")))
        }
    }
}

/// The dequantized weight `[out, in]`, float32.
fn dequantized(t: &mut Tensors, p: &QuantParams) -> Result<Array> {
    if p.bits != 8 {
        return Err(PluginError::config(format!("{MODE} stores 8 bits, config says {}", p.bits)));
    }
    let q = t.take("weight")?;
    let s = t.take("scales")?;
    if q.dtype() != Dtype::Int8 || q.ndim() != 2 || s.shape() != [q.dim(0), 1] {
        return Err(PluginError::config(format!(
            "{}: expected int8 weight [out, in] and scales [out, 1], got {:?} {:?} and {:?}",
            t.prefix,
            q.dtype(),
            q.shape(),
            s.shape()
        )));
    }
    Ok(q.as_dtype(Dtype::Float32)?.multiply(&s.as_dtype(Dtype::Float32)?)?)
}

struct Linear {
    weight_t: Array, // [in, out]
    bias: Option<Array>,
    dims: (u32, u32),
}

impl LinearImpl for Linear {
    fn forward(&self, x: &Array) -> Result<Array> {
        let y = x.matmul(&self.weight_t)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        self.dims
    }
}

struct Embedding {
    weight: Array, // [vocab, dim]
}

impl EmbeddingImpl for Embedding {
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

impl QuantImpl for ExampleInt8 {
    fn linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let w = dequantized(&mut t, p)?;
        let dims = (w.dim(1) as u32, w.dim(0) as u32);
        Ok(Box::new(Linear { weight_t: w.t(), bias: t.take_opt("bias"), dims }))
    }
    fn embedding(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Ok(Box::new(Embedding { weight: dequantized(&mut t, p)? }))
    }
}

export_plugin!(ExampleInt8);
