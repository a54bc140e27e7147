//! The MLX floating-point microscaled weight formats, shared by the
//! `wquant-mxfp4`, `wquant-mxfp8` and `wquant-nvfp4` plugins (each a thin
//! cdylib that claims its mode), plus [`ops`]: mode-aware quantize /
//! dequantize / quantized_matmul over mlx-c, also used by `rmlx convert`.
//!
//! Layout (MLX 0.32, as mlx-lm 0.32.2 writes it), per module:
//!
//! | mode  | element | bits | group | `scales` (uint8)        | `biases` |
//! |-------|---------|------|-------|--------------------------|----------|
//! | mxfp4 | E2M1    | 4    | 32    | E8M0 (power of two)      | none     |
//! | mxfp8 | E4M3    | 8    | 32    | E8M0                     | none     |
//! | nvfp4 | E2M1    | 4    | 16    | E4M3                     | none     |
//!
//! `weight` is uint32 `[out, in*bits/32]` (elements packed from the low bits
//! up), `scales` uint8 `[out, in/group]`; MoE expert (switch) layers stack
//! them on a leading experts axis and run through MLX's `gather_qmm` in the
//! mode, as mlx-lm's `QuantizedSwitchLinear`. nvfp4 may carry a float32
//! `global_scale` (mlx-lm writes one, per expert `[E]`, only for switch layers
//! converted with a global scale); mlx-c's `gather_qmm` and `quantized_matmul`
//! take none, so such a module is dequantized with it (at load for experts).
//! `mx.dequantize` of these modes returns bfloat16 (the dtype is inferred from
//! the uint8 scales), so a quantized embedding's lookup is bfloat16, exactly as
//! in mlx.nn.QuantizedEmbedding; `quantized_matmul` keeps the input dtype.
pub mod ops;

use mlx_rs::{Array, Dtype};
use rmlx_plugin_api::{
    author::{add_expert_bias, EmbeddingImpl, LinearImpl, QuantImpl, Result, SwitchLinearImpl, Tensors},
    ErrorKind, PluginError, QuantParams,
};

/// One microscaled format: its mode name and the one (bits, group) it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpFormat {
    pub mode: &'static str,
    pub bits: i32,
    pub group_size: i32,
}

pub const MXFP4: FpFormat = FpFormat { mode: "mxfp4", bits: 4, group_size: 32 };
pub const MXFP8: FpFormat = FpFormat { mode: "mxfp8", bits: 8, group_size: 32 };
pub const NVFP4: FpFormat = FpFormat { mode: "nvfp4", bits: 4, group_size: 16 };
pub const FORMATS: [FpFormat; 3] = [MXFP4, MXFP8, NVFP4];

/// Bits and group sizes each MLX mode allows (those rmlx's plugins read):
/// `(mode, bits, group sizes)`; the first of each list is MLX's default.
pub const MODES: &[(&str, &[i32], &[i32])] = &[
    ("affine", &[4, 2, 3, 5, 6, 8], &[64, 32, 128]),
    ("mxfp4", &[4], &[32]),
    ("mxfp8", &[8], &[32]),
    ("nvfp4", &[4], &[16]),
];

/// Checks (mode, bits, group_size) against [`MODES`]; the error names what is allowed.
pub fn check_mode(mode: &str, bits: i32, group_size: i32) -> std::result::Result<(), String> {
    let Some((_, b, g)) = MODES.iter().find(|(m, _, _)| *m == mode) else {
        let known: Vec<_> = MODES.iter().map(|m| m.0).collect();
        return Err(format!("unknown quantization mode {mode:?} (known: {})", known.join(", ")));
    };
    let sorted = |v: &[i32]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    if !b.contains(&bits) {
        return Err(format!("mode {mode} supports bits {:?}, not {bits}", sorted(b)));
    }
    if !g.contains(&group_size) {
        return Err(format!("mode {mode} supports group sizes {:?}, not {group_size}", sorted(g)));
    }
    Ok(())
}

fn mlx(e: ops::MlxError) -> PluginError {
    PluginError::new(ErrorKind::Mlx, e.0)
}

impl FpFormat {
    pub fn by_mode(mode: &str) -> Option<FpFormat> {
        FORMATS.into_iter().find(|f| f.mode == mode)
    }
}

