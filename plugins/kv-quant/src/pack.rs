//! Bit-plane packing of `b`-bit codes into uint32 words.
//!
//! Layout, for codes `[.., D]` and `W = ceil(D / 32)` words per plane:
//! words `[.., b * W]`, where plane `j` (bit `j` of every code) fills words
//! `j * W .. (j + 1) * W`, and bit `i` of word `j * W + w` is bit `j` of code
//! `32 * w + i`. So a code costs exactly `b` bits when `D` is a multiple of 32
//! (codes past `D` are zero padding otherwise), for any `b` (3 bits included),
//! and a kernel reads code `c` with one shift per plane.
use mlx_rs::{
    ops::{concatenate, zeros_dtype},
    Array, Dtype,
};
use rmlx_plugin_api::author::Result;

/// Words per vector of `d` codes of `bits` bits.
pub fn words(d: i32, bits: i32) -> i32 {
    bits * ((d + 31) / 32)
}

/// [32] uint32: 1, 2, 4, ..., 2^31.
fn powers32() -> Array {
    Array::from_iter((0..32).map(|i| 1u32 << i), &[32])
}

/// codes uint32 [.., D] (each < 2^bits) -> words uint32 [.., bits * ceil(D/32)].
pub fn pack(codes: &Array, bits: i32) -> Result<Array> {
    let shape = codes.shape().to_vec();
    let (lead, d) = (&shape[..shape.len() - 1], shape[shape.len() - 1]);
    let w = (d + 31) / 32;
    let mut c = codes.as_dtype(Dtype::Uint32)?;
    if w * 32 != d {
        let mut pad_shape = lead.to_vec();
        pad_shape.push(w * 32 - d);
        c = concatenate(&[c, zeros_dtype(&pad_shape, Dtype::Uint32)?], -1)?;
    }
    let mut split = lead.to_vec();
    split.extend([w, 32]);
    let pow = powers32();
    let mut planes = Vec::with_capacity(bits as usize);
    for j in 0..bits {
        // bit j of every code: [.., W, 32] -> one word per 32 codes [.., W]
        let bit = c.floor_divide(Array::from_slice(&[1u32 << j], &[1]))?.remainder(Array::from_slice(&[2u32], &[1]))?;
        planes.push(bit.reshape(&split)?.multiply(&pow)?.sum_axis(-1, false)?.as_dtype(Dtype::Uint32)?);
    }
    Ok(concatenate(&planes, -1)?)
}

/// words uint32 [.., bits * ceil(D/32)] -> codes uint32 [.., D].
pub fn unpack(words_: &Array, bits: i32, d: i32) -> Result<Array> {
    let shape = words_.shape().to_vec();
    let lead = &shape[..shape.len() - 1];
    let w = (d + 31) / 32;
    // [.., bits, W, 1] // 2^i % 2 -> [.., bits, W, 32] -> [.., bits, W*32]
    let mut s = lead.to_vec();
    s.extend([bits, w, 1]);
    let bitsv = words_.reshape(&s)?.floor_divide(powers32())?.remainder(Array::from_slice(&[2u32], &[1]))?;
    let mut s2 = lead.to_vec();
    s2.extend([bits, w * 32]);
    let planes = bitsv.reshape(&s2)?;
    // sum_j plane_j * 2^j: [.., bits, W*32] * [bits, 1] -> [.., W*32]
    let weights = Array::from_iter((0..bits).map(|j| 1u32 << j), &[bits, 1]);
    let codes = planes.multiply(&weights)?.sum_axis(-2, false)?.as_dtype(Dtype::Uint32)?;
    if w * 32 == d {
        Ok(codes)
    } else {
        Ok(codes.take_axis(Array::from_iter(0..d, &[d]), -1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout as the doc comment states it, in plain Rust.
    fn pack_ref(codes: &[u32], bits: i32) -> Vec<u32> {
        let w = codes.len().div_ceil(32);
        let mut out = vec![0u32; bits as usize * w];
        for (i, &c) in codes.iter().enumerate() {
            for j in 0..bits as usize {
                out[j * w + i / 32] |= ((c >> j) & 1) << (i % 32);
            }
        }
        out
    }

    #[test]
    fn pack_matches_layout_and_roundtrips() {
        for &(bits, d) in &[(1, 64), (2, 64), (3, 64), (4, 128), (3, 96), (4, 80), (2, 40)] {
            let n = 3;
            let codes: Vec<u32> = (0..n * d).map(|i| ((i * 7 + i / 5) as u32) % (1 << bits)).collect();
            let a = Array::from_slice(&codes, &[n, d]);
            let p = pack(&a, bits).unwrap();
            assert_eq!(p.shape(), &[n, words(d, bits)]);
            let got: Vec<u32> = p.contiguous().unwrap().as_slice::<u32>().to_vec();
            let want: Vec<u32> = (0..n as usize)
                .flat_map(|r| pack_ref(&codes[r * d as usize..(r + 1) * d as usize], bits))
                .collect();
            assert_eq!(got, want, "bits {bits} d {d}");
            let u = unpack(&p, bits, d).unwrap();
            assert_eq!(u.contiguous().unwrap().as_slice::<u32>(), &codes[..], "bits {bits} d {d}");
        }
    }
}
