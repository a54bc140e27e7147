//! `wquant-paroquant`: ParoQuant layers (Liang et al., "ParoQuant: Pairwise
//! Rotation Quantization for Efficient Reasoning LLM Inference",
//! arXiv:2511.10645; z-lab/paroquant), in the tensor layout of its MLX backend
//! (`paroquant/inference/backends/mlx/load.py` + `modules.py`,
//! `RotateQuantizedLinear`), mode `paroquant`.
//!
//! Per module:
//! - `weight` uint32 `[out, in·bits/32]`, `scales`, `biases` `[out, in/g]`:
//!   MLX affine quantization (4-bit in the releases), computed with
//!   `quantized_matmul` as in `wquant-affine`.
//! - `channel_scales` `[1, in]`: multiplied into the activations first.
//! - `pairs` int16 `[krot, in]` and `theta` `[krot, in/2]`: `krot` rounds of
//!   Givens rotations applied to the scaled activations. In round `k`, group
//!   `G` (the quantization group size `g` of channels) and pair `t < g/2`,
//!   the channels `i = G·g + pairs[k, G·g + 2t]` and
//!   `j = G·g + pairs[k, G·g + 2t + 1]` (indices local to the group) turn by
//!   `θ = theta[k, G·g/2 + t]`: `x_i ← x_i cos θ + x_j sin θ`,
//!   `x_j ← x_j cos θ − x_i sin θ`. The pairs of one round are disjoint and
//!   cover every channel (the Metal kernel runs them in parallel).
//! - `bias` (optional).
//!
//! Kernel path: ParoQuant's MLX backend is a Metal-only kernel (float32
//! tile, one cast back to the activation dtype). Here each round is one
//! gather and two multiplies over the whole activation,
//! `x ← x·C_k + x[P_k]·S_k`, with the partner permutation `P_k` and
//! `C_k = cos`, `S_k = ±sin` per channel derived once (lazily) from
//! `pairs`/`theta`; computed in float32 and cast once, as the kernel does,
//! then MLX's fused `quantized_matmul`. Runs on every MLX backend.
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, Tensors},
    export_plugin, Manifest, PluginError, QuantParams,
};

pub const MODE: &str = "paroquant";
const BITS: [i32; 6] = [2, 3, 4, 5, 6, 8];

pub struct Paro;

impl PluginImpl for Paro {
    fn manifest() -> Manifest {
        Manifest::new("wquant-paroquant", env!("CARGO_PKG_VERSION"), "ParoQuant: pairwise rotations + channel scales, affine 4-bit")
            .weight_quants(&[MODE])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        match mode {
            MODE => Ok(Box::new(Paro)),
            _ => Err(PluginError::unsupported(format!("wquant-paroquant has no mode {mode}"))),
        }
    }
}

struct Round {
    partner: Array, // int32 [in]
    cos: Array,     // f32 [in]
    sin: Array,     // f32 [in], +sin for the first of a pair, -sin for the second
}

struct ParoLinear {
    channel_scales: Array, // f32 [in]
    rounds: Vec<Round>,
    weight: Array,
    scales: Array,
    biases: Array,
    bias: Option<Array>,
    group: i32,
    bits: i32,
    rows: i32,
    cols: i32,
}

