//! `rmlx info --model DIR`: architecture, parameters, dtype, per-layer
//! quantization, size on disk, and which plugins would serve it. Reads only
//! config.json and the safetensors headers.
use crate::config::Settings;
use crate::model::{quant::Quant, safetensors::read_header, ModelDir, QuantSpec};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (MLX layout), or a Hugging Face repo id (org/name:
    /// from the hub cache, downloaded when missing).
    #[arg(long)]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let dir = ModelDir::open(&crate::hub::resolve_dir(&args.model)?)?;
    let quant = QuantSpec::from_config(&dir.config)?;
    let mut tensors = BTreeMap::new();
    for f in &dir.weight_files {
        tensors.extend(read_header(f)?);
    }
    let mut params: u64 = 0;
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut layers: BTreeMap<String, Quant> = BTreeMap::new();
    for (name, t) in &tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        let (module, local) = name.rsplit_once('.').unwrap_or(("", name));
        let quantized = tensors.contains_key(&format!("{module}.scales"));
        match local {
            "scales" | "biases" if quantized => continue,
            "weight" => {
                let q = quant.for_tensors(module, &|l| tensors.contains_key(&format!("{module}.{l}")));
                let packed = match t.dtype.as_str() {
                    "U32" => 32,
                    "U8" => 8, // BitNet: four ternary codes a byte
                    _ => 0,
                };
                if q.mode != "none" && q.bits > 0 && packed > 0 {
                    params += n * packed / q.bits as u64;
                } else {
                    params += n;
                    *dtypes.entry(t.dtype.clone()).or_default() += n;
                }
                if t.shape.len() == 2 {
                    layers.insert(module.to_string(), q);
                }
            }
            _ => {
                params += n;
                *dtypes.entry(t.dtype.clone()).or_default() += n;
            }
        }
    }
    let dtype = dtypes.iter().max_by_key(|(_, n)| **n).map(|(d, _)| d.clone()).unwrap_or_default();
    let mut by_format: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (m, q) in &layers {
        by_format.entry(q.describe()).or_default().push(m);
    }
    // Which plugins would serve it.
    let reg = crate::plugins::Registry::load(&settings.plugins_dir());
    let mut serving: BTreeMap<String, String> = BTreeMap::new();
    let lookup = |r: Result<&crate::plugins::LoadedPlugin>| match r {
        Ok(p) => p.info.id.clone(),
        Err(e) => format!("none ({e})"),
    };
    match &reg {
        Ok(reg) => {
            serving.insert(format!("architecture {}", dir.model_type), lookup(reg.architecture_plugin(&dir.model_type)));
            let modes: std::collections::BTreeSet<&str> = layers.values().map(|q| q.mode.as_str()).collect();
            for m in modes {
                serving.insert(format!("weight-quant {m}"), lookup(reg.weight_quant_plugin(m)));
            }
        }
        Err(e) => {
            serving.insert("plugins".into(), format!("unavailable: {e:#}"));
        }
    }
    let method = quant.method_name().map(String::from);
    if let (Some(m), Ok(reg)) = (&method, &reg) {
        if let Err(e) = quant.check_method(&|mode| reg.weight_quant_plugin(mode).is_ok()) {
            serving.insert(format!("quant_method {m}"), format!("none ({e:#})"));
        }
    }
    let size = dir.size_on_disk();
    if args.json {
        let formats: BTreeMap<_, _> = by_format.iter().map(|(k, v)| (k.clone(), v.len())).collect();
        let layer_map: BTreeMap<_, _> = layers.iter().map(|(k, q)| (k.clone(), q.describe())).collect();
        println!(
            "{}",
            serde_json::json!({
                "path": dir.path, "model_type": dir.model_type, "parameters": params, "dtype": dtype,
                "size_bytes": size, "weight_files": dir.weight_files.len(), "formats": formats,
                "layers": layer_map, "plugins": serving, "quant_method": method,
            })
        );
        return Ok(());
    }
    println!("model        {}", dir.path.display());
    println!("architecture {}", dir.model_type);
    println!("parameters   {} ({:.1}M)", params, params as f64 / 1e6);
    println!("dtype        {}", dtype);
    println!("size on disk {:.1} MB in {} file(s)", size as f64 / 1e6, dir.weight_files.len());
    match &method {
        Some(m) => println!("quantization (quant_method {m})"),
        None => println!("quantization"),
    }
    for (fmt, modules) in &by_format {
        let shown = if modules.len() <= 4 { format!(": {}", modules.join(", ")) } else { String::new() };
        println!("  {:<20} {} layers{}", fmt, modules.len(), shown);
    }
    println!("plugins");
    for (what, id) in &serving {
        println!("  {:<28} {}", what, id);
    }
    Ok(())
}
