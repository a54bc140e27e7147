//! GGML block formats -> f32, one function per type, written from the block
//! layouts of ggml (`ggml-common.h` / `ggml-quants.c`) and gguf-py's
//! `quants.py`. Every function computes in f32 in the same order as those
//! references, so the results are bit-identical to `gguf.quants.dequantize`
//! (tests/goldens/make_gguf_types.py records its values as fixtures).
//!
//! Block layouts (little-endian; `f16` = IEEE half, `QK_K` = 256):
//! ```text
//! Q4_0   32 el, 18 B: d f16 | qs[16]                 w = d * (q - 8)
//! Q4_1   32 el, 20 B: d f16 | m f16 | qs[16]         w = d * q + m
//! Q5_0   32 el, 22 B: d f16 | qh u32 | qs[16]        w = d * (q - 16)
//! Q5_1   32 el, 24 B: d f16 | m f16 | qh u32 | qs[16] w = d * q + m
//! Q8_0   32 el, 34 B: d f16 | qs i8[32]              w = d * q
//! IQ4_NL 32 el, 18 B: d f16 | qs[16]                 w = d * KVALUES[q]
//! Q2_K  256 el, 84 B: scales[16] | qs[64] | d | dmin   (16 sub-blocks of 16)
//! Q3_K  256 el,110 B: hmask[32] | qs[64] | scales[12] | d
//! Q4_K  256 el,144 B: d | dmin | scales[12] | qs[128]  (8 sub-blocks of 32)
//! Q5_K  256 el,176 B: d | dmin | scales[12] | qh[32] | qs[128]
//! Q6_K  256 el,210 B: ql[128] | qh[64] | scales i8[16] | d
//! IQ4_XS 256 el,136 B: d | scales_h u16 | scales_l[4] | qs[128]
//! ```
//! In the 32-element nibble formats, `qs[j]` holds element `j` in its low
//! nibble and element `j + 16` in its high nibble; Q5's fifth bit of element
//! `j` is bit `j` of `qh`.

use anyhow::{bail, Result};
use half::{bf16, f16};

use super::GgmlType;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// IQ4_NL / IQ4_XS non-linear code book.
pub const KVALUES_IQ4: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

type BlockFn = fn(&[u8], &mut Vec<f32>);

/// The dequantizer of a type: (elements per block, bytes per block, function).
fn dequantizer(t: GgmlType) -> Option<(usize, usize, BlockFn)> {
    Some(match t.0 {
        0 => (1, 4, f32_el as BlockFn),
        1 => (1, 2, f16_el),
        30 => (1, 2, bf16_el),
        2 => (32, 18, q4_0),
        3 => (32, 20, q4_1),
        6 => (32, 22, q5_0),
        7 => (32, 24, q5_1),
        8 => (32, 34, q8_0),
        10 => (QK_K, 84, q2_k),
        11 => (QK_K, 110, q3_k),
        12 => (QK_K, 144, q4_k),
        13 => (QK_K, 176, q5_k),
        14 => (QK_K, 210, q6_k),
        20 => (32, 18, iq4_nl),
        23 => (QK_K, 136, iq4_xs),
        _ => return None,
    })
}

/// Types [`dequantize`] handles.
pub const DEQUANTIZABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

pub fn can_dequantize(t: GgmlType) -> bool {
    dequantizer(t).is_some()
}

/// Dequantizes whole blocks of type `t` to f32, as ggml does.
pub fn dequantize(t: GgmlType, raw: &[u8]) -> Result<Vec<f32>> {
    let Some((el, bb, f)) = dequantizer(t) else {
        bail!("rmlx cannot dequantize GGML type {t}");
    };
    if !raw.len().is_multiple_of(bb) {
        bail!("{t} data length {} is not a multiple of its block size {bb}", raw.len());
    }
    let mut out = Vec::with_capacity(raw.len() / bb * el);
    for blk in raw.chunks_exact(bb) {
        f(blk, &mut out);
    }
    Ok(out)
}

fn h(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

fn f32_el(b: &[u8], y: &mut Vec<f32>) {
    y.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
}

fn f16_el(b: &[u8], y: &mut Vec<f32>) {
    y.push(h(b, 0));
}

fn bf16_el(b: &[u8], y: &mut Vec<f32>) {
    y.push(bf16::from_le_bytes([b[0], b[1]]).to_f32());
}

/// Element `j` (0..32) of a 16-byte nibble array.
fn nib(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0xF
    } else {
        qs[j - 16] >> 4
    }
}

fn q4_0(b: &[u8], y: &mut Vec<f32>) {
    let d = h(b, 0);
    y.extend((0..32).map(|j| d * (nib(&b[2..], j) as i32 - 8) as f32));
}

