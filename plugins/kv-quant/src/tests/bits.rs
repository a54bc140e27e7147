//! Bits per value: what the module docs state, what `bits_per_value` says,
//! and what `encode` really writes all agree.
use super::*;
use crate::{codec, FAMILIES};

/// The documented formula: `dtype_bits` is the activation dtype's width.
fn documented(name: &str, d: i32, dtype_bits: f32) -> f32 {
    let df = d as f32;
    let padded = |b: i32| (b * 32 * ((d + 31) / 32)) as f32 / df; // bit-plane words
    if name == "fp8" {
        8.0 + 16.0 / df
    } else if let Some(b) = name.strip_prefix('q') {
        let g = if d % 64 == 0 { 64.0 } else { 32.0 };
        b.parse::<f32>().unwrap() + 2.0 * dtype_bits / g
    } else {
        let b: i32 = name.chars().filter(char::is_ascii_digit).collect::<String>().parse().unwrap();
        if name.ends_with('q') {
            padded(b - 1) + padded(1) + 2.0 * dtype_bits / df
        } else {
            padded(b) + dtype_bits / df
        }
    }
}

#[test]
fn bits_per_value_is_what_the_docs_say() {
    for name in FAMILIES {
        for (dtype, dbits) in [(Dtype::Bfloat16, 16.0), (Dtype::Float32, 32.0)] {
            for hd in [64, 128, 96] {
                let c = codec(name).unwrap();
                let dm = dims(2, hd, dtype);
                let want = documented(name, hd, dbits);
                let got = c.bits_per_value(&dm);
                assert!((got - want).abs() < 1e-5, "{name} D {hd} {dtype:?}: {got} vs {want}");
                // What encode writes, per value.
                let x = gaussian(8, 2, hd, 3).as_dtype(dtype).unwrap();
                let comps = c.encode(&x, &dm).unwrap();
                let spec = c.components(&dm);
                assert_eq!(comps.len(), spec.len(), "{name}");
                for (a, s) in comps.iter().zip(&spec) {
                    assert_eq!(a.dtype(), s.dtype, "{name} {}", s.name);
                    assert_eq!(&a.shape()[1..], &s.shape[..], "{name} {}", s.name);
                }
                let bytes: usize = comps.iter().map(|a| a.nbytes()).sum();
                let measured = (bytes * 8) as f32 / (8 * 2 * hd) as f32;
                assert!((measured - want).abs() < 1e-5, "{name} D {hd}: wrote {measured} bits per value");
            }
        }
    }
}

#[test]
fn the_crate_table_holds_at_d128_bf16() {
    let table = [
        ("fp8", 8.125),
        ("q8", 8.5),
        ("q4", 4.5),
        ("q2", 2.5),
        ("turbo4", 4.125),
        ("turbo3", 3.125),
        ("turbo2", 2.125),
        ("turbo4q", 4.25),
        ("turbo3q", 3.25),
        ("planar4", 4.125),
        ("planar3", 3.125),
        ("iso4", 4.125),
        ("iso3", 3.125),
        ("rotor4", 4.125),
        ("rotor3", 3.125),
        ("rotor4q", 4.25),
        ("rotor3q", 3.25),
    ];
    assert_eq!(table.len(), FAMILIES.len());
    for (name, bits) in table {
        assert_eq!(codec(name).unwrap().bits_per_value(&dims(8, 128, Dtype::Bfloat16)), bits, "{name}");
    }
}

#[test]
fn unknown_names_and_bad_head_dims_are_refused() {
    assert!(codec("turbo5").is_none());
    assert!(codec("").is_none());
    // refused by `check` (what the host asks at load) and by `encode`
    let (q4, d40) = (codec("q4").unwrap(), dims(2, 40, Dtype::Float32));
    assert!(q4.check(&d40).unwrap_err().to_string().contains("not a multiple of 32"));
    let err = q4.encode(&gaussian(2, 2, 40, 1), &d40).unwrap_err();
    assert!(err.to_string().contains("not a multiple of 32"), "{err}");
    let (t3, d4) = (codec("turbo3").unwrap(), dims(2, 4, Dtype::Float32));
    assert!(t3.check(&d4).unwrap_err().to_string().contains("too small"));
    let err = t3.encode(&gaussian(2, 2, 4, 1), &d4).unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    for name in FAMILIES {
        for hd in [64, 128, 96] {
            codec(name).unwrap().check(&dims(2, hd, Dtype::Bfloat16)).unwrap();
        }
    }
}