/// The packed weight with its scales, checked against the format. Expert
/// layers have a leading experts axis E.
struct Packed {
    fmt: FpFormat,
    weight: Array,               // uint32 [(E,) rows, cols*bits/32]
    scales: Array,               // uint8 [(E,) rows, cols/group]
    global_scale: Option<Array>, // float32 scalar, [E] for experts (nvfp4 only)
    rows: i32,
    cols: i32,
}

impl Packed {
    fn take(fmt: FpFormat, t: &mut Tensors, p: &QuantParams) -> Result<Self> {
        Self::take_nd(fmt, t, p, 2)
    }

    /// `ndim` 2 for a layer, 3 for the experts of a switch layer.
    fn take_nd(fmt: FpFormat, t: &mut Tensors, p: &QuantParams, ndim: usize) -> Result<Self> {
        if p.mode.as_str() != fmt.mode || p.bits != fmt.bits || p.group_size != fmt.group_size {
            return Err(PluginError::config(format!(
                "{} needs bits {} and group size {}, got mode {} bits {} group size {}",
                fmt.mode, fmt.bits, fmt.group_size, p.mode, p.bits, p.group_size
            )));
        }
        let weight = t.take("weight")?;
        let scales = t.take("scales")?;
        if let Some(b) = t.take_opt("biases") {
            return Err(PluginError::config(format!(
                "{}biases {:?}: mode {} has no biases (is this an affine checkpoint with a wrong config?)",
                t.prefix,
                b.shape(),
                fmt.mode
            )));
        }
        let global_scale = t.take_opt("global_scale");
        if global_scale.is_some() && fmt.mode != "nvfp4" {
            return Err(PluginError::config(format!("{}global_scale: only nvfp4 has a global scale", t.prefix)));
        }
        let lead = if ndim == 3 { "experts, " } else { "" };
        if weight.dtype() != Dtype::Uint32 || weight.ndim() != ndim {
            return Err(PluginError::config(format!(
                "{}weight: expected packed uint32 [{lead}out, in*{}/32], got {:?} {:?}",
                t.prefix,
                fmt.bits,
                weight.dtype(),
                weight.shape()
            )));
        }
        let rows = weight.dim(-2);
        let cols = weight.dim(-1) * 32 / fmt.bits;
        let groups = cols / fmt.group_size;
        let mut want = weight.shape()[..ndim - 2].to_vec();
        want.extend([rows, groups]);
        if let Some(g) = &global_scale {
            // a scalar per layer; mlx-lm's switch layers hold one per expert
            let ok = g.size() == 1 || (ndim == 3 && g.shape() == [weight.dim(0)]);
            if !ok {
                return Err(PluginError::config(format!(
                    "{}global_scale: expected a scalar{}, got shape {:?}",
                    t.prefix,
                    if ndim == 3 { " or one per expert" } else { "" },
                    g.shape()
                )));
            }
        }
        if scales.dtype() != Dtype::Uint8 || scales.shape() != want.as_slice() {
            return Err(PluginError::config(format!(
                "{}scales: expected uint8 {want:?} for weight {:?} in {}, got {:?} {:?}",
                t.prefix,
                weight.shape(),
                fmt.mode,
                scales.dtype(),
                scales.shape()
            )));
        }
        Ok(Self { fmt, weight, scales, global_scale, rows, cols })
    }

    fn dequant(&self, w: &Array, s: &Array, dtype: Option<Dtype>) -> Result<Array> {
        ops::dequantize(w, s, None, self.fmt.group_size, self.fmt.bits, self.fmt.mode, self.global_scale.as_ref(), dtype)
            .map_err(mlx)
    }

    /// x [..., cols] -> [..., rows]
    fn matmul_t(&self, x: &Array) -> Result<Array> {
        if self.global_scale.is_some() {
            // mlx-c's quantized_matmul takes no global scale: dequantize.
            let w = self.dequant(&self.weight, &self.scales, Some(x.dtype()))?;
            return Ok(x.matmul(w.t())?);
        }
        ops::quantized_matmul(x, &self.weight, &self.scales, None, true, self.fmt.group_size, self.fmt.bits, self.fmt.mode)
            .map_err(mlx)
    }
}

