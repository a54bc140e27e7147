//! `rmlx bench`: two modes. `--model DIR` (no `--url`) measures prefill and
//! decode in this process like `mlx_lm.benchmark` ([`local`]); `--url URL`
//! drives a running OpenAI-compatible server with concurrent streamed
//! `/v1/completions` requests and reports TTFT, decode tok/s and peak memory
//! ([`server`]).
mod local;
mod prompts;
mod server;

use crate::config::Settings;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = "Modes:\n  \
    rmlx bench --model DIR [-p 512] [-g 128] [-n 3]      in-process, like mlx_lm.benchmark\n  \
    rmlx bench --url URL [--model ID] [--concurrency 1,8] [-p 128] [-g 64] [--shared-prefix N]\n                                                       \
    against a running server (rmlx serve, mlx_lm.server, any OpenAI-compatible /v1/completions)")]
pub struct Args {
    /// Server mode: base URL of a running server (e.g. http://127.0.0.1:8080) [default: none: in-process]
    #[arg(long)]
    url: Option<String>,
    /// In-process mode: the model directory. Server mode: the model id to
    /// request (default: the first of the server's /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Prompt length in tokens (default 512 in-process, 128 against a server).
    #[arg(short = 'p', long)]
    prompt_tokens: Option<usize>,
    /// Tokens to generate per request (default 128 in-process, 64 against a server).
    #[arg(short = 'g', long)]
    generation_tokens: Option<usize>,
    /// In-process: timed trials after one warm-up (default 3).
    #[arg(short = 'n', long, conflicts_with = "url")]
    num_trials: Option<usize>,
    /// Server: concurrent streams, one level per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8", requires = "url")]
    concurrency: Vec<usize>,
    /// Server: requests each stream sends one after another.
    #[arg(long, default_value_t = 1, requires = "url")]
    requests_per_stream: usize,
    /// Server: also measure prefix reuse: a request with an N-token prompt,
    /// then one with the same N tokens plus a short distinct suffix [default: off]
    #[arg(long, value_name = "N", requires = "url")]
    shared_prefix: Option<usize>,
    /// Server: bearer token (as `rmlx serve --api-key`) [default: none]
    #[arg(long, env = "RMLX_BENCH_API_KEY", requires = "url")]
    api_key: Option<String>,
    /// Server: send text prompts of exactly the requested token counts under
    /// this model directory's tokenizer (for servers that take no token-id
    /// prompts, such as mlx_lm.server), and suppress its EOS ids [default: none: token-id prompts]
    #[arg(long, value_name = "DIR", requires = "url")]
    tokenizer: Option<PathBuf>,
    /// Server: token ids to suppress with logit_bias -100 so every request
    /// generates its full length (added to the --tokenizer model's EOS ids) [default: none]
    #[arg(long, value_delimiter = ',', requires = "url")]
    eos_id: Vec<u32>,
    /// Server: sample this process's resident memory from /proc during each
    /// level (`peak_rss_bytes`; also the peak memory reported when the
    /// server has no /metrics `rmlx_memory_peak_bytes`) [default: none]
    #[arg(long, requires = "url")]
    server_pid: Option<u32>,
    /// Server: seconds one request may take before the bench gives up.
    #[arg(long, default_value_t = 1800, requires = "url")]
    timeout: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    match args.url.clone() {
        Some(url) => server::run(url, args),
        None => {
            let Some(model) = args.model else {
                bail!("rmlx bench needs --model DIR (in-process) or --url URL (against a running server)");
            };
            local::run(
                local::Options {
                    model: PathBuf::from(model),
                    prompt_tokens: args.prompt_tokens.unwrap_or(512),
                    generation_tokens: args.generation_tokens.unwrap_or(128),
                    num_trials: args.num_trials.unwrap_or(3),
                    json: args.json,
                },
                settings,
            )
        }
    }
}
