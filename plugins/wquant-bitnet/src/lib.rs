//! `wquant-bitnet`: the ternary weights of BitNet b1.58 checkpoints
//! (`BitNetForCausalLM`, Hugging Face `quantization_config.quant_method =
//! "bitnet"`), computed as mlx-lm 0.32's `BitLinear` does.
//!
//! Per module (Hugging Face / mlx-lm layout):
//! - `weight`: uint8 `[out/4, in]`; each byte holds four 2-bit codes
//!   `c ∈ {0, 1, 2}` for the weights `c - 1 ∈ {-1, 0, +1}`. Bits `2j..2j+1` of
//!   row `r` belong to output row `r + j·out/4` (the rows are packed in four
//!   blocks, not interleaved: transformers' `pack_weights`/`unpack_weights`).
//! - `weight_scale`: one value `[1]` (bfloat16 in the released checkpoints).
//! - `bias` (optional) `[out]`.
//!
//! `y = (x · Wᵀ) / weight_scale` for `linear_class = "bitlinear"` (mode
//! `bitnet`, what mlx-lm does unless the class is `autobitlinear`) and
//! `y = (x · Wᵀ) · weight_scale` for `linear_class = "autobitlinear"` (mode
//! `bitnet-autobitlinear`); then `+ bias`. Like mlx-lm (and unlike
//! transformers' training-time layer), activations are not quantized to int8.
//!
//! Kernel path: mlx-lm's BitLinear is a Metal-only custom kernel (float
//! accumulation of `x · (c - 1)`, one multiply by the scale, one rounding to
//! the activation dtype). Here the codes are repacked once, lazily, into MLX's
//! affine 2-bit layout (uint32, 16 codes a word, low bits first) with
//! scale 1 and bias -1 per group, so `w = 1·c - 1` exactly, and the product is
//! MLX's fused `quantized_matmul` on every backend (CPU, Metal, CUDA), taken in
//! float32 and then scaled and rounded once, as the Metal kernel does.
//! Memory: 2 bits a weight plus 0.5 for the float32 unit scales/biases at
//! group size 128.
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, Tensors},
    export_plugin, Manifest, PluginError, QuantParams,
};

/// Divide by `weight_scale` (`bitlinear`, mlx-lm's `invert_weight_scales`).
pub const MODE_BITLINEAR: &str = "bitnet";
/// Multiply by `weight_scale` (`autobitlinear`, e.g. microsoft/bitnet-b1.58-2B-4T).
pub const MODE_AUTOBITLINEAR: &str = "bitnet-autobitlinear";

pub struct BitNet {
    invert: bool,
}

impl PluginImpl for BitNet {
    fn manifest() -> Manifest {
        Manifest::new("wquant-bitnet", env!("CARGO_PKG_VERSION"), "BitNet b1.58 ternary weights (2-bit packed, per-tensor scale)")
            .weight_quants(&[MODE_BITLINEAR, MODE_AUTOBITLINEAR])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        match mode {
            MODE_BITLINEAR => Ok(Box::new(BitNet { invert: true })),
            MODE_AUTOBITLINEAR => Ok(Box::new(BitNet { invert: false })),
            _ => Err(PluginError::unsupported(format!("wquant-bitnet has no mode {mode}"))),
        }
    }
}

/// Affine group size used for the repacked codes: the largest MLX allows that divides `cols`.
fn group_for(cols: i32) -> Option<i32> {
    [128, 64, 32].into_iter().find(|g| cols % g == 0)
}

/// uint8 `[rows/4, cols]` BitNet codes -> uint32 `[rows, cols/16]` MLX affine 2-bit codes.
pub fn repack(packed: &Array) -> Result<Array> {
    let (p, cols) = (packed.dim(0), packed.dim(1));
    let rows = 4 * p;
    let mut blocks = Vec::with_capacity(4);
    for j in 0..4u32 {
        // (byte >> 2j) & 3, in integer arithmetic
        let div = Array::from_slice(&[1u8 << (2 * j)], &[1]);
        let four = Array::from_slice(&[4u8], &[1]);
        blocks.push(packed.floor_divide(&div)?.remainder(&four)?);
    }
    let codes = ops::concatenate(&blocks, 0)?.as_dtype(Dtype::Uint32)?.reshape(&[rows, cols / 16, 16])?;
    let place: Vec<u32> = (0..16).map(|k| 1u32 << (2 * k)).collect();
    let place = Array::from_slice(&place, &[16]);
    Ok(codes.multiply(&place)?.sum_axis(-1, false)?.as_dtype(Dtype::Uint32)?)
}

struct Ternary {
    codes: Array,  // uint32 [rows, cols/16], MLX affine 2-bit
    ones: Array,   // f32 [rows, cols/group]
    minus: Array,  // f32 [rows, cols/group]
    scale: Array,  // f32 [1]: weight_scale or its reciprocal
    bias: Option<Array>,
    group: i32,
    rows: i32,
    cols: i32,
}

impl LinearImpl for Ternary {
    fn forward(&self, x: &Array) -> Result<Array> {
        let dtype = x.dtype();
        let xf = x.as_dtype(Dtype::Float32)?;
        let y = ops::quantized_matmul(&xf, &self.codes, &self.ones, &self.minus, true, self.group, 2)?;
        let y = y.multiply(&self.scale)?.as_dtype(dtype)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        (self.cols as u32, self.rows as u32)
    }
}

impl QuantImpl for BitNet {
    fn linear(&self, mut t: Tensors, _p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let weight = t.take("weight")?;
        let weight_scale = t.take("weight_scale")?;
        if weight.dtype() != Dtype::Uint8 || weight.ndim() != 2 {
            return Err(PluginError::config(format!(
                "{}weight: expected BitNet packed uint8 [out/4, in], got {:?} {:?}",
                t.prefix,
                weight.dtype(),
                weight.shape()
            )));
        }
        if weight_scale.size() != 1 {
            return Err(PluginError::config(format!(
                "{}weight_scale: expected one value, got shape {:?}",
                t.prefix,
                weight_scale.shape()
            )));
        }
        let (rows, cols) = (4 * weight.dim(0), weight.dim(1));
        let group = group_for(cols).ok_or_else(|| {
            PluginError::config(format!("{}weight: input dimension {cols} is not a multiple of 32", t.prefix))
        })?;
        let bias = t.take_opt("bias");
        if let Some(b) = &bias {
            if b.shape() != [rows] {
                return Err(PluginError::config(format!("{}bias: expected [{rows}], got {:?}", t.prefix, b.shape())));
            }
        }
        let scale = weight_scale.reshape(&[1])?.as_dtype(Dtype::Float32)?;
        let scale = if self.invert { scale.reciprocal()? } else { scale };
        let groups = cols / group;
        Ok(Box::new(Ternary {
            codes: repack(&weight)?,
            ones: ops::ones::<f32>(&[rows, groups])?,
            minus: ops::full::<f32>(&[rows, groups], Array::from_f32(-1.0))?,
            scale,
            bias,
            group,
            rows,
            cols,
        }))
    }
    fn embedding(&self, t: Tensors, _p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Err(PluginError::unsupported(format!(
            "{}: BitNet checkpoints keep embeddings dense; wquant-bitnet builds only linear layers",
            t.prefix
        )))
    }
}

export_plugin!(BitNet);
