//! `rmlx convert` MLX -> MLX and Hugging Face -> MLX: models converted by rmlx
//! load in mlx-lm (dev venv) and give the same greedy tokens and logits as in
//! rmlx, quantized modules are bit-identical to `mx.quantize` of the source,
//! and bad input is one clear error with nothing left behind.
mod common;

use common::golden::rel_err;

use rmlx::convert::mlx::{convert_dir, MlxOptions};
use rmlx::engine::{sampler, LoadedModel, Session};
use std::path::{Path, PathBuf};
use std::process::Command;

const REL_TOL: f32 = 1e-4;
const MARGIN: f32 = 1e-3;

fn opts(quant: Option<&str>, layers: &[&str]) -> MlxOptions {
    MlxOptions {
        quant: quant.map(str::to_string),
        group_size: None,
        layers: layers.iter().map(|s| s.to_string()).collect(),
        force: false,
        progress: false,
    }
}

fn mlx_lm_check(src: &Path, dst: &Path) -> serde_json::Value {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(py.exists(), "no dev venv: run `make dev-venv`");
    let out = dst.with_extension("check.json");
    let o = Command::new(py)
        .arg(common::repo().join("tests/goldens/convert_check.py"))
        .arg(src)
        .arg(dst)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "convert_check.py failed on {}:\n{}", dst.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// rmlx on `dst` against mlx-lm on `dst` (teacher-forced, as in goldens.rs).
fn compare(name: &str, dst: &Path, check: &serde_json::Value, reg: &rmlx::plugins::Registry, failures: &mut Vec<String>) {
    let mut model = LoadedModel::load(dst, reg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    for case in check["prompts"].as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt"].clone()).unwrap();
        let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let logits: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
        let margins: Vec<f32> = serde_json::from_value(case["margins"].clone()).unwrap();
        let mut session = Session::new(&mut model);
        let mut ours = session.prefill(&prompt).unwrap();
        for (step, want) in tokens.iter().enumerate() {
            let err = rel_err(&ours, &logits[step]);
            if err > REL_TOL {
                failures.push(format!("{name} {prompt:?} step {step}: relative error {err:e}"));
            }
            if margins[step] > MARGIN && sampler::argmax(&ours) != *want {
                failures.push(format!("{name} {prompt:?} step {step}: greedy {} != mlx-lm {want}", sampler::argmax(&ours)));
            }
            if step + 1 < tokens.len() {
                ours = session.step(*want).unwrap();
            }
        }
    }
    let bad = check["bit_mismatches"].as_array().unwrap();
    if !bad.is_empty() {
        failures.push(format!("{name}: not bit-identical to mx.quantize: {bad:?}"));
    }
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn converted_models_match_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    // (name, source fixture, --quant, --layer rules, src is dense -> bit check)
    let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
        ("llama-q4", "llama-f32", Some("q4"), &[]),
        ("llama-q3-g32", "llama-f32", Some("q3:32"), &[]),
        ("qwen3-q6-g128", "qwen3-f32", Some("q6:128"), &[]),
        ("llama-mxfp4", "llama-f32", Some("mxfp4"), &[]),
        ("qwen3-mxfp8", "qwen3-f32", Some("mxfp8"), &[]),
        ("llama-tied-nvfp4", "llama-tied-f32", Some("nvfp4"), &[]),
        (
            "llama-recipe",
            "llama-f32",
            Some("q4"),
            &["embed_tokens=q8", "lm_head=q6", "self_attn=nvfp4", "layers.1.mlp.*=bf16"],
        ),
        ("qwen3-layers-only", "qwen3-f32", None, &["mlp=mxfp4"]),
        // MLX -> MLX: re-quantize between modes, dequantize.
        ("requant-q4-to-mxfp8", "llama-q4-g64", Some("mxfp8"), &[]),
        ("requant-mixed-fp-to-q8", "qwen3-mixed-fp", Some("q8"), &[]),
        ("dequant-mixed-3-6-f32", "llama-mixed-3-6", Some("f32"), &[]),
        ("dequant-nvfp4-bf16", "llama-tied-nvfp4", Some("bf16"), &[]),
        ("keep-mixed-fp", "qwen3-mixed-fp", None, &[]),
    ];
    let mut failures = Vec::new();
    for (name, src, quant, layers) in cases {
        let src = common::fixture(&format!("models/{src}"));
        let dst = tmp.path().join(name);
        let report = convert_dir(&src, &dst, &opts(*quant, layers)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        eprintln!("{name}: {:.3} bits per weight, {:?}", report.bits_per_weight(), report.formats);
        let check = mlx_lm_check(&src, &dst);
        compare(name, &dst, &check, &reg, &mut failures);
        let q = config(&dst).get("quantization").cloned();
        match *quant {
            Some("f32") | Some("bf16") => assert!(q.is_none(), "{name}: dequantized but config has quantization"),
            _ => assert!(q.is_some(), "{name}: no quantization section"),
        }
        if src.ends_with("llama-f32") || src.ends_with("qwen3-f32") || src.ends_with("llama-tied-f32") {
            assert!(check["quantized_modules"].as_u64().unwrap() > 0, "{name}: no quantized module checked");
        }
    }
    // The recipe wrote what it was asked.
    let q = config(&tmp.path().join("llama-recipe"))["quantization"].clone();
    assert_eq!(q["mode"], "affine");
    assert_eq!(q["bits"], 4);
    assert_eq!(q["model.embed_tokens"]["bits"], 8);
    assert_eq!(q["lm_head"]["bits"], 6);
    assert_eq!(q["model.layers.0.self_attn.q_proj"]["mode"], "nvfp4");
    assert!(q.get("model.layers.1.mlp.up_proj").is_none());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// A Hugging Face-style checkpoint made from the llama fixture: bf16, two
/// shards with an index, an `inv_freq` buffer, tokenizer and template files.
fn make_hf(dir: &Path) {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir).unwrap();
    let src = common::fixture("models/llama-f32");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for n in &names {
        let t = st.tensor(n).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        let data: Vec<u8> = t
            .data()
            .chunks_exact(4)
            .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        owned.push((n.clone(), t.shape().to_vec(), data));
    }
    let inv: Vec<u8> = (0..8).flat_map(|i| (1.0f32 / 10000f32.powf(i as f32 / 8.0)).to_le_bytes()).collect();
    owned.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), vec![8], inv));
    let half_at = owned.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, chunk) in [&owned[..half_at], &owned[half_at..]].iter().enumerate() {
        let fname = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|(n, shape, d)| {
                let dt = if n.ends_with("inv_freq") { Dtype::F32 } else { Dtype::BF16 };
                (n.clone(), TensorView::new(dt, shape.clone(), d).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&fname)).unwrap();
        for (n, _, _) in chunk.iter() {
            map.insert(n.clone(), serde_json::json!(fname));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    let mut cfg = config(&src);
    cfg["torch_dtype"] = "bfloat16".into();
    cfg["transformers_version"] = "4.51.0".into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages }}").unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
}

