//! What the subcommands share: the flags that say where settings and plugins
//! come from and how models load (each command lists only the groups it
//! uses), one-line argument errors, and how the process ends.
use clap::{error::ErrorKind, CommandFactory};
use std::io::Write;
use std::path::PathBuf;

/// `--config`: for commands that read settings.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Settings")]
pub struct ConfigFlags {
    /// Configuration file [default: ./rmlx.toml when present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `--config`, `--plugins`: for commands that load plugins.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Settings")]
pub struct PluginFlags {
    /// Configuration file [default: ./rmlx.toml when present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plugin directory [default: plugins/ beside the binary]
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
}

/// `--config`, `--plugins`, `--dtype`, `--dequantize`: for commands that load models.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Settings")]
pub struct LoadFlags {
    /// Configuration file [default: ./rmlx.toml when present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plugin directory [default: plugins/ beside the binary]
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// Compute dtype for loaded models: auto (float32 on the CPU backend, the
    /// files' own elsewhere), model (the files' own), float32, float16,
    /// bfloat16 [default: auto]
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Dequantize affine layers at load: auto (on a CPU when the dense
    /// weights fit), on (the bare flag), off; values need `=`: --dequantize=off [default: auto]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "on", value_name = "auto|on|off")]
    pub dequantize: Option<String>,
    /// KV-cache family for keys and values: f16, bf16, f32, fp8, q8, q4, q2,
    /// turbo4, turbo3, ... (`rmlx plugins` lists them) [default: auto, the
    /// dense family of the model's activation dtype]
    #[arg(long, value_name = "NAME")]
    pub kv_cache: Option<String>,
    /// KV-cache family for keys only [default: the --kv-cache family]
    #[arg(long, value_name = "NAME")]
    pub kv_cache_k: Option<String>,
    /// KV-cache family for values only [default: the --kv-cache family]
    #[arg(long, value_name = "NAME")]
    pub kv_cache_v: Option<String>,
}

/// The same flags before the command (`rmlx --dtype float32 serve`), as
/// they were global once; hidden from help, the command's own win.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Before {
    #[arg(long = "config", id = "before_config", hide = true)]
    pub config: Option<PathBuf>,
    #[arg(long = "plugins", id = "before_plugins", hide = true)]
    pub plugins: Option<PathBuf>,
    #[arg(long = "dtype", id = "before_dtype", hide = true)]
    pub dtype: Option<String>,
    #[arg(long = "dequantize", id = "before_dequantize", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "on")]
    pub dequantize: Option<String>,
    #[arg(skip)]
    pub kv_cache: [Option<String>; 3],
}

/// A command's own arguments followed by the shared flag group it takes.
#[derive(clap::Args, Debug)]
pub struct With<A: clap::Args + clap::FromArgMatches, F: clap::Args + clap::FromArgMatches> {
    #[command(flatten)]
    pub args: A,
    #[command(flatten)]
    pub flags: F,
}

impl Before {
    /// Layers a command's flag group over these.
    pub fn merge(mut self, g: impl Into<Before>) -> Before {
        let g = g.into();
        self.config = g.config.or(self.config);
        self.plugins = g.plugins.or(self.plugins);
        self.dtype = g.dtype.or(self.dtype);
        self.dequantize = g.dequantize.or(self.dequantize);
        for (mine, theirs) in self.kv_cache.iter_mut().zip(g.kv_cache) {
            *mine = theirs.or(mine.take());
        }
        self
    }
}

impl From<ConfigFlags> for Before {
    fn from(f: ConfigFlags) -> Self {
        Before { config: f.config, ..Before::default() }
    }
}

impl From<PluginFlags> for Before {
    fn from(f: PluginFlags) -> Self {
        Before { config: f.config, plugins: f.plugins, ..Before::default() }
    }
}

impl From<LoadFlags> for Before {
    fn from(f: LoadFlags) -> Self {
        Before {
            config: f.config,
            plugins: f.plugins,
            dtype: f.dtype,
            dequantize: f.dequantize,
            kv_cache: [f.kv_cache, f.kv_cache_k, f.kv_cache_v],
        }
    }
}

impl From<()> for Before {
    fn from(_: ()) -> Self {
        Before::default()
    }
}

/// Parses the command line. Help and version print as clap prints them; any
/// other argument error is one line on stderr (`error: ...`, clap's tips on
/// the same line, then where to look) and exit status 2.
pub fn parse() -> super::Cli {
    match <super::Cli as clap::Parser>::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                exit(0)
            }
            // `rmlx` alone: the help, on stderr.
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                exit(2)
            }
            _ => {
                eprintln!("{}", one_line(&e.render().to_string(), &help_hint()));
                exit(2)
            }
        },
    }
}

/// clap's multi-line error as one line: its error (with the lines that
/// continue it, such as the missing arguments), its tips, then a hint.
pub fn one_line(rendered: &str, hint: &str) -> String {
    let mut blocks = rendered.split("\n\n");
    let first: Vec<&str> = blocks.next().unwrap_or("").lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut out = first.join(" ");
    if out.is_empty() {
        out = "bad arguments".into();
    }
    if !out.starts_with("error:") {
        out = format!("error: {out}");
    }
    for l in blocks.flat_map(str::lines).map(str::trim) {
        if let Some(tip) = l.strip_prefix("tip:") {
            out.push_str(&format!("; {}", tip.trim()));
        }
    }
    format!("{out} (see `{hint}`)")
}

/// `rmlx CMD --help` for the command named on the command line, else `rmlx --help`.
fn help_hint() -> String {
    let cmd = super::Cli::command();
    let names: Vec<String> = cmd.get_subcommands().map(|c| c.get_name().to_string()).collect();
    match std::env::args().skip(1).find(|a| names.contains(a)) {
        Some(c) => format!("rmlx {c} --help"),
        None => "rmlx --help".into(),
    }
}

/// A closed pipe ends the process quietly, as for other Unix tools
/// (`rmlx openapi | head -1`): SIGPIPE back to its default, which Rust sets to
/// "ignore" (then every `print!` to a closed pipe panics). Not for `serve`,
/// whose sockets must never end the server.
pub fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: sets a signal disposition at start, before other threads run.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Ends the process once the command is done: flushes stdout and stderr, then
/// `_exit`, which skips the C atexit handlers and shared-library destructors.
/// OpenBLAS's destructor (`gotoblas_quit`) joins its thread pool there and
/// could hang (or abort on a corrupted heap) after MLX's own teardown; the
/// command has dropped its MLX state and flushed its files by now, so the
/// kernel reclaiming the rest is all that is left (docs/decisions.md).
pub fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}
