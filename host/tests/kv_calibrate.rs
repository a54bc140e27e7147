//! `rmlx kv-calibrate` (engine/kv_calibration.rs): writes per-layer key and
//! value means beside the weights and lists the families that use them; a
//! later load gives those families one calibrated codec per layer, which
//! serves generation through the paged pool and keys the prefix cache apart
//! from uncalibrated blocks; a calibration of another model is refused.
mod common;

use rmlx::engine::kv_calibration::{KvCalibration, FILE};
use rmlx::engine::kv_family::{self, KvChoice};
use rmlx::engine::{generate::generate, GenerateOptions, LoadedModel};
use std::path::Path;
use std::process::Command;

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The tiny llama with the 256-token fixture tokenizer.
fn tiny_model(to: &Path) {
    copy_dir(&common::fixture("models/llama-f32"), to);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::fixture("tokenizers/tiny256").join(f), to.join(f)).unwrap();
    }
}

fn calibrate(dir: &Path) -> serde_json::Value {
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "kv-calibrate", "-m", dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(out.stdout.split(|&b| b == b'\n').find(|l| l.starts_with(b"{")).unwrap()).unwrap()
}

#[test]
fn kv_calibrate_writes_means_that_calibrated_families_load_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    let v = calibrate(tmp.path());
    assert!(tmp.path().join(FILE).exists());
    let uses: Vec<&str> = v["families_using_it"].as_array().unwrap().iter().map(|f| f["family"].as_str().unwrap()).collect();
    let none: Vec<&str> = v["families_needing_none"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(uses.contains(&"turbo3") && uses.contains(&"rotor4"), "{v}");
    assert!(none.contains(&"q8") && none.contains(&"f32"), "{v}");

    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut model = LoadedModel::load(tmp.path(), &reg).unwrap();
    let n = model.spec.num_layers as usize;
    let cal = model.kv_calibration.clone().expect("the calibration loads with the model");
    assert_eq!(cal.layers.iter().filter(|l| l.is_some()).count(), n);
    let (k, _) = cal.layers[0].as_ref().unwrap();
    assert_eq!(k.shape(), &[model.spec.num_kv_heads as i32, model.spec.head_dim as i32]);
    // turbo3 keys get a codec per layer and a calibration key (values stay
    // uncentered); f32 keys none.
    let choice = KvChoice { k: Some("turbo3".into()), v: Some("turbo3".into()) };
    let (ks, vs) = kv_family::resolve(&reg, &model.spec, model.kv.0.dims.dtype, &choice, Some(&cal)).unwrap();
    assert_eq!((ks.layer_codecs.len(), vs.layer_codecs.len()), (n, 0));
    assert_eq!(ks.calibration, Some(cal.hash));
    let (ks, _) = kv_family::resolve(&reg, &model.spec, model.kv.0.dims.dtype, &KvChoice { k: Some("f32".into()), v: None }, Some(&cal)).unwrap();
    assert!(ks.layer_codecs.is_empty() && ks.calibration.is_none());
    // Generation through the calibrated family runs.
    model.kv = kv_family::resolve(&reg, &model.spec, model.kv.0.dims.dtype, &choice, Some(&cal)).unwrap();
    let opts = GenerateOptions { max_tokens: 8, temperature: 0.0, top_p: 1.0, seed: None, stop_ids: vec![], prefill_chunk: 512 };
    let out = generate(&mut model, &[3, 14, 15, 9, 26], &opts, |_| {}).unwrap();
    assert_eq!(out.tokens.len(), 8);
}

#[test]
fn a_calibration_for_another_shape_is_refused_by_name() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&common::fixture("models/llama-f32"), tmp.path());
    let mut model = LoadedModel::load(tmp.path(), &reg).unwrap();
    let cal = KvCalibration::fit(&mut model, &[3, 14, 15, 9, 26, 5, 3], 4).unwrap();
    // Written for more layers than the model has: refused at load.
    let mut more = KvCalibration { hash: 0, layers: cal.layers.clone(), tokens: 7 };
    more.layers.push(cal.layers[0].clone());
    more.save(&tmp.path().join(FILE)).unwrap();
    let err = LoadedModel::load(tmp.path(), &reg).err().unwrap().to_string();
    assert!(err.contains("kv-calibrate"), "{err}");
    assert!(KvCalibration::fit(&mut model, &[3], 4).is_err());
}
