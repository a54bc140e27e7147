//! GGUF block formats -> MLX affine quantization, with the exact semantics of
//! MLX's own GGUF loader (`mlx/io/gguf_quants.cpp`):
//!
//! * Q4_0 (`d: f16, qs: [u8; 16]`, w = d * (q - 8))  -> 4-bit, group 32,
//!   scale = d, bias = -8 * d (computed in f16).
//! * Q4_1 (`d: f16, m: f16, qs: [u8; 16]`, w = d * q + m) -> 4-bit, group 32,
//!   scale = d, bias = m.
//! * Q8_0 (`d: f16, qs: [i8; 32]`, w = d * q) -> 8-bit, group 32,
//!   q_unsigned = q + 128 (= q ^ 0x80), scale = d, bias = -128 * d.
//!
//! In Q4_0/Q4_1 blocks, byte `qs[j]` holds element `j` in its low nibble and
//! element `j + 16` in its high nibble. MLX packs element `i` of a row into
//! `uint32` word `i / (32 / bits)` at bit `bits * (i % (32 / bits))`, i.e. the
//! natural little-endian order, so for 4 bits byte `k` of the packed row holds
//! element `2k` (low nibble) and `2k + 1` (high nibble).
//!
//! Scales and biases are float16, as MLX's loader produces.

use anyhow::{bail, Result};
use half::f16;

use super::gguf::GgmlType;

/// Elements per GGUF block and per MLX quantization group.
pub const GROUP_SIZE: usize = 32;

