//! GGUF block formats that MLX affine quantization (group 32) represents
//! exactly, with the semantics of MLX's own GGUF loader
//! (`mlx/io/gguf_quants.cpp`) where it has one:
//!
//! * Q4_0 (`d, qs[16]`, w = d * (q - 8))      -> 4-bit, scale d, bias -8 * d.
//! * Q4_1 (`d, m, qs[16]`, w = d * q + m)     -> 4-bit, scale d, bias m.
//! * Q5_0 (`d, qh, qs[16]`, w = d * (q - 16)) -> 5-bit, scale d, bias -16 * d.
//! * Q5_1 (`d, m, qh, qs[16]`, w = d * q + m) -> 5-bit, scale d, bias m.
//! * Q8_0 (`d, qs i8[32]`, w = d * q)         -> 8-bit, q_unsigned = q + 128
//!   (= q ^ 0x80), scale d, bias -128 * d.
//!
//! All are exact: d and m are float16 in the block and stay float16, and
//! `-2^k * d` is a power-of-two multiple of a float16 (exact unless it
//! overflows, which is checked). MLX stores element `i` of a row at bit
//! `bits * i` of the little-endian bit stream of its packed uint32 words (for
//! 5 bits: 8 elements per 5 bytes), so a group of 32 codes packs into
//! `bits` words. The other GGML types have no MLX layout and are
//! dequantized ([`super::gguf::dequant`]).

use anyhow::{bail, Result};
use half::f16;

use super::gguf::{dequant, GgmlType};

/// Elements per GGUF block and per MLX quantization group.
pub const GROUP_SIZE: usize = 32;

/// A GGUF type that maps exactly onto MLX affine quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl QuantKind {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::Q4_0 => Some(QuantKind::Q4_0),
            GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlType::Q5_0 => Some(QuantKind::Q5_0),
            GgmlType::Q5_1 => Some(QuantKind::Q5_1),
            GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            QuantKind::Q4_0 => GgmlType::Q4_0,
            QuantKind::Q4_1 => GgmlType::Q4_1,
            QuantKind::Q5_0 => GgmlType::Q5_0,
            QuantKind::Q5_1 => GgmlType::Q5_1,
            QuantKind::Q8_0 => GgmlType::Q8_0,
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            QuantKind::Q4_0 | QuantKind::Q4_1 => 4,
            QuantKind::Q5_0 | QuantKind::Q5_1 => 5,
            QuantKind::Q8_0 => 8,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q8_0 => 34,
        }
    }

    /// Packed uint32 words per group of 32 elements.
    pub fn words_per_group(self) -> usize {
        GROUP_SIZE * self.bits() as usize / 32
    }

    /// The unsigned codes (0..2^bits) of one block, in element order.
    fn codes(self, blk: &[u8]) -> [u8; 32] {
        let nib = |qs: &[u8], j: usize| if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
        match self {
            QuantKind::Q4_0 => std::array::from_fn(|j| nib(&blk[2..], j)),
            QuantKind::Q4_1 => std::array::from_fn(|j| nib(&blk[4..], j)),
            QuantKind::Q5_0 => dequant::q5_codes(blk, 2),
            QuantKind::Q5_1 => dequant::q5_codes(blk, 4),
            QuantKind::Q8_0 => std::array::from_fn(|j| blk[2 + j] ^ 0x80),
        }
    }

    /// MLX's bias of one block: `-offset * d`, or the block's own `m`.
    fn bias(self, blk: &[u8]) -> f16 {
        let d = f16_at(blk, 0).to_f32();
        match self {
            QuantKind::Q4_1 | QuantKind::Q5_1 => f16_at(blk, 2),
            // Powers of two: exact in f16 unless out of range (checked by the caller).
            QuantKind::Q4_0 => f16::from_f32(-8.0 * d),
            QuantKind::Q5_0 => f16::from_f32(-16.0 * d),
            QuantKind::Q8_0 => f16::from_f32(-128.0 * d),
        }
    }
}

fn f16_at(b: &[u8], off: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]]))
}

fn check_len(kind: QuantKind, raw: &[u8]) -> Result<usize> {
    let bb = kind.block_bytes();
    if !raw.len().is_multiple_of(bb) {
        bail!(
            "{:?} data length {} is not a multiple of the block size {}",
            kind,
            raw.len(),
            bb
        );
    }
    Ok(raw.len() / bb)
}

