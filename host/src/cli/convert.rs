//! `rmlx convert`: GGUF -> MLX today (see docs/CLI.md for what is planned).
use crate::config::Settings;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source model (a .gguf file with --from-gguf).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (MLX layout).
    #[arg(long)]
    output: PathBuf,
    /// The source is a GGUF file.
    #[arg(long)]
    from_gguf: bool,
    /// Overwrite the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args, _settings: &Settings) -> Result<()> {
    if !args.from_gguf {
        bail!("only --from-gguf conversion is available in this version (MLX and Hugging Face sources come with the weight-format work)");
    }
    let opts = crate::convert::GgufOptions { force: args.force, progress: !args.quiet };
    let report = crate::convert::convert_gguf(&args.model, &args.output, &opts)?;
    eprintln!("{report}");
    Ok(())
}
