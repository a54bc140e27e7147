//! The GGUF header / metadata / tensor-info parser and tensor byte reads.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::{GgmlType, GgufTensorInfo, GgufValue, GgufValueType, GGML_MAX_DIMS, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC};

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