struct FpLinear {
    packed: Packed,
    bias: Option<Array>,
}

impl LinearImpl for FpLinear {
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

struct FpEmbedding {
    packed: Packed,
}

impl EmbeddingImpl for FpEmbedding {
    fn lookup(&self, ids: &Array) -> Result<Array> {
        let p = &self.packed;
        let flat = ids.flatten(None, None)?;
        let w = p.weight.take_axis(&flat, 0)?;
        let s = p.scales.take_axis(&flat, 0)?;
        let out = p.dequant(&w, &s, None)?;
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

/// All experts of one projection, as mlx-lm's QuantizedSwitchLinear.
struct FpSwitch {
    packed: Packed,         // E experts of [rows = out, cols = in]
    dense_t: Option<Array>, // [E, in, out] float32: the experts dequantized with their global scales
    bias: Option<Array>,    // [E, out]
}

impl FpSwitch {
    fn new(packed: Packed, bias: Option<Array>) -> Result<Self> {
        let dense_t = match &packed.global_scale {
            None => None,
            Some(g) => {
                // One scalar per expert: MLX's dequantize takes a scalar global scale.
                let e = packed.weight.dim(0);
                let g = g.reshape(&[-1])?;
                let experts = (0..e)
                    .map(|i| {
                        let i = Array::from_int(i);
                        let gi = if g.size() == 1 { g.reshape(&[])? } else { g.take_axis(&i, 0)? };
                        ops::dequantize(
                            &packed.weight.take_axis(&i, 0)?,
                            &packed.scales.take_axis(&i, 0)?,
                            None,
                            packed.fmt.group_size,
                            packed.fmt.bits,
                            packed.fmt.mode,
                            Some(&gi),
                            Some(Dtype::Float32),
                        )
                        .map_err(mlx)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let dense = mlx_rs::ops::stack(&experts, 0)?.swap_axes(-1, -2)?; // [E, in, out]
                dense.eval()?;
                Some(dense)
            }
        };
        Ok(Self { packed, dense_t, bias })
    }
}

impl SwitchLinearImpl for FpSwitch {
    /// x [..., 1 | k, 1, in], indices uint32 [..., k] -> [..., k, 1, out]
    fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        let p = &self.packed;
        let y = match &self.dense_t {
            Some(w) => mlx_rs::ops::gather_mm(x, w, None, indices, sorted)?.as_dtype(x.dtype())?,
            None => ops::gather_qmm(x, &p.weight, &p.scales, None, indices, true, p.fmt.group_size, p.fmt.bits, p.fmt.mode, sorted)
                .map_err(mlx)?,
        };
        add_expert_bias(y, self.bias.as_ref(), indices)
    }
    fn dims(&self) -> (u32, u32, u32) {
        (self.packed.weight.dim(0) as u32, self.packed.cols as u32, self.packed.rows as u32)
    }
}

/// The WeightQuant implementation for one format.
pub struct FpQuant(pub FpFormat);

impl QuantImpl for FpQuant {
    /// Every tensor is per output row: q/k/v and gate/up stack into one linear.
    fn rows_stack(&self) -> bool {
        true
    }
    fn linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let packed = Packed::take(self.0, &mut t, p)?;
        Ok(Box::new(FpLinear { packed, bias: t.take_opt("bias") }))
    }
    fn embedding(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Ok(Box::new(FpEmbedding { packed: Packed::take(self.0, &mut t, p)? }))
    }
    fn switch_linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn SwitchLinearImpl>> {
        let packed = Packed::take_nd(self.0, &mut t, p, 3)?;
        let bias = t.take_expert_bias(packed.weight.dim(0), packed.rows)?;
        Ok(Box::new(FpSwitch::new(packed, bias)?))
    }
}

/// `PluginImpl::weight_quant` for a plugin that provides exactly `fmt`.
pub fn weight_quant(fmt: FpFormat, plugin: &str, mode: &str) -> Result<Box<dyn QuantImpl>> {
    if mode == fmt.mode {
        Ok(Box::new(FpQuant(fmt)))
    } else {
        Err(PluginError::unsupported(format!("{plugin} has no mode {mode}")))
    }
}

#[cfg(test)]
mod tests;
