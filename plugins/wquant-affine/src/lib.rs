//! `wquant-affine`: MLX affine quantization (mode `affine`), as mlx-lm writes it.
//!
//! Per module: `weight` uint32 [out, in*bits/32] (values packed little-end
//! first), `scales` and `biases` [out, in/group_size]; w = scale * q + bias.
//! Bits 2, 3, 4, 5, 6, 8; group sizes 32, 64, 128. Matches
//! mlx.nn.QuantizedLinear / mlx.nn.QuantizedEmbedding.
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, Tensors},
    export_plugin, Manifest, PluginError, QuantParams,
};

pub const BITS: [i32; 6] = [2, 3, 4, 5, 6, 8];
pub const GROUP_SIZES: [i32; 3] = [32, 64, 128];

pub struct Affine;

impl PluginImpl for Affine {
    fn manifest() -> Manifest {
        Manifest::new("wquant-affine", env!("CARGO_PKG_VERSION"), "MLX affine quantization, 2-8 bits")
            .weight_quants(&["affine"])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        match mode {
            "affine" => Ok(Box::new(Affine)),
            _ => Err(PluginError::unsupported(format!("wquant-affine has no mode {mode}"))),
        }
    }
}

/// The packed weight with its scales and biases, checked against the params.
struct Packed {
    weight: Array, // uint32 [rows, cols*bits/32]
    scales: Array, // [rows, cols/group_size]
    biases: Array, // [rows, cols/group_size]
    group_size: i32,
    bits: i32,
    rows: i32,
    cols: i32,
}

impl Packed {
    fn take(t: &mut Tensors, p: &QuantParams) -> Result<Self> {
        if !BITS.contains(&p.bits) {
            return Err(PluginError::config(format!("affine quantization supports bits {BITS:?}, got {}", p.bits)));
        }
        if !GROUP_SIZES.contains(&p.group_size) {
            return Err(PluginError::config(format!(
                "affine quantization supports group sizes {GROUP_SIZES:?}, got {}",
                p.group_size
            )));
        }
        let weight = t.take("weight")?;
        let scales = t.take("scales")?;
        let biases = t.take("biases")?;
        if weight.dtype() != Dtype::Uint32 || weight.ndim() != 2 {
            return Err(PluginError::config(format!(
                "{}weight: expected packed uint32 [out, in*bits/32], got {:?} {:?}",
                t.prefix,
                weight.dtype(),
                weight.shape()
            )));
        }
        let rows = weight.dim(0);
        let cols = weight.dim(1) * 32 / p.bits;
        let groups = cols / p.group_size;
        if scales.shape() != [rows, groups] || biases.shape() != scales.shape() {
            return Err(PluginError::config(format!(
                "{}scales {:?} / biases {:?} do not fit weight {:?} at {} bits, group size {} (expected [{rows}, {groups}])",
                t.prefix,
                scales.shape(),
                biases.shape(),
                weight.shape(),
                p.bits,
                p.group_size
            )));
        }
        Ok(Self { weight, scales, biases, group_size: p.group_size, bits: p.bits, rows, cols })
    }

    /// x [..., cols] -> [..., rows]
    fn matmul_t(&self, x: &Array) -> Result<Array> {
        Ok(ops::quantized_matmul(
            x,
            &self.weight,
            &self.scales,
            &self.biases,
            true,
            self.group_size,
            self.bits,
        )?)
    }
}

struct AffineLinear {
    packed: Packed,
    bias: Option<Array>, // [out]
}

impl LinearImpl for AffineLinear {
    fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.packed.matmul_t(x)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        (self.packed.cols as u32, self.packed.rows as u32)
    }
}

struct AffineEmbedding {
    packed: Packed, // rows = vocab, cols = dim
}

impl EmbeddingImpl for AffineEmbedding {
    fn lookup(&self, ids: &Array) -> Result<Array> {
        let p = &self.packed;
        let flat = ids.flatten(None, None)?;
        let w = p.weight.take_axis(&flat, 0)?;
        let s = p.scales.take_axis(&flat, 0)?;
        let b = p.biases.take_axis(&flat, 0)?;
        let out = ops::dequantize(&w, &s, &b, p.group_size, p.bits)?;
        let mut shape = ids.shape().to_vec();
        shape.push(-1);
        Ok(out.reshape(&shape)?)
    }
    fn as_linear(&self, x: &Array) -> Result<Array> {
        self.packed.matmul_t(x)
    }
    fn dims(&self) -> (u32, u32) {
        (self.packed.rows as u32, self.packed.cols as u32)
    }
}

impl QuantImpl for Affine {
    fn linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let packed = Packed::take(&mut t, p)?;
        Ok(Box::new(AffineLinear { packed, bias: t.take_opt("bias") }))
    }
    fn embedding(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Ok(Box::new(AffineEmbedding { packed: Packed::take(&mut t, p)? }))
    }
}

export_plugin!(Affine);