/// How a GGUF tensor type maps onto MLX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QuantKind {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::Q4_0 => Some(QuantKind::Q4_0),
            GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            QuantKind::Q4_0 | QuantKind::Q4_1 => 4,
            QuantKind::Q8_0 => 8,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }

    /// Packed uint32 words per group of 32 elements.
    pub fn words_per_group(self) -> usize {
        GROUP_SIZE * self.bits() as usize / 32
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

/// Packed weights (little-endian uint32 words, as bytes) for a run of blocks.
pub fn pack_weights(kind: QuantKind, raw: &[u8]) -> Result<Vec<u8>> {
    let n_blocks = check_len(kind, raw)?;
    let bb = kind.block_bytes();
    // Output: 16 bytes per block for 4-bit, 32 for 8-bit.
    let out_per_block = kind.words_per_group() * 4;
    let mut out = vec![0u8; n_blocks * out_per_block];
    for (blk, dst) in raw
        .chunks_exact(bb)
        .zip(out.chunks_exact_mut(out_per_block))
    {
        match kind {
            QuantKind::Q4_0 | QuantKind::Q4_1 => {
                let qs = &blk[bb - 16..];
                // element e in 0..16 = low nibble of qs[e]; e in 16..32 = high nibble of qs[e-16].
                // packed byte k = element 2k | element 2k+1 << 4.
                for k in 0..8 {
                    let lo = qs[2 * k] & 0x0F;
                    let hi = qs[2 * k + 1] & 0x0F;
                    dst[k] = lo | (hi << 4);
                    let lo = qs[2 * k] >> 4;
                    let hi = qs[2 * k + 1] >> 4;
                    dst[8 + k] = lo | (hi << 4);
                }
            }
            QuantKind::Q8_0 => {
                for (d, &q) in dst.iter_mut().zip(&blk[2..34]) {
                    *d = q ^ 0x80;
                }
            }
        }
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

/// Per-group biases as float16 bytes.
pub fn biases(kind: QuantKind, raw: &[u8]) -> Result<Vec<u8>> {
    check_len(kind, raw)?;
    Ok(raw
        .chunks_exact(kind.block_bytes())
        .flat_map(|blk| {
            let b = match kind {
                // MLX computes `-8 * scale` / `-128 * scale` in float16; scaling
                // by a power of two is exact, so going through f32 is identical.
                QuantKind::Q4_0 => f16::from_f32(-8.0 * f16_at(blk, 0).to_f32()),
                QuantKind::Q4_1 => f16_at(blk, 2),
                QuantKind::Q8_0 => f16::from_f32(-128.0 * f16_at(blk, 0).to_f32()),
            };
            b.to_bits().to_le_bytes()
        })
        .collect())
}

/// Dequantize one GGUF block run to f32 the way llama.cpp does (reference for tests).
pub fn dequantize_gguf(kind: QuantKind, raw: &[u8]) -> Result<Vec<f32>> {
    check_len(kind, raw)?;
    let mut out = Vec::with_capacity(raw.len() / kind.block_bytes() * GROUP_SIZE);
    for blk in raw.chunks_exact(kind.block_bytes()) {
        let d = f16_at(blk, 0).to_f32();
        match kind {
            QuantKind::Q4_0 | QuantKind::Q4_1 => {
                let m = if kind == QuantKind::Q4_1 {
                    f16_at(blk, 2).to_f32()
                } else {
                    0.0
                };
                let qs = &blk[blk.len() - 16..];
                let mut vals = [0f32; 32];
                for j in 0..16 {
                    let (lo, hi) = ((qs[j] & 0xF) as f32, (qs[j] >> 4) as f32);
                    if kind == QuantKind::Q4_0 {
                        vals[j] = (lo - 8.0) * d;
                        vals[j + 16] = (hi - 8.0) * d;
                    } else {
                        vals[j] = lo * d + m;
                        vals[j + 16] = hi * d + m;
                    }
                }
                out.extend_from_slice(&vals);
            }
            QuantKind::Q8_0 => out.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d)),
        }
    }
    Ok(out)
}

/// Dequantize MLX affine data (packed words, f16 scales/biases) to f32
/// (reference for tests): w = scale * q + bias.
pub fn dequantize_mlx(bits: u32, packed: &[u8], scales: &[u8], biases: &[u8]) -> Vec<f32> {
    let per_byte = 8 / bits as usize;
    let mask = (1u16 << bits) - 1;
    let n = packed.len() * per_byte;
    (0..n)
        .map(|i| {
            let byte = packed[i / per_byte];
            let q = ((byte as u16) >> (bits as usize * (i % per_byte))) & mask;
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

// ---------------------------------------------------------------- K-quants
//
// Q4_K, Q5_K and Q6_K have no exact MLX layout (super-blocks of 256 with
// 6-bit sub-scales and mins): they are dequantized to float with ggml's own
// formulas (`dequantize_row_q{4,5,6}_K` in ggml-quants.c) and then written
// dense, or re-quantized by `rmlx convert --quant ...`.

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// A K-quant type rmlx dequantizes: (name, bytes per super-block).
pub fn k_quant(t: GgmlType) -> Option<(&'static str, usize)> {
    match t.0 {
        12 => Some(("Q4_K", 144)),
        13 => Some(("Q5_K", 176)),
        14 => Some(("Q6_K", 210)),
        _ => None,
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantizes K-quant data (whole super-blocks) to f32, as ggml does.
pub fn dequant_k(t: GgmlType, raw: &[u8]) -> Result<Vec<f32>> {
    let Some((name, bb)) = k_quant(t) else {
        bail!("{} is not a K-quant rmlx dequantizes", t.name());
    };
    if !raw.len().is_multiple_of(bb) {
        bail!("{name} data length {} is not a multiple of the block size {bb}", raw.len());
    }
    let mut y = Vec::with_capacity(raw.len() / bb * QK_K);
    for b in raw.chunks_exact(bb) {
        match t.0 {
            12 | 13 => {
                let d = f16_at(b, 0).to_f32();
                let dmin = f16_at(b, 2).to_f32();
                let scales = &b[4..16];
                let (qh, mut ql) = if t.0 == 13 { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                let (mut u1, mut u2) = (1u8, 2u8);
                for is in (0..8).step_by(2) {
                    let (sc, m) = scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    let (sc, m) = scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, dmin * m as f32);
                    let hi = |l: usize, u: u8| qh.map_or(0.0, |h| if h[l] & u != 0 { 16.0 } else { 0.0 });
                    for l in 0..32 {
                        y.push(d1 * ((ql[l] & 0xF) as f32 + hi(l, u1)) - m1);
                    }
                    for l in 0..32 {
                        y.push(d2 * ((ql[l] >> 4) as f32 + hi(l, u2)) - m2);
                    }
                    ql = &ql[32..];
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
            _ => {
                // Q6_K: ql[128], qh[64], scales: i8[16], d: f16
                let d = f16_at(b, 208).to_f32();
                let mut out = [0f32; QK_K];
                for n in 0..2 {
                    let ql = &b[n * 64..n * 64 + 64];
                    let qh = &b[128 + n * 32..128 + n * 32 + 32];
                    let sc = &b[192 + n * 8..192 + n * 8 + 8];
                    let y = &mut out[n * 128..n * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| sc[is + k] as i8 as f32;
                        y[l] = d * s(0) * q1 as f32;
                        y[l + 32] = d * s(2) * q2 as f32;
                        y[l + 64] = d * s(4) * q3 as f32;
                        y[l + 96] = d * s(6) * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
    }
    Ok(y)
}