fn q4_1(b: &[u8], y: &mut Vec<f32>) {
    let (d, m) = (h(b, 0), h(b, 2));
    y.extend((0..32).map(|j| d * nib(&b[4..], j) as f32 + m));
}

/// The 5-bit codes (0..32) of a Q5_0/Q5_1 block whose `qh` starts at `off`.
pub fn q5_codes(b: &[u8], off: usize) -> [u8; 32] {
    let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    let qs = &b[off + 4..off + 20];
    std::array::from_fn(|j| nib(qs, j) | ((((qh >> j) & 1) as u8) << 4))
}

fn q5_0(b: &[u8], y: &mut Vec<f32>) {
    let d = h(b, 0);
    y.extend(q5_codes(b, 2).iter().map(|&q| d * (q as i32 - 16) as f32));
}

fn q5_1(b: &[u8], y: &mut Vec<f32>) {
    let (d, m) = (h(b, 0), h(b, 2));
    y.extend(q5_codes(b, 4).iter().map(|&q| d * q as f32 + m));
}

fn q8_0(b: &[u8], y: &mut Vec<f32>) {
    let d = h(b, 0);
    y.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

fn iq4_nl(b: &[u8], y: &mut Vec<f32>) {
    let d = h(b, 0);
    y.extend((0..32).map(|j| d * KVALUES_IQ4[nib(&b[2..], j) as usize] as f32));
}

/// Element `e` (0..256) of a 2-bit array laid out as ggml's Q2_K/Q3_K `qs`:
/// two halves of 128 elements; in each, bits `2s..2s+2` of byte `l` (0..32)
/// hold element `32s + l`.
fn crumb(qs: &[u8], e: usize) -> u8 {
    let (n, r) = (e / 128, e % 128);
    (qs[n * 32 + r % 32] >> (2 * (r / 32))) & 3
}

fn q2_k(b: &[u8], y: &mut Vec<f32>) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (h(b, 80), h(b, 82));
    for e in 0..QK_K {
        let sc = scales[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        y.push(dl * crumb(qs, e) as f32 - ml);
    }
}

fn q3_k(b: &[u8], y: &mut Vec<f32>) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = h(b, 108);
    // 16 6-bit signed scales: low nibbles from bytes 0..8 (low then high
    // nibble), top two bits from bytes 8..12 (bit pairs 0..4).
    let scale = |i: usize| -> f32 {
        let lo = (sc[i % 8] >> (4 * (i / 8))) & 0xF;
        let hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        ((lo | (hi << 4)) as i8 - 32) as f32
    };
    for e in 0..QK_K {
        let dl = d * scale(e / 16);
        // A clear hmask bit means the code is offset by -4.
        let hbit = (hmask[e % 32] >> (e / 32)) & 1;
        let q = crumb(qs, e) as i8 - if hbit == 0 { 4 } else { 0 };
        y.push(dl * q as f32);
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

/// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; `qh`
/// (Q5_K only) adds a fifth bit.
fn q45_k(b: &[u8], qh: Option<&[u8]>, ql: &[u8], y: &mut Vec<f32>) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    for sub in 0..8 {
        let (sc, m) = scale_min_k4(sub, scales);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        // Sub-blocks pair up on 32 bytes of ql: even = low nibbles, odd = high.
        let bytes = &ql[(sub / 2) * 32..(sub / 2) * 32 + 32];
        for l in 0..32 {
            let lo = if sub % 2 == 0 { bytes[l] & 0xF } else { bytes[l] >> 4 };
            let hi = qh.map_or(0, |qh| ((qh[l] >> sub) & 1) << 4);
            y.push(dl * (lo | hi) as f32 - ml);
        }
    }
}

fn q4_k(b: &[u8], y: &mut Vec<f32>) {
    q45_k(b, None, &b[16..144], y);
}

fn q5_k(b: &[u8], y: &mut Vec<f32>) {
    q45_k(b, Some(&b[16..48]), &b[48..176], y);
}

fn q6_k(b: &[u8], y: &mut Vec<f32>) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = h(b, 208);
    let mut out = [0f32; QK_K];
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..]);
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &q) in q.iter().enumerate() {
                let s = sc[is + 2 * k] as i8 as f32;
                out[n * 128 + 32 * k + l] = d * s * (q as i32 - 32) as f32;
            }
        }
    }
    y.extend_from_slice(&out);
}

fn iq4_xs(b: &[u8], y: &mut Vec<f32>) {
    let d = h(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for ib in 0..8 {
        let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * ((lo | (hi << 4)) as i8 - 32) as f32;
        let qs = &qs[ib * 16..ib * 16 + 16];
        y.extend((0..32).map(|j| dl * KVALUES_IQ4[nib(qs, j) as usize] as f32));
    }
}
