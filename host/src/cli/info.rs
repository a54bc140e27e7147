//! `rmlx info --model DIR`: architecture, parameters, dtype, per-layer
//! quantization, size on disk, and which plugins would serve it. Reads only
//! config.json and the safetensors headers.
use crate::config::Settings;
use crate::model::ModelDir;
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
    let quant = crate::model::QuantSpec::from_config(&dir.config)?;
    let msize = crate::model::params::ModelSize::read(&dir)?;
    let (params, layers) = (msize.params, &msize.layers);
    let dtype = msize.main_dtype();
    let policy = crate::model::policy::resolve(&dir)?;
    let mut by_format: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (m, q) in layers {
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
                "load_policy": {"dtype": policy.dtype_name(), "dequantize": policy.policy.dequantize, "why": policy.why},
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
    println!("load policy  {} ({})", policy.summary(), policy.why);
    println!("plugins");
    for (what, id) in &serving {
        println!("  {:<28} {}", what, id);
    }
    Ok(())
}
