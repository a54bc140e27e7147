//! A GGUF writer and the block encoders (Q8_0, Q4_0/Q4_1) the tests' files
//! are made with.
use super::*;

pub(super) fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

pub(super) fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.push(*x as u8),
        GgufValue::U16(x) => b.extend(x.to_le_bytes()),
        GgufValue::I16(x) => b.extend(x.to_le_bytes()),
        GgufValue::U32(x) => b.extend(x.to_le_bytes()),
        GgufValue::I32(x) => b.extend(x.to_le_bytes()),
        GgufValue::F32(x) => b.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::U64(x) => b.extend(x.to_le_bytes()),
        GgufValue::I64(x) => b.extend(x.to_le_bytes()),
        GgufValue::F64(x) => b.extend(x.to_le_bytes()),
        GgufValue::Array(t, items) => {
            b.extend((*t as u32).to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, i);
            }
        }
    }
}

pub(super) fn vtype(v: &GgufValue) -> u32 {
    (match v {
        GgufValue::U8(_) => GgufValueType::U8,
        GgufValue::I8(_) => GgufValueType::I8,
        GgufValue::U16(_) => GgufValueType::U16,
        GgufValue::I16(_) => GgufValueType::I16,
        GgufValue::U32(_) => GgufValueType::U32,
        GgufValue::I32(_) => GgufValueType::I32,
        GgufValue::F32(_) => GgufValueType::F32,
        GgufValue::Bool(_) => GgufValueType::Bool,
        GgufValue::String(_) => GgufValueType::String,
        GgufValue::Array(..) => GgufValueType::Array,
        GgufValue::U64(_) => GgufValueType::U64,
        GgufValue::I64(_) => GgufValueType::I64,
        GgufValue::F64(_) => GgufValueType::F64,
    }) as u32
}

pub(super) struct TestTensor {
    pub(super) name: String,
    pub(super) dims: Vec<u64>,
    pub(super) ty: GgmlType,
    pub(super) data: Vec<u8>,
}

pub(super) fn write_gguf(path: &Path, version: u32, kv: &[(&str, GgufValue)], tensors: &[TestTensor]) {
    let align = 32usize;
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        b.extend(vtype(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut off = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.0.to_le_bytes());
        b.extend((off as u64).to_le_bytes());
        offsets.push(off);
        off = (off + t.data.len()).div_ceil(align) * align;
    }
    b.resize(b.len().div_ceil(align) * align, 0);
    let start = b.len();
    for (t, o) in tensors.iter().zip(offsets) {
        b.resize(start + o, 0);
        b.extend(&t.data);
    }
    std::fs::write(path, b).unwrap();
}


pub(super) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Q8_0-encode rows (absmax / 127 like llama.cpp).
pub(super) fn enc_q8_0(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in v.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(blk.iter().map(|x| ((x * id).round() as i8) as u8));
    }
    out
}

pub(super) fn enc_q4(v: &[f32], with_min: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in v.chunks(32) {
        let (mn, mx) = blk
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let q: Vec<u8> = if with_min {
            let d = (mx - mn) / 15.0;
            out.extend(f16::from_f32(d).to_bits().to_le_bytes());
            out.extend(f16::from_f32(mn).to_bits().to_le_bytes());
            blk.iter()
                .map(|x| (((x - mn) / d).round() as i32).clamp(0, 15) as u8)
                .collect()
        } else {
            let d = (if mx.abs() > mn.abs() { mx } else { mn }) / -8.0;
            out.extend(f16::from_f32(d).to_bits().to_le_bytes());
            blk.iter()
                .map(|x| ((x / d + 8.5) as i32).clamp(0, 15) as u8)
                .collect()
        };
        for j in 0..16 {
            out.push(q[j] | (q[j + 16] << 4));
        }
    }
    out
}

/// llama.cpp's `permute` (HF -> GGUF) on rows of `cols` values.
pub(super) fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub(super) fn pattern(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}

/// GPT-2 byte -> unicode table.
pub(super) fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}
