//! `wquant-affine`: MLX affine quantization (mode `affine`), as mlx-lm writes it.
//!
//! Per module: `weight` uint32 [out, in*bits/32] (values packed little-end
//! first), `scales` and `biases` [out, in/group_size]; w = scale * q + bias.
//! Bits 2, 3, 4, 5, 6, 8; group sizes 32, 64, 128. Matches
//! mlx.nn.QuantizedLinear / mlx.nn.QuantizedEmbedding, and mlx-lm's
//! `QuantizedSwitchLinear` for MoE experts (the same tensors with a leading
//! experts axis, through MLX's `gather_qmm`).
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{add_expert_bias, EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, SwitchLinearImpl, Tensors},
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
/// Expert layers have a leading experts axis E on all three.
struct Packed {
    weight: Array, // uint32 [(E,) rows, cols*bits/32]
    scales: Array, // [(E,) rows, cols/group_size]
    biases: Array, // [(E,) rows, cols/group_size]
    group_size: i32,
    bits: i32,
    rows: i32,
    cols: i32,
}

impl Packed {
    fn take(t: &mut Tensors, p: &QuantParams) -> Result<Self> {
        Self::take_nd(t, p, 2)
    }

    /// `ndim` 2 for a layer, 3 for the experts of a switch layer.
    fn take_nd(t: &mut Tensors, p: &QuantParams, ndim: usize) -> Result<Self> {
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
        let lead = if ndim == 3 { "experts, " } else { "" };
        if weight.dtype() != Dtype::Uint32 || weight.ndim() != ndim {
            return Err(PluginError::config(format!(
                "{}weight: expected packed uint32 [{lead}out, in*bits/32], got {:?} {:?}",
                t.prefix,
                weight.dtype(),
                weight.shape()
            )));
        }
        let rows = weight.dim(-2);
        let cols = weight.dim(-1) * 32 / p.bits;
        let groups = cols / p.group_size;
        let mut want = weight.shape()[..ndim - 2].to_vec();
        want.extend([rows, groups]);
        if scales.shape() != want.as_slice() || biases.shape() != scales.shape() {
            return Err(PluginError::config(format!(
                "{}scales {:?} / biases {:?} do not fit weight {:?} at {} bits, group size {} (expected {want:?})",
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

/// All experts of one projection, as mlx-lm's QuantizedSwitchLinear.
struct AffineSwitch {
    packed: Packed,      // E experts of [rows = out, cols = in]
    bias: Option<Array>, // [E, out]
}

impl SwitchLinearImpl for AffineSwitch {
    /// x [..., 1 | k, 1, in], indices uint32 [..., k] -> [..., k, 1, out]
    fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        let p = &self.packed;
        let y = ops::gather_qmm(
            x,
            &p.weight,
            &p.scales,
            &p.biases,
            None,
            indices,
            true,
            p.group_size,
            p.bits,
            sorted,
        )?;
        add_expert_bias(y, self.bias.as_ref(), indices)
    }
    fn dims(&self) -> (u32, u32, u32) {
        (self.packed.weight.dim(0) as u32, self.packed.cols as u32, self.packed.rows as u32)
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
    /// Every tensor is per output row: q/k/v and gate/up stack into one linear.
    fn rows_stack(&self) -> bool {
        true
    }
    fn linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn LinearImpl>> {
        let packed = Packed::take(&mut t, p)?;
        Ok(Box::new(AffineLinear { packed, bias: t.take_opt("bias") }))
    }
    fn embedding(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn EmbeddingImpl>> {
        Ok(Box::new(AffineEmbedding { packed: Packed::take(&mut t, p)? }))
    }
    fn switch_linear(&self, mut t: Tensors, p: &QuantParams) -> Result<Box<dyn SwitchLinearImpl>> {
        let packed = Packed::take_nd(&mut t, p, 3)?;
        let bias = t.take_expert_bias(packed.weight.dim(0), packed.rows)?;
        Ok(Box::new(AffineSwitch { packed, bias }))
    }
}

export_plugin!(Affine);

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RVec;
    use mlx_rs::random;
    use rmlx_plugin_api::{MlxArray, NamedArray};

    fn tensors(items: Vec<(&str, Array)>) -> Tensors {
        let v: RVec<NamedArray> =
            items.into_iter().map(|(n, a)| NamedArray { name: n.into(), array: MlxArray::from_array(a) }).collect();
        Tensors::new("", v)
    }

    /// Per-expert dense reference: x [..., 1|k, 1, in] @ W[idx]^T -> [..., k, 1, out].
    fn reference(x: &Array, w: &Array, idx: &Array, bias: Option<&Array>) -> Array {
        let sel = w.take_axis(idx, 0).unwrap(); // [..., k, out, in]
        let y = x.matmul(sel.swap_axes(-1, -2).unwrap()).unwrap();
        match bias {
            Some(b) => y.add(b.take_axis(idx, 0).unwrap().expand_dims(-2).unwrap()).unwrap(),
            None => y,
        }
    }

    fn close(a: &Array, b: &Array) {
        assert_eq!(a.shape(), b.shape());
        let d = a.subtract(b).unwrap().abs().unwrap().max(None).unwrap().item_cast::<f32>();
        assert!(d < 1e-4, "max |diff| {d}");
    }

    #[test]
    fn switch_equals_per_expert_matmul_of_dequantized_weights() {
        random::seed(11).unwrap();
        let (e, out, inp) = (5, 48, 128);
        let w = random::normal::<f32>(&[e, out, inp], None, None, None).unwrap();
        let bias = random::normal::<f32>(&[e, out], None, None, None).unwrap();
        for (bits, gs) in [(4, 64), (8, 64), (3, 32), (2, 128)] {
            let (wq, s, b) = ops::quantize(&w, gs, bits).unwrap(); // [E, out, in*bits/32], [E, out, in/gs]
            let dq = ops::dequantize(&wq, &s, &b, gs, bits).unwrap(); // [E, out, in]
            let p = QuantParams { mode: "affine".into(), bits, group_size: gs };
            for with_bias in [false, true] {
                let mut items = vec![("weight", wq.clone()), ("scales", s.clone()), ("biases", b.clone())];
                if with_bias {
                    items.push(("bias", bias.clone()));
                }
                let layer = Affine.switch_linear(tensors(items), &p).unwrap();
                assert_eq!(layer.dims(), (5, 128, 48));
                let bb = with_bias.then_some(&bias);
                // tokens [2, 3], top-2: x [2, 3, 1, 1, in], idx [2, 3, 2]
                let x = random::normal::<f32>(&[2, 3, 1, 1, inp], None, None, None).unwrap();
                let idx = Array::from_slice(&[0u32, 4, 1, 1, 3, 2, 2, 0, 4, 3, 1, 2], &[2, 3, 2]);
                close(&layer.forward(&x, &idx, false).unwrap(), &reference(&x, &dq, &idx, bb));
                // sorted rows, one expert each: x [7, 1, in], idx [7]
                let x = random::normal::<f32>(&[7, 1, inp], None, None, None).unwrap();
                let idx = Array::from_slice(&[0u32, 1, 1, 2, 3, 3, 4], &[7]);
                let want = reference(&x.expand_dims(-3).unwrap(), &dq, &idx.expand_dims(-1).unwrap(), bb);
                close(&layer.forward(&x, &idx, true).unwrap(), &want.squeeze_axes(&[-3]).unwrap());
            }
        }
        // A 2-D (non-expert) weight and mismatched scales are refused with the shapes.
        let (wq, s, b) = ops::quantize(&w, 64, 4).unwrap();
        let p = QuantParams { mode: "affine".into(), bits: 4, group_size: 64 };
        let flat = |a: &Array| a.take_axis(Array::from_int(0), 0).unwrap();
        let err = Affine.switch_linear(tensors(vec![("weight", flat(&wq)), ("scales", flat(&s)), ("biases", flat(&b))]), &p);
        assert!(err.err().unwrap().message.contains("[experts, out, in*bits/32]"));
        let err = Affine.switch_linear(tensors(vec![("weight", wq), ("scales", flat(&s)), ("biases", b)]), &p);
        assert!(err.err().unwrap().message.contains("do not fit"));
    }
}
