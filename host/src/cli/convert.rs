//! `rmlx convert`: MLX or Hugging Face safetensors -> MLX with a quantization
//! recipe, GGUF -> MLX (`--from-gguf`, re-quantized when a recipe is given), and
//! CTranslate2 Whisper -> mlx-whisper's layout (`--from-ct2`).
use crate::config::Settings;
use crate::convert::mlx::{convert_dir, MlxOptions};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source model: an MLX or Hugging Face model directory, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output directory (MLX layout).
    #[arg(long)]
    output: PathBuf,
    /// The source is a GGUF file (implied by a .gguf extension).
    #[arg(long)]
    from_gguf: bool,
    /// The source is a CTranslate2 Whisper model directory (model.bin, config.json,
    /// vocabulary); writes mlx-whisper's layout [implied by a directory with
    /// model.bin and a vocabulary file].
    #[arg(long, conflicts_with_all = ["from_gguf", "quant", "group_size", "layers"])]
    from_ct2: bool,
    /// Target format of every Linear/Embedding: q2 q3 q4 q5 q6 q8 (affine), mxfp4,
    /// mxfp8, nvfp4, or bf16/f16/f32 (dequantize) [default: as in the source]
    #[arg(long, value_name = "MODE")]
    quant: Option<String>,
    /// Group size for --quant (affine: 32, 64, 128; mxfp4/mxfp8: 32; nvfp4: 16)
    /// [default: 64 for affine, 32 for mxfp4/mxfp8, 16 for nvfp4]
    #[arg(long, value_name = "G")]
    group_size: Option<i32>,
    /// Per-module override PATTERN=MODE[:G], e.g. 'embed_tokens=q8' or
    /// 'layers.0.*=bf16'; repeatable, the last match wins.
    #[arg(long = "layer", value_name = "PATTERN=MODE")]
    layers: Vec<String>,
    /// Overwrite the output directory if it exists [default: refuse].
    #[arg(long)]
    force: bool,
    /// No progress bar [default: a bar on a terminal].
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args, _settings: &Settings) -> Result<()> {
    let m = &args.model;
    let ct2_dir = m.join("model.bin").is_file() && (m.join("vocabulary.txt").is_file() || m.join("vocabulary.json").is_file());
    if args.from_ct2 || ct2_dir {
        if args.quant.is_some() || args.group_size.is_some() || !args.layers.is_empty() {
            bail!("--quant, --group-size and --layer do not apply to a CTranslate2 model (its weights are written as float)");
        }
        let o = crate::convert::ct2::Ct2Options { force: args.force };
        let report = crate::convert::ct2::convert_ct2(&args.model, &args.output, &o)?;
        eprintln!("{report}");
        return Ok(());
    }
    let gguf = args.from_gguf || args.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let opts = MlxOptions {
        quant: args.quant.clone(),
        group_size: args.group_size,
        layers: args.layers.clone(),
        force: args.force,
        progress: !args.quiet,
    };
    if !gguf {
        if args.model.is_file() {
            bail!("{} is a file: pass a model directory, or --from-gguf for a GGUF file", args.model.display());
        }
        let report = convert_dir(&args.model, &args.output, &opts)?;
        eprintln!("{report}");
        return Ok(());
    }
    let recipe = args.quant.is_some() || !args.layers.is_empty() || args.group_size.is_some();
    if !recipe {
        let g = crate::convert::GgufOptions { force: args.force, progress: !args.quiet };
        let report = crate::convert::convert_gguf(&args.model, &args.output, &g)?;
        eprintln!("{report}");
        return Ok(());
    }
    // GGUF -> MLX (lossless, K-quants dequantized), then the recipe.
    crate::convert::mlx::check_recipe(&opts)?;
    if args.output.exists() && !args.force {
        bail!("output {} already exists (use --force to overwrite)", args.output.display());
    }
    let stage = crate::convert::temp_sibling(&args.output)?;
    let _cleanup = crate::convert::TempDirGuard(Some(stage.clone()));
    let g = crate::convert::GgufOptions { force: false, progress: !args.quiet };
    let first = crate::convert::convert_gguf(&args.model, &stage, &g).context("GGUF -> MLX")?;
    let report = convert_dir(&stage, &args.output, &opts)?;
    let mut report = report;
    report.src = args.model.clone();
    report.warnings.splice(0..0, first.warnings);
    eprintln!("{report}");
    Ok(())
}
