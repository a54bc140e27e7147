//! `wquant-dense`: unquantized linear and embedding layers (bf16, f16, f32),
//! mode `none`. Matches mlx.nn.Linear / mlx.nn.Embedding, and mlx-lm's
//! `SwitchLinear` for the experts of an MoE layer.
use mlx_rs::{ops, Array};
use rmlx_plugin_api::{
    author::{add_expert_bias, EmbeddingImpl, LinearImpl, PluginImpl, QuantImpl, Result, SwitchLinearImpl, Tensors},
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

/// All experts of one projection: weight [E, out, in], bias [E, out].
struct DenseSwitch {
    weight_t: Array,      // [E, in, out]
    bias: Option<Array>, // [E, out]
    dims: (u32, u32, u32),
}

impl SwitchLinearImpl for DenseSwitch {
    /// x [..., 1 | k, 1, in], indices uint32 [..., k] -> [..., k, 1, out]
    fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        // mlx-lm's SwitchLinear: gather_mm(x, W^T, rhs_indices=indices).
        let y = ops::gather_mm(x, &self.weight_t, None, indices, sorted)?;
        add_expert_bias(y, self.bias.as_ref(), indices)
    }
    fn dims(&self) -> (u32, u32, u32) {
        self.dims
    }
}

fn check_2d(t: &Tensors, w: &Array) -> Result<()> {
    if w.ndim() != 2 {
        return Err(PluginError::config(format!("{}weight must be 2-D, got shape {:?}", t.prefix, w.shape())));
    }
    Ok(())
}

impl QuantImpl for Dense {
    /// Every tensor is per output row: q/k/v and gate/up stack into one linear.
    fn rows_stack(&self) -> bool {
        true
    }
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
    fn switch_linear(&self, mut t: Tensors, _p: &QuantParams) -> Result<Box<dyn SwitchLinearImpl>> {
        let weight = t.take("weight")?; // [E, out, in]
        if weight.ndim() != 3 {
            return Err(PluginError::config(format!(
                "{}weight of an expert layer must be 3-D [experts, out, in], got shape {:?}",
                t.prefix,
                weight.shape()
            )));
        }
        let (e, out, inp) = (weight.dim(0), weight.dim(1), weight.dim(2));
        let bias = t.take_expert_bias(e, out)?;
        let weight_t = weight.swap_axes(-1, -2)?; // [E, in, out]
        Ok(Box::new(DenseSwitch { weight_t, bias, dims: (e as u32, inp as u32, out as u32) }))
    }
}

export_plugin!(Dense);

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
        assert!(d < 1e-5, "max |diff| {d}");
    }

    #[test]
    fn switch_equals_per_expert_matmul() {
        random::seed(7).unwrap();
        let (e, out, inp) = (6, 24, 32);
        let w = random::normal::<f32>(&[e, out, inp], None, None, None).unwrap();
        let bias = random::normal::<f32>(&[e, out], None, None, None).unwrap();
        let p = QuantParams { mode: "none".into(), bits: 0, group_size: 0 };
        for with_bias in [false, true] {
            let mut items = vec![("weight", w.clone())];
            if with_bias {
                items.push(("bias", bias.clone()));
            }
            let layer = Dense.switch_linear(tensors(items), &p).unwrap();
            assert_eq!(layer.dims(), (6, 32, 24));
            let b = with_bias.then_some(&bias);
            // tokens [2, 3] with top-2 experts: x [2, 3, 1, 1, in], idx [2, 3, 2]
            let x = random::normal::<f32>(&[2, 3, 1, 1, inp], None, None, None).unwrap();
            let idx = Array::from_slice(&[0u32, 5, 1, 1, 4, 2, 3, 0, 5, 4, 2, 3], &[2, 3, 2]);
            close(&layer.forward(&x, &idx, false).unwrap(), &reference(&x, &w, &idx, b));
            // sorted rows, one expert each: x [8, 1, in], idx [8]
            let x = random::normal::<f32>(&[8, 1, inp], None, None, None).unwrap();
            let idx = Array::from_slice(&[0u32, 0, 1, 2, 2, 2, 4, 5], &[8]);
            close(&layer.forward(&x, &idx, true).unwrap(), &reference(&x.expand_dims(-3).unwrap(), &w, &idx.expand_dims(-1).unwrap(), b).squeeze_axes(&[-3]).unwrap());
        }
        let err = Dense.switch_linear(tensors(vec![("weight", w.take_axis(Array::from_int(0), 0).unwrap())]), &p);
        assert!(err.err().unwrap().message.contains("3-D"));
    }
}
