//! Planning and producing the output tensors of a GGUF conversion: each
//! GGUF tensor becomes an MLX affine triple (lossless types, see
//! [`crate::convert::quant`]), a raw copy (F32/F16/BF16/integers), or a
//! float16 tensor dequantized by [`super::dequant`]; the data is produced
//! lazily, one tensor at a time, while safetensors serializes.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::File;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use safetensors::tensor::{Dtype, View};

use super::{dequant, gemma, GgmlType, GgufFile, GgufTensorInfo};
use crate::convert::llama;
use crate::convert::quant::{self, QuantKind};

/// What one output safetensors entry is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// GGUF data copied (F32/F16/BF16/I*), possibly row-permuted.
    Raw,
    Weight(QuantKind),
    Scales(QuantKind),
    Biases(QuantKind),
    /// A type without an exact MLX layout, dequantized to float16.
    DequantF16(GgmlType),
    /// A Gemma norm weight copied with llama.cpp's `+ 1` taken off.
    RawMinusOne,
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub(crate) struct OutTensor {
    pub(crate) name: String,
    /// Index into `GgufFile::tensors`.
    pub(crate) src: usize,
    pub(crate) part: Part,
    /// Undo llama.cpp's rotary permutation with this many heads.
    pub(crate) unpermute_heads: Option<usize>,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) nbytes: usize,
}

/// Shared state for the lazily produced tensor views.
pub(crate) struct Source<'a> {
    pub(crate) gguf: &'a GgufFile,
    pub(crate) file: RefCell<File>,
    pub(crate) error: RefCell<Option<anyhow::Error>>,
    pub(crate) pb: ProgressBar,
}

impl Source<'_> {
    pub(crate) fn produce(&self, t: &OutTensor) -> Result<Vec<u8>> {
        let info = &self.gguf.tensors[t.src];
        let mut raw = self
            .gguf
            .read_tensor_bytes(&mut self.file.borrow_mut(), info)?;
        if let Some(n_head) = t.unpermute_heads {
            let rows = *info.dims.last().unwrap() as usize;
            if !raw.len().is_multiple_of(rows) {
                bail!(
                    "tensor '{}': {} bytes do not split into {} rows",
                    info.name,
                    raw.len(),
                    rows
                );
            }
            let src_row = quant::unpermute_src_row(rows, n_head)
                .with_context(|| format!("tensor '{}'", info.name))?;
            raw = quant::permute_rows(&raw, raw.len() / rows, src_row);
        }
        let out = match t.part {
            Part::Raw => raw,
            Part::RawMinusOne => gemma::sub_one(t.dtype, &raw)?,
            Part::Weight(k) => quant::pack_weights(k, &raw)?,
            Part::Scales(k) => quant::scales(k, &raw)?,
            Part::Biases(k) => quant::biases(k, &raw)?,
            Part::DequantF16(ty) => dequant::dequantize(ty, &raw)?
                .into_iter()
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        if out.len() != t.nbytes {
            bail!(
                "internal error: tensor '{}' produced {} bytes, expected {}",
                t.name,
                out.len(),
                t.nbytes
            );
        }
        Ok(out)
    }
}

pub(crate) struct LazyView<'a> {
    pub(crate) src: &'a Source<'a>,
    pub(crate) t: &'a OutTensor,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.src.pb.set_message(self.t.name.clone());
        let data = match self.src.produce(self.t) {
            Ok(d) => d,
            Err(e) => {
                // View::data cannot fail: remember the first error, write
                // zeros of the right length, and abort after serialization.
                let mut slot = self.src.error.borrow_mut();
                if slot.is_none() {
                    *slot = Some(e.context(format!("producing tensor '{}'", self.t.name)));
                }
                vec![0u8; self.t.nbytes]
            }
        };
        self.src.pb.inc(self.t.nbytes as u64);
        Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.t.nbytes
    }
}

fn raw_dtype(t: GgmlType) -> Option<Dtype> {
    Some(match t {
        GgmlType::F32 => Dtype::F32,
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::BF16,
        GgmlType::I8 => Dtype::I8,
        GgmlType::I16 => Dtype::I16,
        GgmlType::I32 => Dtype::I32,
        GgmlType::I64 => Dtype::I64,
        GgmlType::F64 => Dtype::F64,
        _ => return None,
    })
}

/// What rmlx converts, for error messages.
pub(crate) const SUPPORTED_TYPES: &str = "F32, F16, BF16 (copied), Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (kept exactly as MLX affine \
     4/5/8-bit), Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (dequantized)";

/// Plan the output tensors for one GGUF tensor.
///
/// Lossless types become an MLX affine triple when the tensor is a weight
/// matrix; raw types are copied; every other dequantizable type (and a
/// lossless type outside a weight matrix) becomes float16.
pub(crate) fn plan_tensor(
    idx: usize,
    info: &GgufTensorInfo,
    out_name: &llama::MappedName,
    unpermute_heads: Option<usize>,
) -> Result<Vec<OutTensor>> {
    let shape = info.shape();
    let n_el = info.n_elements() as usize;
    let ty = info.ggml_type;
    let exact = QuantKind::from_ggml(ty).filter(|_| {
        shape.len() >= 2 && out_name.suffix == "weight" && shape.last().unwrap().is_multiple_of(quant::GROUP_SIZE)
    });
    let one = |part: Part, dtype: Dtype| OutTensor {
        name: format!("{}.{}", out_name.module, out_name.suffix),
        src: idx,
        part,
        unpermute_heads,
        dtype,
        nbytes: n_el * dtype.bitsize() / 8,
        shape: shape.clone(),
    };
    if let Some(k) = exact {
        let last = *shape.last().unwrap();
        let mut wshape = shape.clone();
        *wshape.last_mut().unwrap() = last * k.bits() as usize / 32;
        let mut sshape = shape.clone();
        *sshape.last_mut().unwrap() = last / quant::GROUP_SIZE;
        let n_groups = n_el / quant::GROUP_SIZE;
        let base = &out_name.module;
        let part = |suffix: &str, part: Part, dtype: Dtype, shape: Vec<usize>, nbytes: usize| OutTensor {
            name: format!("{base}.{suffix}"),
            src: idx,
            part,
            unpermute_heads,
            dtype,
            nbytes,
            shape,
        };
        Ok(vec![
            part("weight", Part::Weight(k), Dtype::U32, wshape, n_el * k.bits() as usize / 8),
            part("scales", Part::Scales(k), Dtype::F16, sshape.clone(), n_groups * 2),
            part("biases", Part::Biases(k), Dtype::F16, sshape, n_groups * 2),
        ])
    } else if let Some(dtype) = raw_dtype(ty) {
        Ok(vec![one(Part::Raw, dtype)])
    } else if dequant::can_dequantize(ty) {
        Ok(vec![one(Part::DequantF16(ty), Dtype::F16)])
    } else {
        bail!(
            "tensor '{}' has GGML type {}, which rmlx cannot convert (it converts {}): re-quantize the GGUF with \
             llama.cpp's `llama-quantize --allow-requantize` to one of those (e.g. Q8_0 or Q4_K_M), or convert the \
             original safetensors model instead",
            info.name,
            ty,
            SUPPORTED_TYPES
        )
    }
}
