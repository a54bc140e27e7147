//! `rmlx kv-calibrate`: fits what the calibrated KV families use (per layer
//! and KV head, the mean key and the mean value over a text) and writes it
//! beside the weights, as `kv_calibration.safetensors`; every later load of
//! the model gives those families one codec per layer (engine/kv_calibration.rs).
use super::textgen::Model;
use crate::config::Settings;
use crate::engine::kv_calibration::{KvCalibration, FILE};
use anyhow::{bail, Context, Result};
use rmlx_plugin_api::author::kv::KvCodecImpl;
use std::path::PathBuf;

/// The text used when no `--file` is given: prose, dialogue, code, numbers
/// and a few other languages.
const DEFAULT_TEXT: &str = include_str!("../../assets/kv_calibration.txt");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (MLX layout) or Hugging Face repo id (org/name)
    #[arg(short = 'm', long, value_name = "DIR|REPO")]
    model: PathBuf,
    /// Calibration text [default: a built-in mix of prose, dialogue and code]
    #[arg(long, value_name = "TEXT")]
    file: Option<PathBuf>,
    /// Use at most this many tokens of the text [default: 2048]
    #[arg(long, default_value_t = 2048, value_name = "N")]
    tokens: usize,
    /// Where to write [default: kv_calibration.safetensors in the model directory]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print one JSON object instead of lines
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    if args.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    let text = match &args.file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let mut model = Model::load(&args.model, settings)?;
    let side = model.entry.text()?;
    let tok = side.tokenizer.as_ref().context("the model has no tokenizer")?;
    let mut ids = tok.encode(&text, false)?;
    ids.truncate(args.tokens);
    let cal = KvCalibration::fit(&mut model.loaded, &ids, 512)?;
    let out = args.out.clone().unwrap_or_else(|| model.loaded.dir.path.join(FILE));
    cal.save(&out)?;
    // Which families use it.
    let reg = super::registry(settings)?;
    let mut uses = Vec::new();
    let mut none = Vec::new();
    for name in reg.kv_family_names() {
        match reg.kv_codec(&name)?.calibration() {
            Some(kind) => uses.push((name, kind)),
            None => none.push(name),
        }
    }
    let layers = cal.layers.iter().filter(|l| l.is_some()).count();
    if args.json {
        let v = serde_json::json!({
            "file": out.display().to_string(),
            "tokens": cal.tokens,
            "layers": layers,
            "families_using_it": uses.iter().map(|(n, k)| serde_json::json!({"family": n, "calibration": k})).collect::<Vec<_>>(),
            "families_needing_none": none,
        });
        println!("{v}");
    } else {
        println!("wrote {} (key and value means of {layers} layers over {} tokens)", out.display(), cal.tokens);
        for (n, k) in &uses {
            println!("  {n}: uses it ({k})");
        }
        println!("  needs no calibration: {}", none.join(", "));
    }
    Ok(())
}
