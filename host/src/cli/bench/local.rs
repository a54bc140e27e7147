//! `rmlx bench --model DIR` (no `--url`): in-process prefill and decode speed, measured
//! like mlx-lm's `mlx_lm.benchmark` (random prompt, EOS ignored, a warm-up
//! run, then N timed trials) so the two can be compared on the same files.
use crate::config::Settings;
use crate::engine::{generate::generate, GenerateOptions, LoadedModel};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// The in-process mode's settings (see `super::Args`).
pub struct Options {
    pub model: PathBuf,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    pub num_trials: usize,
    pub json: bool,
}

pub fn run(args: Options, settings: &Settings) -> Result<()> {
    if args.prompt_tokens == 0 || args.generation_tokens == 0 || args.num_trials == 0 {
        bail!("--prompt-tokens, --generation-tokens and --num-trials must be positive");
    }
    let reg = crate::cli::registry(settings)?;
    eprintln!("loading {} ...", args.model.display());
    let mut model = LoadedModel::load(&crate::hub::resolve_dir(&args.model)?, &reg)?;
    let vocab = model.spec.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..args.prompt_tokens).map(|_| rng.random_range(0..vocab)).collect();
    let opts = GenerateOptions {
        max_tokens: args.generation_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: Some(0),
        stop_ids: vec![],
        prefill_chunk: settings.generate.prefill_chunk,
    };
    eprintln!("warm-up: {} prompt tokens, {} generated ...", args.prompt_tokens, args.generation_tokens);
    generate(&mut model, &prompt, &opts, |_| {})?; // warm-up (kernel compilation)
    let mut trials = Vec::new();
    for i in 0..args.num_trials {
        eprintln!("trial {}/{} ...", i + 1, args.num_trials);
        mlx_rs::memory::reset_peak_memory()?;
        let out = generate(&mut model, &prompt, &opts, |_| {})?;
        let peak = mlx_rs::memory::peak_memory()? as f64 / 1e9;
        if !args.json {
            println!(
                "Trial {}:  prompt_tps={:.3} tok/s, generation_tps={:.3} tok/s, peak_memory={:.3} GB",
                i + 1,
                out.prompt_tps,
                out.generation_tps,
                peak
            );
        }
        trials.push((out.prompt_tps, out.generation_tps, peak));
    }
    let n = trials.len() as f64;
    let avg = |f: fn(&(f64, f64, f64)) -> f64| trials.iter().map(f).sum::<f64>() / n;
    let (p, g, m) = (avg(|t| t.0), avg(|t| t.1), avg(|t| t.2));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model, "device": crate::runtime::default_device(),
                "prompt_tokens": args.prompt_tokens, "generation_tokens": args.generation_tokens,
                "prompt_tps": p, "generation_tps": g, "peak_memory_gb": m,
                "trials": trials.iter().map(|t| serde_json::json!({"prompt_tps": t.0, "generation_tps": t.1, "peak_memory_gb": t.2})).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("Averages: prompt_tps={p:.3} tok/s, generation_tps={g:.3} tok/s, peak_memory={m:.3} GB");
    }
    Ok(())
}
