//! `rmlx generate`: one prompt, one completion, printed as text or JSON, with
//! the speeds and peak memory as mlx-lm's `mlx_lm.generate` prints them.
use super::textgen::{self, Model, SamplingArgs, SpecArgs};
use crate::config::Settings;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (MLX layout) or Hugging Face repo id (org/name)
    #[arg(short = 'm', long, value_name = "DIR|REPO")]
    model: PathBuf,
    /// Prompt text; `-` reads it from stdin [default: none; one of --prompt, --prompt-tokens]
    #[arg(short = 'p', long, conflicts_with = "prompt_tokens", value_name = "TEXT")]
    prompt: Option<String>,
    /// Prompt as token ids, used exactly as given (no BOS, no template): 1,2,3 [default: none]
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    prompt_tokens: Option<Vec<u32>>,
    /// Use --prompt as it is, without the model's chat template [default: the template is applied when the model has one]
    #[arg(long, visible_alias = "no-chat-template", conflicts_with = "chat")]
    raw: bool,
    /// Apply the chat template (the default when the model has one; an error when it has none)
    #[arg(long)]
    chat: bool,
    /// System message, before the prompt in the chat template [default: none]
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Print one JSON object: prompt_tokens, tokens, text, finish_reason, prompt_tps, generation_tps, peak_memory_gb, kv_cache, kv_bytes_per_token (and drafted_tokens, accepted_tokens with --draft-model)
    #[arg(long)]
    json: bool,
    /// Also print the prompt as the model sees it (after the template) and why generation stopped, to stderr
    #[arg(short = 'v', long)]
    verbose: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    speculative: SpecArgs,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let params = args.sampling.params(settings)?;
    let prompt_text = match args.prompt.as_deref() {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
            Some(s)
        }
        p => p.map(str::to_string),
    };
    if prompt_text.is_none() && args.prompt_tokens.is_none() {
        bail!("give --prompt TEXT (or --prompt - for stdin) or --prompt-tokens 1,2,3");
    }
    let mut model = Model::load(&args.model, settings)?;
    let mut drafter = args.speculative.load(&model, settings)?;
    let text = model.entry.text()?;
    let (prompt, rendered): (Vec<u32>, Option<String>) = match (&args.prompt_tokens, &prompt_text) {
        (Some(ids), _) => (ids.clone(), None),
        (None, Some(p)) => {
            let chat = args.chat || (!args.raw && text.template.is_some());
            if args.system.is_some() && !chat {
                bail!("--system needs the chat template (the model has none, or --raw was given)");
            }
            let ids = text.prompt_ids(p, chat, args.system.as_deref())?;
            let shown = match &text.tokenizer {
                Some(t) => t.decode(&ids, false).ok(),
                None => None,
            };
            (ids, shown)
        }
        (None, None) => unreachable!("checked above"),
    };
    if args.verbose {
        eprintln!("==========");
        match &rendered {
            Some(r) => eprintln!("{r}"),
            None => eprintln!("{prompt:?}"),
        }
        eprintln!("==========");
    }
    textgen::reset_peak_memory();
    let has_text = text.tokenizer.is_some();
    let stdout = std::io::stdout();
    let turn = textgen::run_turn_with(&mut model, drafter.as_mut(), &prompt, params, |piece| {
        if !args.json {
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        }
    })?;
    let peak = textgen::peak_memory_gb();
    if args.json {
        let mut out = serde_json::json!({
            "prompt_tokens": prompt, "tokens": turn.tokens, "text": turn.text,
            "finish_reason": turn.finish_reason(),
            "prompt_tps": turn.prompt_tps, "generation_tps": turn.generation_tps,
            "peak_memory_gb": peak,
            "kv_cache": crate::engine::kv_family::family_key_of(&model.loaded),
            "kv_bytes_per_token": turn.kv_bytes_per_token,
        });
        if let Some((drafted, accepted)) = turn.speculation {
            out["drafted_tokens"] = drafted.into();
            out["accepted_tokens"] = accepted.into();
        }
        println!("{out}");
    } else {
        if has_text {
            println!();
        } else {
            println!("{:?}", turn.tokens);
        }
        if args.verbose {
            let why = match &turn.finish.stop {
                Some(s) => format!("stop string {s:?}"),
                None => turn.finish_reason().to_string(),
            };
            eprintln!("finish: {why}");
        }
        eprintln!("==========");
        eprintln!("Prompt: {} tokens, {:.3} tokens-per-sec", prompt.len(), turn.prompt_tps);
        eprintln!("Generation: {} tokens, {:.3} tokens-per-sec", turn.tokens.len(), turn.generation_tps);
        if let Some((drafted, accepted)) = turn.speculation {
            let rate = accepted as f64 / drafted.max(1) as f64;
            eprintln!("Draft: {accepted} of {drafted} draft tokens accepted ({:.1}%)", 100.0 * rate);
        }
        eprintln!("Peak memory: {peak:.3} GB");
    }
    Ok(())
}
