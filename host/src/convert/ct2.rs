//! CTranslate2 model directories (`model.bin`, `config.json`, a vocabulary)
//! -> the MLX layout that mlx-whisper loads (`rmlx convert --from-ct2`).
//!
//! ```ignore
//! let report = convert::ct2::convert_ct2(src_dir, dst_dir, &convert::ct2::Ct2Options { force: false })?;
//! println!("{report}");
//! ```
//!
//! `model.bin` (written by ctranslate2's `ModelSpec._serialize`, read by
//! `models::Model::load`), all integers little-endian:
//!
//! ```text
//! u32 binary_version                      (1..=6)
//! if version >= 2: str spec_name, u32 spec_revision
//! u32 n_variables, then each:
//!   str name, u8 rank, u32 dims[rank],
//!   version >= 4: u8 dtype_id (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), u32 n_bytes
//!   version <  4: u8 item_size (4 f32, 2 i16, 1 i8), u32 n_elements
//!   data
//! if version >= 3: u32 n_aliases, then each: str alias, str target
//! str = u16 length (including a final NUL), the bytes, the NUL
//! ```
//!
//! Quantized weights carry `<name>_scale`: int8 per output row
//! (`q = round(w * 127 / amax(row))`, scale `127 / amax`), int16 one scale
//! for the tensor (absent in old files: 1000). They are dequantized
//! (`w = q / scale`) to the model's float type (that of its biases).
//! An alias also aliases the target's `_scale`.
//!
//! Only Whisper (`WhisperSpec`) is converted ([`whisper`]); the reader itself is general.
pub mod tokenizer;
pub mod whisper;
pub mod whisper_map;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};

pub use whisper::{convert_ct2, Ct2Options};

/// Newest `model.bin` version this reader knows (ctranslate2 4.x writes 6).
pub const MAX_BINARY_VERSION: u32 = 6;

/// A variable's element type, as ctranslate2 numbers them (`DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Dtype {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Dtype {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::Bf16,
            _ => return None,
        })
    }
    /// ctranslate2's type id (the inverse of the reader's mapping).
    pub fn id(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 => 3,
            Self::F16 => 4,
            Self::Bf16 => 5,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::Bf16)
    }
}

impl fmt::Display for Ct2Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "float32",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        })
    }
}

/// One stored variable; `data` is a range of [`Ct2Model::bytes`].
#[derive(Debug, Clone)]
pub struct Ct2Var {
    pub shape: Vec<usize>,
    pub dtype: Ct2Dtype,
    pub offset: usize,
    pub len: usize,
}

impl Ct2Var {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed `model.bin` (the whole file is held in memory).
pub struct Ct2Model {
    pub path: PathBuf,
    pub binary_version: u32,
    /// e.g. "WhisperSpec" (empty for version 1 files).
    pub spec: String,
    pub revision: u32,
    /// Stored variables, by name.
    pub vars: BTreeMap<String, Ct2Var>,
    /// alias -> stored variable name.
    pub aliases: BTreeMap<String, String>,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Ct2Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ct2Model")
            .field("path", &self.path)
            .field("binary_version", &self.binary_version)
            .field("spec", &self.spec)
            .field("revision", &self.revision)
            .field("variables", &self.vars.len())
            .field("aliases", &self.aliases)
            .finish()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            anyhow!("model.bin is truncated: {what} needs {n} bytes at offset {} of {}", self.pos, self.b.len())
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u16(what)? as usize;
        let s = self.take(n, what)?;
        // C++ reads up to the first NUL (the writer always ends with one).
        let s = s.split(|&c| c == 0).next().unwrap_or_default();
        String::from_utf8(s.to_vec()).map_err(|_| anyhow!("{what} at offset {} is not UTF-8", self.pos))
    }
}

impl Ct2Model {
    /// Read `dir/model.bin` (or a `model.bin` path).
    pub fn open(path: &Path) -> Result<Self> {
        let path = if path.is_dir() { path.join("model.bin") } else { path.to_path_buf() };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(bytes, path)
    }