/// Packs codes of `bits` bits into the little-endian bit stream MLX uses.
pub fn pack_codes(bits: u32, codes: &[u8], out: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut n = 0u32;
    for &c in codes {
        acc |= (c as u64) << n;
        n += bits;
        while n >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 {
        out.push(acc as u8);
    }
}

/// Packed weights (little-endian uint32 words, as bytes) for a run of blocks.
pub fn pack_weights(kind: QuantKind, raw: &[u8]) -> Result<Vec<u8>> {
    let n_blocks = check_len(kind, raw)?;
    let mut out = Vec::with_capacity(n_blocks * kind.words_per_group() * 4);
    for blk in raw.chunks_exact(kind.block_bytes()) {
        pack_codes(kind.bits(), &kind.codes(blk), &mut out);
    }
    Ok(out)
}

/// Per-group scales as float16 bytes.
pub fn scales(kind: QuantKind, raw: &[u8]) -> Result<Vec<u8>> {
    check_len(kind, raw)?;
    Ok(raw
        .chunks_exact(kind.block_bytes())
        .flat_map(|blk| f16_at(blk, 0).to_bits().to_le_bytes())
        .collect())
}

/// Per-group biases as float16 bytes. Fails if `-offset * d` overflows
/// float16 (a block scale above 65504 / offset), which no real file has.
pub fn biases(kind: QuantKind, raw: &[u8]) -> Result<Vec<u8>> {
    check_len(kind, raw)?;
    let mut out = Vec::with_capacity(raw.len() / kind.block_bytes() * 2);
    for (i, blk) in raw.chunks_exact(kind.block_bytes()).enumerate() {
        let b = kind.bias(blk);
        if b.is_infinite() && f16_at(blk, 0).is_finite() {
            bail!(
                "{:?} block {} has scale {}: its MLX bias overflows float16 (convert with --quant to re-quantize)",
                kind,
                i,
                f16_at(blk, 0)
            );
        }
        out.extend(b.to_bits().to_le_bytes());
    }
    Ok(out)
}

/// Dequantize a GGUF block run to f32 the way llama.cpp does (reference for tests).
pub fn dequantize_gguf(kind: QuantKind, raw: &[u8]) -> Result<Vec<f32>> {
    check_len(kind, raw)?;
    dequant::dequantize(kind.ggml(), raw)
}

/// Dequantize MLX affine data (packed words, f16 scales/biases) to f32
/// (reference for tests): w = scale * q + bias.
pub fn dequantize_mlx(bits: u32, packed: &[u8], scales: &[u8], biases: &[u8]) -> Vec<f32> {
    let mask = (1u64 << bits) - 1;
    let n = packed.len() * 8 / bits as usize;
    (0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let mut window = 0u64;
            for k in 0..2 {
                if let Some(&b) = packed.get(bit / 8 + k) {
                    window |= (b as u64) << (8 * k);
                }
            }
            let q = (window >> (bit % 8)) & mask;
            let g = i / GROUP_SIZE;
            let s = f16_at(scales, 2 * g).to_f32();
            let b = f16_at(biases, 2 * g).to_f32();
            s * q as f32 + b
        })
        .collect()
}

