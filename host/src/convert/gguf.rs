//! Minimal, streaming-friendly GGUF (v2/v3) reader.
//!
//! Parses the header, every metadata key/value (all value types, nested
//! arrays included) and the tensor-info table, and computes the absolute
//! offset of each tensor's data. Tensor *data* is not read here; callers use
//! [`GgufFile::read_tensor_bytes`] one tensor at a time.
//!
//! Layout (little-endian), see ggml's `docs/gguf.md`:
//! ```text
//! magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//! n_kv x (string key | u32 value_type | value)
//! n_tensors x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset)
//! padding to `general.alignment` (default 32)
//! tensor data (each tensor at data_start + offset)
//! ```
//! where `string` is `u64 len | len bytes` (v1 used u32 lengths; v1 is refused).
//!
//! Per-architecture mapping lives in the submodules: [`arch`] dispatches on
//! `general.architecture` to `convert::llama` or [`gemma`]; [`spm`] rebuilds
//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizers.

pub mod arch;
pub mod gemma;
pub mod spm;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// GGUF magic, the first four bytes of every file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment used when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const GGML_MAX_DIMS: u32 = 4;

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type code and the elements.
    Array(GgufValueType, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a fixed-size value, `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

impl GgufValue {
    /// Any integer type (or bool) that fits in u64 without loss.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, v) => Some(v),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(..) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }
}

/// A ggml tensor type code (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const I8: GgmlType = GgmlType(24);
    pub const I16: GgmlType = GgmlType(25);
    pub const I32: GgmlType = GgmlType(26);
    pub const I64: GgmlType = GgmlType(27);
    pub const F64: GgmlType = GgmlType(28);
    pub const BF16: GgmlType = GgmlType(30);

    /// (name, elements per block, bytes per block) per ggml's type traits.
    fn traits(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    /// Human-readable name (`"Q4_K"`, `"type 99"` for unknown codes).
    pub fn name(self) -> String {
        match self.traits() {
            Some((n, _, _)) => n.to_string(),
            None => format!("unknown ggml type {}", self.0),
        }
    }

    /// Elements per block, if the type is known.
    pub fn block_size(self) -> Option<u64> {
        self.traits().map(|t| t.1)
    }

    /// Bytes per block, if the type is known.
    pub fn type_size(self) -> Option<u64> {
        self.traits().map(|t| t.2)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor-info table.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) is the innermost, contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major (MLX / numpy) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Size of the tensor's data in bytes, `None` for unknown types.
    pub fn n_bytes(&self) -> Option<u64> {
        let bs = self.ggml_type.block_size()?;
        let ts = self.ggml_type.type_size()?;
        let ne0 = *self.dims.first().unwrap_or(&1);
        if !ne0.is_multiple_of(bs) {
            return None;
        }
        let rows: u64 = self.dims.iter().skip(1).product();
        Some(ne0 / bs * ts * rows)
    }
}

/// A parsed GGUF file (everything but the tensor data).
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub file_size: u64,
}

/// Byte reader that tracks its position for error messages.
struct Cursor<R> {
    inner: R,
    pos: u64,
    file_size: u64,
}

impl<R: Read> Cursor<R> {
    fn read_bytes(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        if self.pos + buf.len() as u64 > self.file_size {
            bail!(
                "truncated GGUF file: {} needs {} bytes at offset {}, but the file is only {} bytes",
                what(),
                buf.len(),
                self.pos,
                self.file_size
            );
        }
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                anyhow!(
                    "truncated GGUF file: unexpected end of file reading {} at offset {}",
                    what(),
                    self.pos
                )
            } else {
                anyhow!(e).context(format!("reading {} at offset {}", what(), self.pos))
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_bytes(&mut b, what)?;
        Ok(b[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_bytes(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_bytes(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_bytes(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() {
            bail!(
                "truncated GGUF file: {} claims {} bytes at offset {}, but only {} bytes remain",
                what(),
                len,
                self.pos,
                self.remaining()
            );
        }
        let mut buf = vec![0u8; len as usize];
        self.read_bytes(&mut buf, what)?;
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        what: &dyn Fn() -> String,
        depth: u32,
    ) -> Result<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.u8(what)?),
            T::I8 => GgufValue::I8(self.u8(what)? as i8),
            T::U16 => GgufValue::U16(self.u16(what)?),
            T::I16 => GgufValue::I16(self.u16(what)? as i16),
            T::U32 => GgufValue::U32(self.u32(what)?),
            T::I32 => GgufValue::I32(self.u32(what)? as i32),
            T::F32 => GgufValue::F32(f32::from_bits(self.u32(what)?)),
            T::Bool => {
                let b = self.u8(what)?;
                if b > 1 {
                    bail!(
                        "invalid GGUF bool value {} for {} at offset {}",
                        b,
                        what(),
                        self.pos - 1
                    );
                }
                GgufValue::Bool(b != 0)
            }
            T::String => GgufValue::String(self.string(what)?),
            T::U64 => GgufValue::U64(self.u64(what)?),
            T::I64 => GgufValue::I64(self.u64(what)? as i64),
            T::F64 => GgufValue::F64(f64::from_bits(self.u64(what)?)),
            T::Array => {
                if depth > 8 {
                    bail!("GGUF metadata {} nests arrays too deeply", what());
                }
                let raw = self.u32(&|| format!("array element type of {}", what()))?;
                let elem = GgufValueType::from_u32(raw).ok_or_else(|| {
                    anyhow!("invalid GGUF array element type {} in {}", raw, what())
                })?;
                let len = self.u64(&|| format!("array length of {}", what()))?;
                // Every element takes at least one byte (strings at least 8).
                let min = elem.fixed_size().unwrap_or(8);
                if len.saturating_mul(min) > self.remaining() {
                    bail!(
                        "truncated GGUF file: {} claims {} elements at offset {}, but only {} bytes remain",
                        what(),
                        len,
                        self.pos,
                        self.remaining()
                    );
                }
                let mut items = Vec::with_capacity(len as usize);
                for i in 0..len {
                    items.push(self.value(elem, &|| format!("{}[{}]", what(), i), depth + 1)?);
                }
                GgufValue::Array(elem, items)
            }
        })
    }
}

impl GgufFile {
    /// Parse header, metadata and tensor infos of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        let file_size = file.metadata()?.len();
        let mut c = Cursor {
            inner: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            file_size,
        };
        Self::parse(&mut c, path).with_context(|| format!("parsing GGUF file {}", path.display()))
    }

    fn parse<R: Read>(c: &mut Cursor<R>, path: &Path) -> Result<Self> {
        let mut magic = [0u8; 4];
        if c.file_size < 4 {
            bail!("not a GGUF file: only {} bytes long", c.file_size);
        }
        c.read_bytes(&mut magic, &|| "magic".into())?;
        if magic != GGUF_MAGIC {
            bail!(
                "not a GGUF file: bad magic {:02x?} ({:?}), expected \"GGUF\"",
                magic,
                String::from_utf8_lossy(&magic)
            );
        }
        let version = c.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => bail!("GGUF version 1 is not supported (only versions 2 and 3)"),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                bail!(
                    "big-endian GGUF files are not supported (version field reads {:#x})",
                    v
                )
            }
            v => bail!("unsupported GGUF version {} (only versions 2 and 3)", v),
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // Cheap sanity bounds: each kv needs >= 8+4+1 bytes, each tensor info >= 8+4+4+8.
        if n_kv.saturating_mul(13) > c.remaining() {
            bail!(
                "truncated or corrupt GGUF file: header claims {} metadata entries",
                n_kv
            );
        }
        if n_tensors.saturating_mul(24) > c.remaining() {
            bail!(
                "truncated or corrupt GGUF file: header claims {} tensors",
                n_tensors
            );
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{}", i))?;
            let raw = c.u32(&|| format!("value type of metadata '{}'", key))?;
            let ty = GgufValueType::from_u32(raw).ok_or_else(|| {
                anyhow!("invalid GGUF value type {} for metadata key '{}'", raw, key)
            })?;
            let value = c.value(ty, &|| format!("metadata '{}'", key), 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                bail!("duplicate GGUF metadata key '{}'", key);
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some((_, v)) => {
                let a = v.as_u64().ok_or_else(|| {
                    anyhow!(
                        "general.alignment has type {}, expected an integer",
                        v.type_name()
                    )
                })?;
                if a == 0 || !a.is_power_of_two() {
                    bail!("invalid general.alignment {} (must be a power of two)", a);
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor #{}", i))?;
            let n_dims = c.u32(&|| format!("n_dims of tensor '{}'", name))?;
            if n_dims == 0 || n_dims > GGML_MAX_DIMS {
                bail!(
                    "tensor '{}' has {} dimensions (ggml supports 1..={})",
                    name,
                    n_dims,
                    GGML_MAX_DIMS
                );
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dimension {} of tensor '{}'", d, name))?);
            }
            let ggml_type = GgmlType(c.u32(&|| format!("type of tensor '{}'", name))?);
            let offset = c.u64(&|| format!("data offset of tensor '{}'", name))?;
            if !offset.is_multiple_of(alignment) {
                bail!(
                    "tensor '{}' data offset {} is not a multiple of the alignment {}",
                    name,
                    offset,
                    alignment
                );
            }
            if dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
                bail!("tensor '{}' has an overflowing shape {:?}", name, dims);
            }
            if names.insert(name.clone(), i).is_some() {
                bail!("duplicate tensor name '{}'", name);
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let data_offset = c.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            if let Some(b) = t.ggml_type.block_size() {
                if !t.dims[0].is_multiple_of(b) {
                    bail!(
                        "tensor '{}' of type {} has ne0 = {}, not a multiple of the block size {}",
                        t.name,
                        t.ggml_type,
                        t.dims[0],
                        b
                    );
                }
            }
            if let Some(n) = t.n_bytes() {
                let end = data_offset
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(n));
                match end {
                    Some(end) if end <= c.file_size => {}
                    _ => bail!(
                        "truncated GGUF file: tensor '{}' ({} bytes at data offset {}) extends past the end of the file ({} bytes)",
                        t.name,
                        n,
                        t.offset,
                        c.file_size
                    ),
                }
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            index,
            tensors,
            alignment,
            data_offset,
            file_size: c.file_size,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                anyhow!(
                    "metadata '{}' has type {}, expected string",
                    key,
                    v.type_name()
                )
            }),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                anyhow!(
                    "metadata '{}' has type {}, expected a non-negative integer",
                    key,
                    v.type_name()
                )
            }),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                anyhow!(
                    "metadata '{}' has type {}, expected a number",
                    key,
                    v.type_name()
                )
            }),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                anyhow!(
                    "metadata '{}' has type {}, expected bool",
                    key,
                    v.type_name()
                )
            }),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Read the raw bytes of one tensor (its GGUF encoding, unchanged).
    pub fn read_tensor_bytes(&self, file: &mut File, t: &GgufTensorInfo) -> Result<Vec<u8>> {
        let n = t.n_bytes().ok_or_else(|| {
            anyhow!(
                "tensor '{}' has type {} whose size is unknown",
                t.name,
                t.ggml_type
            )
        })?;
        let start = self.data_offset + t.offset;
        let mut buf = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                anyhow!(
                    "truncated GGUF file: unexpected end of file reading tensor '{}'",
                    t.name
                )
            } else {
                anyhow!(e).context(format!("reading tensor '{}'", t.name))
            }
        })?;
        Ok(buf)
    }
}
