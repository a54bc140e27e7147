//! Producing the output tensors while the shards are written: a module is
//! dequantized, converted and kept until its parts are written.
use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;
use mlx_rs::{Array, Dtype as MDtype};
use rmlx_wquant_fp::ops;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use super::plan::{Derive, Make, ModulePlan, Out, SrcTensor};
use super::recipe::Format;

fn mlx_dtype(d: Dtype) -> Result<MDtype> {
    Ok(match d {
        Dtype::F32 => MDtype::Float32,
        Dtype::F16 => MDtype::Float16,
        Dtype::BF16 => MDtype::Bfloat16,
        Dtype::U32 => MDtype::Uint32,
        Dtype::U8 => MDtype::Uint8,
        Dtype::I8 => MDtype::Int8,
        Dtype::I32 => MDtype::Int32,
        Dtype::I64 => MDtype::Int64,
        Dtype::U16 => MDtype::Uint16,
        Dtype::I16 => MDtype::Int16,
        Dtype::F64 => MDtype::Float64,
        Dtype::BOOL => MDtype::Bool,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// The raw bytes of an evaluated, row-contiguous array.
fn array_bytes(a: &Array) -> Result<Vec<u8>> {
    a.eval()?;
    fn raw<T: mlx_rs::ArrayElement>(a: &Array) -> Result<Vec<u8>> {
        let s: &[T] = a.try_as_slice().map_err(|e| anyhow!("reading array data: {e:?}"))?;
        // SAFETY: plain-old-data element types, reinterpreted as bytes.
        Ok(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }.to_vec())
    }
    match a.dtype() {
        MDtype::Float32 => raw::<f32>(a),
        MDtype::Float16 => raw::<half::f16>(a),
        MDtype::Bfloat16 => raw::<half::bf16>(a),
        MDtype::Uint32 => raw::<u32>(a),
        MDtype::Uint8 => raw::<u8>(a),
        MDtype::Int8 => raw::<i8>(a),
        MDtype::Int32 => raw::<i32>(a),
        MDtype::Int64 => raw::<i64>(a),
        MDtype::Uint16 => raw::<u16>(a),
        MDtype::Int16 => raw::<i16>(a),
        MDtype::Bool => raw::<bool>(a),
        d => bail!("cannot write an array of dtype {d:?}"),
    }
}

pub(super) struct Producer<'a> {
    pub(super) arrays: &'a [HashMap<String, Array>],
    pub(super) src: &'a BTreeMap<String, SrcTensor>,
    pub(super) modules: &'a BTreeMap<String, ModulePlan>,
    pub(super) pending: RefCell<HashMap<String, Array>>,
    pub(super) error: RefCell<Option<anyhow::Error>>,
    pub(super) pb: ProgressBar,
}

impl Producer<'_> {
    fn source(&self, name: &str) -> Result<Array> {
        let t = self.src.get(name).ok_or_else(|| anyhow!("missing source tensor {name}"))?;
        let file = |n: &str| self.arrays[t.file].get(n).cloned().ok_or_else(|| anyhow!("MLX did not load tensor {n}"));
        Ok(match &t.derive {
            None => file(name)?,
            Some(Derive::Stack(parts)) => {
                // each part was in the same file set; look it up across files
                let parts: Vec<Array> = parts.iter().map(|p| self.file_tensor(p)).collect::<Result<_>>()?;
                mlx_rs::ops::stack(&parts, 0)? // E x [out, in] -> [E, out, in]
            }
            Some(Derive::MoveAxis(src)) => file(src)?.swap_axes(1, 2)?, // [C, 1, K] -> [C, K, 1]
            Some(Derive::PlusOne(src)) => {
                let a = file(src)?;
                a.add(Array::from_f32(1.0).as_dtype(a.dtype())?)?
            }
        })
    }

    /// A tensor as stored in any of the weight files.
    fn file_tensor(&self, name: &str) -> Result<Array> {
        self.arrays.iter().find_map(|m| m.get(name).cloned()).ok_or_else(|| anyhow!("MLX did not load tensor {name}"))
    }

    /// The module's weight as a dense array.
    fn dense_weight(&self, module: &str, plan: &ModulePlan) -> Result<Array> {
        let w = self.source(&format!("{module}.weight"))?;
        match &plan.from {
            Format::Dense(_) => Ok(w),
            Format::Quant { mode, bits, group_size } => {
                let scales = self.source(&format!("{module}.scales"))?;
                let biases = if mode == "affine" { Some(self.source(&format!("{module}.biases"))?) } else { None };
                let gs = if mode == "nvfp4" { self.src.contains_key(&format!("{module}.global_scale")) } else { false };
                let gs = if gs { Some(self.source(&format!("{module}.global_scale"))?) } else { None };
                Ok(ops::dequantize(&w, &scales, biases.as_ref(), *group_size, *bits, mode, gs.as_ref(), None)
                    .map_err(|e| anyhow!("dequantizing {module}: {e}"))?)
            }
        }
    }

    /// Computes every output part of `module` and keeps them until written.
    fn convert_module(&self, module: &str) -> Result<()> {
        let plan = self.modules.get(module).ok_or_else(|| anyhow!("internal: no plan for {module}"))?;
        let w = self.dense_weight(module, plan)?;
        let mut out = HashMap::new();
        match &plan.to {
            Format::Dense(d) => {
                let w = match d {
                    Some(d) => w.as_dtype(mlx_dtype(*d)?)?,
                    None => w,
                };
                out.insert("weight", w);
            }
            Format::Quant { mode, bits, group_size } => {
                let mut parts = ops::quantize(&w, *group_size, *bits, mode)
                    .map_err(|e| anyhow!("quantizing {module}: {e}"))?
                    .into_iter();
                out.insert("weight", parts.next().ok_or_else(|| anyhow!("quantize returned nothing"))?);
                out.insert("scales", parts.next().ok_or_else(|| anyhow!("quantize returned no scales"))?);
                if let Some(b) = parts.next() {
                    out.insert("biases", b);
                }
            }
        }
        let mut pending = self.pending.borrow_mut();
        for (k, v) in out {
            pending.insert(format!("{module}.{k}"), v);
        }
        Ok(())
    }

    fn produce(&self, t: &Out) -> Result<Vec<u8>> {
        let a = match &t.make {
            Make::Copy { src } => {
                let a = self.source(src)?;
                let want = mlx_dtype(t.dtype)?;
                if a.dtype() != want {
                    a.as_dtype(want)?
                } else {
                    a
                }
            }
            Make::Module { module, part } => {
                let key = format!("{module}.{part}");
                if !self.pending.borrow().contains_key(&key) {
                    self.convert_module(module)?;
                }
                self.pending.borrow_mut().remove(&key).ok_or_else(|| anyhow!("internal: {key} was not produced"))?
            }
        };
        let got_shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
        if got_shape != t.shape || a.dtype() != mlx_dtype(t.dtype)? {
            bail!(
                "internal error: tensor '{}' came out {:?} {:?}, planned {:?} {:?}",
                t.name,
                a.dtype(),
                got_shape,
                t.dtype,
                t.shape
            );
        }
        array_bytes(&a)
    }
}

pub(super) struct LazyView<'a> {
    pub(super) p: &'a Producer<'a>,
    pub(super) t: &'a Out,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.p.pb.set_message(self.t.name.clone());
        let data = match self.p.produce(self.t) {
            Ok(d) if d.len() == self.t.nbytes => d,
            r => {
                let e = r.err().unwrap_or_else(|| anyhow!("wrong byte count"));
                let mut slot = self.p.error.borrow_mut();
                if slot.is_none() {
                    *slot = Some(e.context(format!("producing tensor '{}'", self.t.name)));
                }
                vec![0u8; self.t.nbytes]
            }
        };
        self.p.pb.inc(self.t.nbytes as u64);
        Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.t.nbytes
    }
}