/// Reorder the rows of a row-major buffer (rows of `row_bytes` bytes) so that
/// output row `r` is input row `src_row(r)`.
pub fn permute_rows(data: &[u8], row_bytes: usize, src_row: impl Fn(usize) -> usize) -> Vec<u8> {
    let n_rows = data.len() / row_bytes;
    let mut out = Vec::with_capacity(data.len());
    for r in 0..n_rows {
        let s = src_row(r);
        out.extend_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    out
}

/// Undo llama.cpp's rotary permutation of q/k projection rows.
///
/// llama.cpp's `convert_hf_to_gguf.py` stores HF rows as
/// `w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)` (HF "half-split" rotary
/// layout -> interleaved pairs). The inverse, applied here, is
/// `reshape(n_head, hd/2, 2, ...).swapaxes(1, 2)`: HF row `h*hd + j*hd/2 + i`
/// (j in {0,1}, i < hd/2) is GGUF row `h*hd + 2*i + j`.
pub fn unpermute_src_row(n_rows: usize, n_head: usize) -> Result<impl Fn(usize) -> usize> {
    if n_head == 0 || !n_rows.is_multiple_of(n_head) || !(n_rows / n_head).is_multiple_of(2) {
        bail!(
            "cannot undo rotary permutation: {} rows do not split into {} heads of even size",
            n_rows,
            n_head
        );
    }
    let hd = n_rows / n_head;
    let half = hd / 2;
    Ok(move |r: usize| {
        let (h, within) = (r / hd, r % hd);
        let (j, i) = (within / half, within % half);
        h * hd + 2 * i + j
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_q4_0(d: f32, q: &[u8; 32]) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_bits().to_le_bytes().to_vec();
        for j in 0..16 {
            b.push(q[j] | (q[j + 16] << 4));
        }
        b
    }

    #[test]
    fn q4_0_roundtrip_matches_llama_cpp_dequant() {
        let mut q = [0u8; 32];
        for (i, v) in q.iter_mut().enumerate() {
            *v = ((i * 7 + 3) % 16) as u8;
        }
        let mut raw = block_q4_0(0.5, &q);
        raw.extend(block_q4_0(-0.125, &q));
        let packed = pack_weights(QuantKind::Q4_0, &raw).unwrap();
        assert_eq!(packed.len(), 32);
        // element i at bits 4*(i%8) of word i/8, little-endian.
        for i in 0..32 {
            let word = u32::from_le_bytes(packed[4 * (i / 8)..4 * (i / 8) + 4].try_into().unwrap());
            assert_eq!((word >> (4 * (i % 8))) & 0xF, q[i] as u32, "element {i}");
        }
        let s = scales(QuantKind::Q4_0, &raw).unwrap();
        let b = biases(QuantKind::Q4_0, &raw).unwrap();
        let mlx = dequantize_mlx(4, &packed, &s, &b);
        let gg = dequantize_gguf(QuantKind::Q4_0, &raw).unwrap();
        assert_eq!(mlx, gg);
    }

    #[test]
    fn q4_1_and_q8_0_match_llama_cpp_dequant() {
        // Q4_1
        let mut raw = Vec::new();
        for blk in 0..3u8 {
            raw.extend(
                f16::from_f32(0.25 * (blk as f32 + 1.0))
                    .to_bits()
                    .to_le_bytes(),
            );
            raw.extend(f16::from_f32(-1.5 + blk as f32).to_bits().to_le_bytes());
            for j in 0..16u8 {
                raw.push(j.wrapping_mul(37).wrapping_add(blk * 11));
            }
        }
        let p = pack_weights(QuantKind::Q4_1, &raw).unwrap();
        let s = scales(QuantKind::Q4_1, &raw).unwrap();
        let b = biases(QuantKind::Q4_1, &raw).unwrap();
        assert_eq!(
            dequantize_mlx(4, &p, &s, &b),
            dequantize_gguf(QuantKind::Q4_1, &raw).unwrap()
        );

        // Q8_0
        let mut raw = Vec::new();
        for blk in 0..2u8 {
            raw.extend(
                f16::from_f32(0.03125 * (blk as f32 + 1.0))
                    .to_bits()
                    .to_le_bytes(),
            );
            for j in 0..32u8 {
                raw.push(j.wrapping_mul(29).wrapping_add(blk * 101));
            }
        }
        let p = pack_weights(QuantKind::Q8_0, &raw).unwrap();
        assert_eq!(p.len(), 64);
        let s = scales(QuantKind::Q8_0, &raw).unwrap();
        let b = biases(QuantKind::Q8_0, &raw).unwrap();
        assert_eq!(
            dequantize_mlx(8, &p, &s, &b),
            dequantize_gguf(QuantKind::Q8_0, &raw).unwrap()
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp permute (HF -> GGUF): reshape(n_head, 2, hd/2).swapaxes(1,2).
        let (n_head, hd) = (3usize, 8usize);
        let hf: Vec<usize> = (0..n_head * hd).collect();
        let mut gguf = vec![0usize; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    // source index (h, j, i) lands at (h, i, j)
                    gguf[h * hd + i * 2 + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        let src = unpermute_src_row(n_head * hd, n_head).unwrap();
        let back: Vec<usize> = (0..hf.len()).map(|r| gguf[src(r)]).collect();
        assert_eq!(back, hf);
    }
}