#[test]
fn hugging_face_bf16_checkpoint_to_mlx() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    make_hf(&hf);
    let mut failures = Vec::new();
    for (name, quant, layers) in [
        ("hf-q4-recipe", Some("q4"), &["embed_tokens=q8", "lm_head=mxfp8"][..]),
        ("hf-nvfp4", Some("nvfp4"), &[][..]),
        ("hf-bf16", None, &[][..]),
        ("hf-f32", Some("f32"), &[][..]),
    ] {
        let dst = tmp.path().join(name);
        let report = convert_dir(&hf, &dst, &opts(quant, layers)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(report.warnings.iter().any(|w| w.contains("inv_freq")), "{name}: {:?}", report.warnings);
        for f in ["tokenizer_config.json", "chat_template.jinja", "generation_config.json", "model.safetensors.index.json"] {
            assert!(dst.join(f).is_file(), "{name}: {f} not written");
        }
        let check = mlx_lm_check(&hf, &dst);
        compare(name, &dst, &check, &reg, &mut failures);
        if quant.is_some_and(|q| q != "f32") {
            assert!(check["quantized_modules"].as_u64().unwrap() >= 15, "{name}: {check:?}");
        }
    }
    // Scales of affine modules quantized from bf16 are bf16, as in mlx-lm.
    let h = rmlx::model::safetensors::read_header(&tmp.path().join("hf-q4-recipe/model.safetensors")).unwrap();
    assert_eq!(h["model.layers.0.mlp.up_proj.scales"].dtype, "BF16");
    assert_eq!(h["lm_head.scales"].dtype, "U8");
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

fn rmlx(args: &[&str]) -> (bool, String) {
    let o = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "convert", "--quiet"])
        .args(args)
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).trim().to_string())
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect()
}

#[test]
fn bad_input_is_one_clear_error_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("models/llama-f32");
    let src = src.to_str().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--quant", "q7"], "mode affine supports bits [2, 3, 4, 5, 6, 8], not 7"),
        (&["--quant", "fp4"], "unknown quantization \"fp4\""),
        (&["--quant", "mxfp4", "--group-size", "64"], "mode mxfp4 supports group sizes [32], not 64"),
        (&["--quant", "nvfp4", "--group-size", "32"], "mode nvfp4 supports group sizes [16], not 32"),
        (&["--quant", "q4", "--group-size", "48"], "mode affine supports group sizes [32, 64, 128], not 48"),
        (&["--layer", "embed_tokens"], "expected PATTERN=SPEC"),
        (&["--layer", "embed_tokens=q9"], "not 9"),
        (&["--group-size", "32"], "--group-size needs --quant"),
    ];
    for (args, want) in cases {
        let mut a = vec!["--model", src, "--output", out_s];
        a.extend_from_slice(args);
        let (ok, err) = rmlx(&a);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // A truncated weight file.
    let bad = tmp.path().join("truncated");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(common::fixture("models/llama-f32/config.json"), bad.join("config.json")).unwrap();
    let w = std::fs::read(common::fixture("models/llama-f32/model.safetensors")).unwrap();
    std::fs::write(bad.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let (ok, err) = rmlx(&["--model", bad.to_str().unwrap(), "--output", out_s, "--quant", "q4"]);
    assert!(!ok && err.contains("truncated"), "{err}");
    assert!(!out.exists());
    // An existing output directory is refused, and left as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let (ok, err) = rmlx(&["--model", src, "--output", out_s, "--quant", "q4"]);
    assert!(!ok && err.contains("already exists (use --force"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // --force replaces it.
    let (ok, err) = rmlx(&["--model", src, "--output", out_s, "--quant", "q4", "--force"]);
    assert!(ok, "{err}");
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
    assert!(leftovers(tmp.path()).is_empty(), "temporary directories left: {:?}", leftovers(tmp.path()));
}
