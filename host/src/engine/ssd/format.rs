//! The SSD tier's block file: encoding, decoding and checking one block
//! (the layout is in ../mod.rs and docs/KV_CACHE.md), and MLX arrays to and
//! from host bytes.
use anyhow::{bail, Result};
use mlx_rs::Array;

pub const MAGIC: &[u8; 8] = b"RMLXKVB\0";
/// 3: arrays of rank 1 to 4 (a KV family's components), the rank in the
/// descriptor's second word.
pub const VERSION: u32 = 3;
/// Bytes of the fixed part of the header.
pub const FIXED: usize = 64;
/// Bytes of one array descriptor.
pub const DESC: usize = 32;

/// One array of a block as bytes: MLX dtype code, shape (1 to 4 dims),
/// row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArray {
    pub dtype: u32,
    pub shape: Vec<u32>,
    pub data: Vec<u8>,
}

/// A block file's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockFile {
    pub signature: u64,
    pub hash: u64,
    /// The chain's previous block's hash (0 for a first block).
    pub parent: u64,
    pub depth: u32,
    pub tokens: Vec<u32>,
    pub arrays: Vec<RawArray>,
}

/// Bytes per element of the MLX dtype codes the KV cache uses.
fn dtype_size(code: u32) -> Option<u64> {
    use mlx_rs::Dtype::*;
    Some(match mlx_rs::Dtype::try_from(code).ok()? {
        Float16 | Bfloat16 | Uint16 | Int16 => 2,
        Float32 | Uint32 | Int32 => 4,
        Uint8 | Int8 => 1,
        _ => return None,
    })
}

fn header_len(tokens: usize, arrays: usize) -> usize {
    FIXED + 4 * tokens + DESC * arrays
}