/// Per-round partner permutation and cos/±sin vectors from ParoQuant's `pairs`/`theta`.
fn rounds(pairs: &Array, theta: &Array, group: i32) -> Result<Vec<Round>> {
    let (krot, cols) = (pairs.dim(0), pairs.dim(1));
    let offsets: Vec<i32> = (0..cols).map(|c| c / group * group).collect();
    let global = pairs.as_dtype(Dtype::Int32)?.add(Array::from_slice(&offsets, &[cols]))?.reshape(&[krot, cols / 2, 2])?;
    let first = global.take_axis(Array::from_slice(&[0i32], &[1]), 2)?.reshape(&[krot, cols / 2])?;
    let second = global.take_axis(Array::from_slice(&[1i32], &[1]), 2)?.reshape(&[krot, cols / 2])?;
    let theta = theta.as_dtype(Dtype::Float32)?;
    let (c, s) = (theta.cos()?, theta.sin()?);
    let position = ops::concatenate(&[&first, &second], 1)?;
    let order = ops::argsort_axis(&position, 1)?;
    let partner = ops::concatenate(&[&second, &first], 1)?.take_along_axis(&order, 1)?;
    let cos = ops::concatenate(&[&c, &c], 1)?.take_along_axis(&order, 1)?;
    let sin = ops::concatenate(&[&s, &s.negative()?], 1)?.take_along_axis(&order, 1)?;
    let mut out = Vec::with_capacity(krot as usize);
    for k in 0..krot {
        let row = Array::from_slice(&[k], &[1]);
        let pick = |a: &Array| -> Result<Array> { Ok(a.take_axis(&row, 0)?.reshape(&[cols])?) };
        out.push(Round { partner: pick(&partner)?, cos: pick(&cos)?, sin: pick(&sin)? });
    }
    Ok(out)
}

impl LinearImpl for ParoLinear {
    fn forward(&self, x: &Array) -> Result<Array> {
        let dtype = x.dtype();
        let mut r = x.as_dtype(Dtype::Float32)?.multiply(&self.channel_scales)?;
        for k in &self.rounds {
            r = r.multiply(&k.cos)?.add(r.take_axis(&k.partner, -1)?.multiply(&k.sin)?)?;
        }
        let r = r.as_dtype(dtype)?;
        let y = ops::quantized_matmul(&r, &self.weight, &self.scales, &self.biases, true, self.group, self.bits)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        (self.cols as u32, self.rows as u32)
    }
}

impl QuantImpl for Paro {
    fn linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        if !BITS.contains(&p.bits) || ![32, 64, 128].contains(&p.group_size) {
            return Err(PluginError::config(format!(
                "paroquant: bits {} / group size {} not supported (bits {BITS:?}, group sizes 32, 64, 128)",
                p.bits, p.group_size
            )));
        }
        let weight = t.take("weight")?;
        let scales = t.take("scales")?;
        let biases = t.take("biases")?;
        let theta = t.take("theta")?;
        let pairs = t.take("pairs")?;
        let channel_scales = t.take("channel_scales")?;
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
                "{}scales {:?} / biases {:?} do not fit weight {:?} (expected [{rows}, {groups}])",
                t.prefix,
                scales.shape(),
                biases.shape(),
                weight.shape()
            )));
        }
        if pairs.ndim() != 2 || pairs.dim(1) != cols || !matches!(pairs.dtype(), Dtype::Int16 | Dtype::Int32) {
            return Err(PluginError::config(format!(
                "{}pairs: expected int16 [krot, {cols}], got {:?} {:?}",
                t.prefix,
                pairs.dtype(),
                pairs.shape()
            )));
        }
        let krot = pairs.dim(0);
        if theta.shape() != [krot, cols / 2] {
            return Err(PluginError::config(format!(
                "{}theta: expected [{krot}, {}], got {:?}",
                t.prefix,
                cols / 2,
                theta.shape()
            )));
        }
        if channel_scales.size() != cols as usize {
            return Err(PluginError::config(format!(
                "{}channel_scales: expected {cols} values, got shape {:?}",
                t.prefix,
                channel_scales.shape()
            )));
        }
        Ok(Box::new(ParoLinear {
            channel_scales: channel_scales.reshape(&[cols])?.as_dtype(Dtype::Float32)?,
            rounds: rounds(&pairs, &theta, p.group_size)?,
            weight,
            scales,
            biases,
            bias: t.take_opt("bias"),
            group: p.group_size,
            bits: p.bits,
            rows,
            cols,
        }))
    }
    fn embedding(&self, t: Tensors, _p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Err(PluginError::unsupported(format!(
            "{}: ParoQuant rotates linear layers only (its loader quantizes embeddings as plain affine)",
            t.prefix
        )))
    }
}

export_plugin!(Paro);
