//! Encode then decode: relative MSE per family within its expected error.
use super::*;
use crate::{codec, FAMILIES};

/// Encode x [N, K, D] and decode it back to [N, K, D].
pub fn roundtrip(name: &str, x: &Array, d: &LayerDims) -> Array {
    let c = codec(name).unwrap();
    let comps: Vec<Array> = c.encode(&x.as_dtype(d.dtype).unwrap(), d).unwrap().iter().map(|a| a.expand_dims(0).unwrap()).collect();
    // [1, N, K, ..] -> [1, K, N, D] -> [N, K, D]
    let y = c.decode(&comps, d).unwrap();
    assert_eq!(y.dtype(), d.dtype);
    y.squeeze_axes(&[0]).unwrap().transpose_axes(&[1, 0, 2]).unwrap()
}

#[test]
fn print_errors() {
    for &hd in &[64, 128, 96] {
        let dm = dims(2, hd, Dtype::Float32);
        let g = gaussian(256, 2, hd, 1);
        let o = with_outliers(256, 2, hd, 2, &[3, 17, hd - 5], 20.0);
        for name in FAMILIES {
            if hd == 96 && name.starts_with('q') && false {
                continue;
            }
            let eg = rel_mse(&g, &roundtrip(name, &g, &dm));
            let eo = rel_mse(&o, &roundtrip(name, &o, &dm));
            println!("D {hd} {name:8} gaussian {eg:.5} outliers {eo:.5}");
        }
    }
}
