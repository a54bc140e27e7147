//! `rmlx eval ppl`: perplexity of a text file under a KV-cache family.
//!
//! The text is tokenized (no template, no BOS), cut into windows of
//! `--context` tokens, and each window runs from an empty cache in chunks of
//! `--chunk` tokens through the paged pool: every token attends to history
//! that went through the family's encoding (its own chunk included), so the
//! number measures the family, not a full-precision copy. With `--baseline`
//! the same windows also run under the dense family of the activation dtype,
//! and the report adds the mean next-token KL divergence from it and how
//! often both pick the same top-1 token.
use super::textgen::Model;
use crate::config::Settings;
use crate::engine::{kv_family, seq_pool::SeqPool};
use anyhow::{bail, Context, Result};
use mlx_rs::{
    ops::{indexing::argmax_axis, logsumexp_axis},
    Array, Dtype,
};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Perplexity of a text file, every token attending to KV history stored by the family
    Ppl(PplArgs),
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    /// Model directory (MLX layout) or Hugging Face repo id (org/name)
    #[arg(short = 'm', long, value_name = "DIR|REPO")]
    model: PathBuf,
    /// Text file to score
    #[arg(long, value_name = "TEXT")]
    file: PathBuf,
    /// Tokens per window; each window starts from an empty cache [default: 1024]
    #[arg(long, default_value_t = 1024, value_name = "N")]
    context: usize,
    /// Tokens per forward within a window [default: 256]
    #[arg(long, default_value_t = 256, value_name = "N")]
    chunk: usize,
    /// Score at most this many windows [default: all]
    #[arg(long, value_name = "W")]
    max_windows: Option<usize>,
    /// Also run the dense family and report KL divergence and top-1 agreement against it
    #[arg(long)]
    baseline: bool,
    /// Print one JSON object: ppl, tokens, kv_cache, kv_bytes_per_token (and kl, top1_agreement, baseline_ppl with --baseline)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    flags: super::common::LoadFlags,
}

impl Args {
    /// The subcommand's load flags (`--kv-cache`, `--dtype`, ...).
    pub fn flags(&self) -> super::common::LoadFlags {
        match &self.command {
            Command::Ppl(a) => a.flags.clone(),
        }
    }
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    match args.command {
        Command::Ppl(a) => ppl(a, settings),
    }
}

/// Per window position: log-probabilities [T, V] (float32) and the NLL of each target.
struct Scored {
    logp: Array,
    nll: Vec<f32>,
}

fn score_window(pool: &mut SeqPool, model: &mut crate::engine::LoadedModel, window: &[u32], chunk: usize) -> Result<Scored> {
    let mut parts = Vec::new();
    for c in window[..window.len() - 1].chunks(chunk.max(1)) {
        let ids: Vec<i32> = c.iter().map(|&t| t as i32).collect();
        let logits = pool.forward(model, Array::from_slice(&ids, &[1, ids.len() as i32]), false)?; // [1, L, V]
        let l = logits.as_dtype(Dtype::Float32)?.squeeze_axes(&[0])?; // [L, V]
        let lp = l.subtract(logsumexp_axis(&l, -1, true)?)?;
        lp.eval()?;
        parts.push(lp);
    }
    let logp = mlx_rs::ops::concatenate(&parts, 0)?; // [T, V]
    let targets: Vec<i32> = window[1..].iter().map(|&t| t as i32).collect();
    let idx = Array::from_slice(&targets, &[targets.len() as i32, 1]);
    let picked = mlx_rs::ops::indexing::take_along_axis(&logp, &idx, -1)?;
    picked.eval()?;
    let nll = picked.as_slice::<f32>().iter().map(|x| -x).collect();
    Ok(Scored { logp, nll })
}

fn ppl(args: PplArgs, settings: &Settings) -> Result<()> {
    if args.context < 2 {
        bail!("--context must be at least 2 tokens");
    }
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let mut model = Model::load(&args.model, settings)?;
    let side = model.entry.text()?;
    let tok = side.tokenizer.as_ref().context("the model has no tokenizer")?;
    let ids = tok.encode(&text, false)?;
    let mut windows: Vec<&[u32]> = ids.chunks(args.context).filter(|w| w.len() >= 2).collect();
    if let Some(m) = args.max_windows {
        windows.truncate(m);
    }
    if windows.is_empty() {
        bail!("{} has fewer than 2 tokens", args.file.display());
    }
    let base_sides = if args.baseline {
        let reg = super::registry(settings)?;
        let l = &model.loaded;
        Some(kv_family::resolve(&reg, &l.spec, l.kv.0.dims.dtype, &kv_family::KvChoice::default(), l.kv_calibration.as_deref())?)
    } else {
        None
    };
    let (mut nll, mut base_nll, mut kl, mut agree, mut n) = (0f64, 0f64, 0f64, 0usize, 0usize);
    let mut bytes_per_token = 0.0;
    for w in &windows {
        let mut pool = SeqPool::new(&model.loaded);
        let s = score_window(&mut pool, &mut model.loaded, w, args.chunk)?;
        bytes_per_token = pool.measured_bytes_per_token();
        nll += s.nll.iter().map(|&x| x as f64).sum::<f64>();
        n += s.nll.len();
        if let Some((k, v)) = &base_sides {
            let mut bpool = SeqPool::with_sides(&model.loaded, k.clone(), v.clone());
            let b = score_window(&mut bpool, &mut model.loaded, w, args.chunk)?;
            base_nll += b.nll.iter().map(|&x| x as f64).sum::<f64>();
            // KL(base || family) per position, summed; top-1 agreement.
            let d = b.logp.exp()?.multiply(b.logp.subtract(&s.logp)?)?.sum_axis(-1, None)?.sum(None)?;
            let same = argmax_axis(&b.logp, -1, None)?.eq(argmax_axis(&s.logp, -1, None)?)?.as_dtype(Dtype::Int32)?.sum(None)?;
            kl += d.item_exact::<f32>() as f64;
            agree += same.item_exact::<i32>() as usize;
        }
    }
    let nf = n.max(1) as f64;
    let ppl = (nll / nf).exp();
    let key = kv_family::family_key_of(&model.loaded);
    let mut out = serde_json::json!({
        "ppl": ppl, "tokens": n, "windows": windows.len(), "context": args.context,
        "kv_cache": key, "kv_bytes_per_token": bytes_per_token,
    });
    if base_sides.is_some() {
        out["baseline_ppl"] = ((base_nll / nf).exp()).into();
        out["ppl_ratio"] = (ppl / (base_nll / nf).exp()).into();
        out["kl"] = (kl / nf).into();
        out["top1_agreement"] = (agree as f64 / nf).into();
    }
    if args.json {
        println!("{out}");
    } else {
        println!("kv cache {key}: perplexity {ppl:.4} over {n} tokens ({} windows of up to {}), {bytes_per_token:.0} KV bytes per token", windows.len(), args.context);
        if base_sides.is_some() {
            println!(
                "against the dense baseline: perplexity {:.4} (ratio {:.4}), mean KL {:.5}, top-1 agreement {:.2}%",
                out["baseline_ppl"].as_f64().unwrap_or(f64::NAN),
                out["ppl_ratio"].as_f64().unwrap_or(f64::NAN),
                out["kl"].as_f64().unwrap_or(f64::NAN),
                100.0 * out["top1_agreement"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}