/// The whole file, checksum included.
pub fn encode(b: &BlockFile) -> Vec<u8> {
    let hlen = header_len(b.tokens.len(), b.arrays.len());
    let payload: usize = b.arrays.iter().map(|a| a.data.len()).sum();
    let mut out = Vec::with_capacity(hlen + payload + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(hlen as u32).to_le_bytes());
    out.extend_from_slice(&b.signature.to_le_bytes());
    out.extend_from_slice(&b.hash.to_le_bytes());
    out.extend_from_slice(&b.depth.to_le_bytes());
    out.extend_from_slice(&(b.tokens.len() as u32).to_le_bytes());
    out.extend_from_slice(&(b.arrays.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload as u64).to_le_bytes());
    out.extend_from_slice(&b.parent.to_le_bytes());
    for t in &b.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for a in &b.arrays {
        out.extend_from_slice(&a.dtype.to_le_bytes());
        out.extend_from_slice(&(a.shape.len() as u32).to_le_bytes());
        for i in 0..4 {
            out.extend_from_slice(&a.shape.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&(a.data.len() as u64).to_le_bytes());
    }
    for a in &b.arrays {
        out.extend_from_slice(&a.data);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The fixed header's fields that the start-up scan checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fixed {
    pub signature: u64,
    pub hash: u64,
    pub depth: u32,
    /// The length the whole file must have.
    pub file_len: u64,
}

/// Checks magic, version and header length; the file length it implies.
pub fn parse_fixed(b: &[u8]) -> Result<Fixed> {
    if b.len() < FIXED {
        bail!("shorter than the header ({} bytes)", b.len());
    }
    if &b[..8] != MAGIC {
        bail!("bad magic");
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        bail!("format version {version}, expected {VERSION}");
    }
    let (n_tokens, n_arrays) = (u32_at(b, 36) as usize, u32_at(b, 40) as usize);
    let hlen = u32_at(b, 12) as usize;
    if n_tokens > 1 << 20 || n_arrays > 1 << 16 || hlen != header_len(n_tokens, n_arrays) {
        bail!("inconsistent header length");
    }
    let payload = u64_at(b, 48);
    Ok(Fixed {
        signature: u64_at(b, 16),
        hash: u64_at(b, 24),
        depth: u32_at(b, 32),
        file_len: hlen as u64 + payload + 4,
    })
}

/// Parses and verifies a whole file: checksum, length, descriptors.
pub fn decode(b: &[u8]) -> Result<BlockFile> {
    let f = parse_fixed(b)?;
    if b.len() as u64 != f.file_len {
        bail!(
            "truncated or padded: {} bytes, the header says {}",
            b.len(),
            f.file_len
        );
    }
    let body = &b[..b.len() - 4];
    let want = u32_at(b, b.len() - 4);
    if crc32fast::hash(body) != want {
        bail!("checksum mismatch");
    }
    let (n_tokens, n_arrays) = (u32_at(b, 36) as usize, u32_at(b, 40) as usize);
    let tokens: Vec<u32> = (0..n_tokens).map(|i| u32_at(b, FIXED + 4 * i)).collect();
    let mut off = header_len(n_tokens, 0);
    let mut data_off = header_len(n_tokens, n_arrays);
    let mut arrays = Vec::with_capacity(n_arrays);
    for _ in 0..n_arrays {
        let dtype = u32_at(b, off);
        let rank = u32_at(b, off + 4) as usize;
        if !(1..=4).contains(&rank) {
            bail!("array rank {rank} is not 1 to 4");
        }
        let shape: Vec<u32> = (0..rank).map(|i| u32_at(b, off + 8 + 4 * i)).collect();
        let len = u64_at(b, off + 24);
        let elems: u64 = shape.iter().map(|&d| d as u64).product();
        let Some(size) = dtype_size(dtype) else {
            bail!("unknown dtype code {dtype}")
        };
        if elems * size != len || data_off as u64 + len > body.len() as u64 {
            bail!("array descriptor does not match its data");
        }
        arrays.push(RawArray {
            dtype,
            shape,
            data: b[data_off..data_off + len as usize].to_vec(),
        });
        data_off += len as usize;
        off += DESC;
    }
    if data_off != body.len() {
        bail!("payload length does not match the arrays");
    }
    Ok(BlockFile {
        signature: f.signature,
        hash: f.hash,
        parent: u64_at(b, 56),
        depth: f.depth,
        tokens,
        arrays,
    })
}

// ---------------------------------------------------------------- MLX arrays

/// An evaluated MLX array's row-major bytes (copied to the host).
pub fn to_raw(a: &Array) -> Result<RawArray> {
    let shape = a.shape();
    if !(1..=4).contains(&shape.len()) {
        bail!("KV block arrays have 1 to 4 dims, got {shape:?}");
    }
    let stream = mlx_rs::Stream::thread_local_or_default();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        if mlx_sys::mlx_contiguous(&mut res, a.as_ptr(), false, stream.as_ptr()) != 0 {
            mlx_sys::mlx_array_free(res);
            bail!("mlx_contiguous failed");
        }
        let c = Array::from_ptr(res);
        c.eval()?;
        let dtype = mlx_sys::mlx_array_dtype(c.as_ptr());
        let n = mlx_sys::mlx_array_nbytes(c.as_ptr());
        let p = mlx_sys::mlx_array_data_uint8(c.as_ptr());
        let Some(size) = dtype_size(dtype) else {
            bail!("KV dtype code {dtype} is not supported on disk")
        };
        let elems: usize = shape.iter().map(|&d| d as usize).product();
        if p.is_null() || n != elems * size as usize {
            bail!("could not read the array's data");
        }
        let data = std::slice::from_raw_parts(p, n).to_vec();
        Ok(RawArray {
            dtype,
            shape: shape.iter().map(|&d| d as u32).collect(),
            data,
        })
    }
}

/// An MLX array with these bytes (copied).
pub fn from_raw(r: &RawArray) -> Array {
    let shape: Vec<i32> = r.shape.iter().map(|&d| d as i32).collect();
    unsafe {
        Array::from_ptr(mlx_sys::mlx_array_new_data(
            r.data.as_ptr().cast(),
            shape.as_ptr(),
            shape.len() as i32,
            r.dtype,
        ))
    }
}
