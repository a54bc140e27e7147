//! `rmlx generate`: one prompt, one completion, printed as text or JSON.
use crate::config::Settings;
use crate::engine::{generate::generate, GenerateOptions, LoadedModel};
use anyhow::{bail, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (MLX layout), or a Hugging Face repo id (org/name:
    /// from the hub cache, downloaded when missing).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_tokens")]
    prompt: Option<String>,
    /// Prompt as token ids, used exactly as given (no BOS, no template): 1,2,3
    #[arg(long, value_delimiter = ',')]
    prompt_tokens: Option<Vec<u32>>,
    /// Apply the model's chat template to --prompt (as a user message).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object: prompt_tokens, tokens, text, prompt_tps, generation_tps.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let reg = super::registry(settings)?;
    let mut model = LoadedModel::load(&crate::hub::resolve_dir(&args.model)?, &reg)?;
    let text = crate::model::text::TextSide::load(&model.dir)?;
    let prompt: Vec<u32> = match (&args.prompt_tokens, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => text.prompt_ids(p, args.chat, args.system.as_deref())?,
        (None, None) => bail!("give --prompt TEXT or --prompt-tokens 1,2,3"),
    };
    if args.chat && args.prompt.is_none() {
        bail!("--chat needs --prompt");
    }
    let g = &settings.generate;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens.unwrap_or(g.max_tokens),
        temperature: args.temperature.unwrap_or(g.temperature),
        top_p: args.top_p.unwrap_or(g.top_p),
        seed: args.seed,
        stop_ids: text.eos_ids.clone(),
        prefill_chunk: g.prefill_chunk,
    };
    if !(opts.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let mut stream = text.stream_decoder();
    let stdout = std::io::stdout();
    let out = generate(&mut model, &prompt, &opts, |t| {
        if !args.json {
            if let Some(piece) = stream.as_mut().and_then(|s| s.step(t).ok()) {
                let mut lock = stdout.lock();
                let _ = lock.write_all(piece.as_bytes());
                let _ = lock.flush();
            }
        }
    })?;
    let full = text.decode(&out.tokens)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens": prompt, "tokens": out.tokens, "text": full,
                "finish_reason": out.finish_reason,
                "prompt_tps": out.prompt_tps, "generation_tps": out.generation_tps,
            })
        );
    } else {
        match stream.as_mut() {
            Some(s) => println!("{}", s.flush().unwrap_or_default()),
            None => println!("{:?}", out.tokens),
        }
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s",
            prompt.len(),
            out.prompt_tps,
            out.tokens.len(),
            out.generation_tps
        );
    }
    Ok(())
}