    /// Parse the bytes of a `model.bin`.
    pub fn parse(bytes: Vec<u8>, path: PathBuf) -> Result<Self> {
        let mut r = Reader { b: &bytes, pos: 0 };
        let version = r.u32("the binary version")?;
        if version == 0 || version > MAX_BINARY_VERSION {
            bail!(
                "{}: binary version {version} is not a CTranslate2 model.bin this reader knows (1..={MAX_BINARY_VERSION})",
                path.display()
            );
        }
        let (spec, revision) =
            if version >= 2 { (r.string("the spec name")?, r.u32("the spec revision")?) } else { (String::new(), 1) };
        let n = r.u32("the variable count")? as usize;
        let mut vars = BTreeMap::new();
        for i in 0..n {
            let name = r.string(&format!("variable {i}'s name"))?;
            let rank = r.u8(&format!("{name}'s rank"))? as usize;
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(r.u32(&format!("{name}'s shape"))? as usize);
            }
            let (dtype, len) = if version >= 4 {
                let id = r.u8(&format!("{name}'s type"))?;
                let dtype = Ct2Dtype::from_id(id).ok_or_else(|| anyhow!("variable {name}: unknown type id {id}"))?;
                (dtype, r.u32(&format!("{name}'s byte count"))? as usize)
            } else {
                let size = r.u8(&format!("{name}'s item size"))?;
                let dtype = match size {
                    4 => Ct2Dtype::F32,
                    2 => Ct2Dtype::I16,
                    1 => Ct2Dtype::I8,
                    s => bail!("variable {name}: unknown item size {s}"),
                };
                let count = r.u32(&format!("{name}'s element count"))? as usize;
                (dtype, count * size as usize)
            };
            let numel: usize = shape.iter().product();
            if numel * dtype.size() != len {
                bail!("variable {name}: shape {shape:?} of {dtype} needs {} bytes, the file says {len}", numel * dtype.size());
            }
            let offset = r.pos;
            r.take(len, &format!("{name}'s data"))?;
            if vars.insert(name.clone(), Ct2Var { shape, dtype, offset, len }).is_some() {
                bail!("variable {name} appears twice");
            }
        }
        let mut aliases = BTreeMap::new();
        if version >= 3 {
            let na = r.u32("the alias count")?;
            for _ in 0..na {
                let alias = r.string("an alias")?;
                let target = r.string(&format!("alias {alias}'s target"))?;
                aliases.insert(alias, target);
            }
        }
        if r.pos != bytes.len() {
            bail!("{}: {} bytes after the last record", path.display(), bytes.len() - r.pos);
        }
        Ok(Self { path, binary_version: version, spec, revision, vars, aliases, bytes })
    }

    /// A variable by name, following an alias (and the `_scale` of an alias).
    pub fn var(&self, name: &str) -> Option<&Ct2Var> {
        if let Some(v) = self.vars.get(name) {
            return Some(v);
        }
        if let Some(t) = self.aliases.get(name) {
            return self.vars.get(t);
        }
        let base = name.strip_suffix("_scale")?;
        let t = self.aliases.get(base)?;
        self.vars.get(&format!("{t}_scale"))
    }

    /// Whether `name` exists (stored or aliased).
    pub fn has(&self, name: &str) -> bool {
        self.var(name).is_some()
    }

    fn need(&self, name: &str) -> Result<&Ct2Var> {
        self.var(name).ok_or_else(|| anyhow!("{}: variable {name} is missing", self.path.display()))
    }

    pub fn raw(&self, v: &Ct2Var) -> &[u8] {
        &self.bytes[v.offset..v.offset + v.len]
    }

    /// A scalar integer variable (e.g. `encoder/num_heads`).
    pub fn int_scalar(&self, name: &str) -> Result<i64> {
        let v = self.need(name)?;
        if v.numel() != 1 {
            bail!("{name}: expected a scalar, found shape {:?}", v.shape);
        }
        let b = self.raw(v);
        Ok(match v.dtype {
            Ct2Dtype::I8 => b[0] as i8 as i64,
            Ct2Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            Ct2Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            d => bail!("{name}: expected an integer scalar, found {d}"),
        })
    }

    /// The variable's values as f32, dequantized with its `_scale` when it
    /// is int8/int16. [shape]
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.need(name)?;
        let b = self.raw(v);
        let le2 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
        Ok(match v.dtype {
            Ct2Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Ct2Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_bits(le2(c)).to_f32()).collect(),
            Ct2Dtype::Bf16 => b.chunks_exact(2).map(|c| bf16::from_bits(le2(c)).to_f32()).collect(),
            Ct2Dtype::I8 => {
                let scale = self.scale(name, v)?;
                let rows = scale.len();
                let per_row = v.numel() / rows.max(1);
                b.iter().enumerate().map(|(i, &q)| q as i8 as f32 / scale[(i / per_row.max(1)).min(rows - 1)]).collect()
            }
            Ct2Dtype::I16 => {
                let scale = self.scale(name, v)?;
                if scale.len() != 1 {
                    bail!("{name}: int16 weights take one scale, found {}", scale.len());
                }
                b.chunks_exact(2).map(|c| le2(c) as i16 as f32 / scale[0]).collect()
            }
            Ct2Dtype::I32 => bail!("{name}: int32 variables are not weights"),
        })
    }

    /// `<name>_scale` of a quantized variable: one per row (int8) or one (int16).
    fn scale(&self, name: &str, v: &Ct2Var) -> Result<Vec<f32>> {
        let sname = format!("{name}_scale");
        let Some(s) = self.var(&sname) else {
            if v.dtype == Ct2Dtype::I16 {
                return Ok(vec![1000.0]); // ctranslate2's global int16 scale for old files
            }
            bail!("{name} is {} but {sname} is missing", v.dtype);
        };
        if !s.dtype.is_float() {
            bail!("{sname}: expected a float scale, found {}", s.dtype);
        }
        let scale = self.to_f32(&sname)?;
        let rows = v.shape.first().copied().unwrap_or(1);
        if v.dtype == Ct2Dtype::I8 && scale.len() != rows && scale.len() != 1 {
            bail!("{sname}: {} scales for {rows} rows of {name}", scale.len());
        }
        if scale.iter().any(|&x| !x.is_finite() || x == 0.0) {
            bail!("{sname}: a scale is zero or not finite");
        }
        Ok(scale)
    }

    /// Names of stored and aliased variables under `prefix` whose next path
    /// component is `layer_N`: the number of layers.
    pub fn count_layers(&self, prefix: &str) -> usize {
        let p = format!("{prefix}/layer_");
        self.vars
            .keys()
            .chain(self.aliases.keys())
            .filter_map(|k| k.strip_prefix(&p)?.split('/').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Serialize variables the way ctranslate2's `_serialize` does (version 6);
/// for tests and fixtures. `vars`: (name, shape, dtype, little-endian bytes).
pub fn write_model_bin(
    spec: &str,
    revision: u32,
    vars: &[(String, Vec<usize>, Ct2Dtype, Vec<u8>)],
    aliases: &[(String, String)],
) -> Vec<u8> {
    let mut out = Vec::new();
    let s = |out: &mut Vec<u8>, x: &str| {
        out.extend_from_slice(&((x.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(x.as_bytes());
        out.push(0);
    };
    out.extend_from_slice(&6u32.to_le_bytes());
    s(&mut out, spec);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
    for (name, shape, dtype, data) in vars {
        s(&mut out, name);
        out.push(shape.len() as u8);
        for &d in shape {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        out.push(dtype.id());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
    for (a, t) in aliases {
        s(&mut out, a);
        s(&mut out, t);
    }
    out
}

#[cfg(test)]
#[path = "ct2/tests.rs"]
mod tests;
