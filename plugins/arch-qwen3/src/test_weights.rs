//! Test support (cfg(test)): a WeightSource over tensors held in memory,
//! building plain float linears (x @ W^T + b) and embedding tables as the
//! dense WeightQuant plugin does, each tensor handed out once so a test can
//! check that a load used every one.
use abi_stable::std_types::{RStr, RString, RVec, Tuple2};
use mlx_rs::Array;
use rmlx_plugin_api::{
    arch::WeightSource,
    author::{embedding_box, guard, linear_box, EmbeddingImpl, LinearImpl, Result},
    EmbeddingBox, LinearBox, MlxArray, PResult, PluginError, SwitchLinearBox,
};
use std::collections::HashMap;

/// x @ W^T + b, W [out, in].
struct Dense {
    w_t: Array,
    b: Option<Array>,
    dims: (u32, u32),
}

impl LinearImpl for Dense {
    fn forward(&self, x: &Array) -> Result<Array> {
        let y = x.matmul(&self.w_t)?;
        Ok(match &self.b {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        self.dims
    }
}

/// A plain float table [V, D].
struct Table(Array);

impl EmbeddingImpl for Table {
    fn lookup(&self, ids: &Array) -> Result<Array> {
        Ok(self.0.take_axis(ids, 0)?)
    }
    fn as_linear(&self, x: &Array) -> Result<Array> {
        Ok(x.matmul(&self.0.transpose()?)?)
    }
    fn dims(&self) -> (u32, u32) {
        (self.0.dim(0) as u32, self.0.dim(1) as u32)
    }
}

/// The fixture's tensors, handed out once each.
pub struct Mem(pub HashMap<String, Array>);

impl Mem {
    fn take(&mut self, name: &str) -> Result<Array> {
        self.0.remove(name).ok_or_else(|| PluginError::config(format!("no tensor {name}")))
    }
}

impl WeightSource for Mem {
    fn linear(&mut self, prefix: RStr<'_>) -> PResult<LinearBox> {
        guard(|| {
            let w = self.take(&format!("{prefix}.weight"))?;
            let b = self.take(&format!("{prefix}.bias")).ok();
            let dims = (w.dim(1) as u32, w.dim(0) as u32);
            Ok(linear_box(Box::new(Dense { w_t: w.transpose()?, b, dims })))
        })
    }
    fn embedding(&mut self, prefix: RStr<'_>) -> PResult<EmbeddingBox> {
        guard(|| Ok(embedding_box(Box::new(Table(self.take(&format!("{prefix}.weight"))?)))))
    }
    fn tensor(&mut self, name: RStr<'_>) -> PResult<MlxArray> {
        guard(|| self.take(name.as_str()).map(MlxArray::from_array))
    }
    fn contains(&self, name: RStr<'_>) -> bool {
        self.0.contains_key(name.as_str())
    }
    fn switch_linear(&mut self, _: RStr<'_>) -> PResult<SwitchLinearBox> {
        guard(|| Err(PluginError::unsupported("no experts here")))
    }
    fn linear_fused(&mut self, _: RVec<RString>) -> PResult<Tuple2<LinearBox, RVec<u32>>> {
        guard(|| Err(PluginError::unsupported("not fused")))
    }
}
