//! `rmlx chat`: a conversation in the terminal, like `mlx_lm.chat` and
//! `ollama run`. Each turn renders the whole conversation through the
//! model's chat template and streams the reply; the speeds of the turn go to
//! stderr. On a terminal the input line has editing and a history kept across
//! sessions (rustyline); otherwise stdin is read line by line, so the REPL
//! can be driven by a pipe.
use super::textgen::{self, Model, SamplingArgs};
use crate::config::Settings;
use crate::model::chat_template::RenderOptions;
use anyhow::{bail, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = "In the chat:\n  /reset   forget the conversation (the system prompt stays)\n  /exit    leave (also /quit, Ctrl-D)\n  /help    this list")]
pub struct Args {
    /// Model directory (MLX layout) or Hugging Face repo id (org/name)
    #[arg(short = 'm', long, value_name = "DIR|REPO")]
    model: PathBuf,
    /// System prompt, first in every conversation [default: none]
    #[arg(short = 's', long, value_name = "TEXT")]
    system: Option<String>,
    /// Where the input history is kept across sessions [default: $RMLX_CACHE_DIR or ~/.cache/rmlx, file chat_history]
    #[arg(long, value_name = "FILE")]
    history_file: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// What the user typed, once read.
enum Input {
    Line(String),
    /// Ctrl-C on a terminal: the line is dropped.
    Interrupted,
    Eof,
}

/// Terminal (line editing, history) or plain lines from a pipe.
enum Reader {
    Terminal(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    Lines(std::io::StdinLock<'static>),
}

impl Reader {
    fn new(history: Option<PathBuf>) -> Result<Self> {
        if !std::io::stdin().is_terminal() {
            return Ok(Reader::Lines(std::io::stdin().lock()));
        }
        let mut ed = rustyline::DefaultEditor::new()?;
        if let Some(h) = &history {
            let _ = ed.load_history(h);
        }
        Ok(Reader::Terminal(Box::new(ed), history))
    }

    fn read(&mut self) -> Result<Input> {
        match self {
            Reader::Terminal(ed, _) => match ed.readline(">>> ") {
                Ok(l) => {
                    if !l.trim().is_empty() {
                        let _ = ed.add_history_entry(l.as_str());
                    }
                    Ok(Input::Line(l))
                }
                Err(rustyline::error::ReadlineError::Interrupted) => Ok(Input::Interrupted),
                Err(rustyline::error::ReadlineError::Eof) => Ok(Input::Eof),
                Err(e) => Err(e.into()),
            },
            Reader::Lines(lines) => {
                let mut s = String::new();
                if lines.read_line(&mut s)? == 0 {
                    return Ok(Input::Eof);
                }
                Ok(Input::Line(s.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }

    fn save(&mut self) {
        if let Reader::Terminal(ed, Some(h)) = self {
            if let Some(d) = h.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = ed.save_history(h);
        }
    }
}

fn default_history() -> Option<PathBuf> {
    let cache = std::env::var_os("RMLX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("rmlx")))?;
    Some(cache.join("chat_history"))
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let params = args.sampling.params(settings)?;
    let mut model = Model::load(&args.model, settings)?;
    let text = model.entry.text()?;
    let Some(tok) = text.tokenizer.as_ref() else {
        bail!("rmlx chat needs a model with a tokenizer (tokenizer.json)");
    };
    if text.template.is_none() {
        bail!("rmlx chat needs a model with a chat template; use `rmlx generate --raw` for plain text");
    }
    let start: Vec<serde_json::Value> = match &args.system {
        Some(s) => vec![serde_json::json!({"role": "system", "content": s})],
        None => Vec::new(),
    };
    let mut messages = start.clone();
    let mut reader = Reader::new(args.history_file.clone().or_else(default_history))?;
    let terminal = matches!(reader, Reader::Terminal(..));
    if terminal {
        eprintln!("Chatting with {}. /help for commands, /exit or Ctrl-D to leave.", model.entry.id);
    }
    let stdout = std::io::stdout();
    loop {
        let line = match reader.read()? {
            Input::Line(l) => l,
            Input::Interrupted => continue,
            Input::Eof => break,
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/reset" | "/clear" => {
                messages = start.clone();
                eprintln!("[conversation reset]");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("/reset  forget the conversation (the system prompt stays)\n/exit   leave (also /quit, Ctrl-D)");
                continue;
            }
            l if l.starts_with('/') && !l.contains(' ') => {
                eprintln!("unknown command {l}; /help lists them");
                continue;
            }
            _ => {}
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        let rendered = text.render(&messages, &RenderOptions::new(true))?;
        let prompt = tok.encode(&rendered, false)?;
        textgen::reset_peak_memory();
        let turn = textgen::run_turn(&mut model, &prompt, params.clone(), |piece| {
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        });
        let turn = match turn {
            Ok(t) => t,
            Err(e) => {
                // The turn is dropped; the conversation goes on.
                messages.pop();
                eprintln!("error: {e:#}");
                continue;
            }
        };
        println!();
        eprintln!(
            "[{} tokens, {:.1} tok/s | prompt {} tokens, {:.1} tok/s | peak memory {:.3} GB{}]",
            turn.tokens.len(),
            turn.generation_tps,
            prompt.len(),
            turn.prompt_tps,
            textgen::peak_memory_gb(),
            if turn.finish_reason() == "length" { " | stopped at --max-tokens" } else { "" }
        );
        messages.push(serde_json::json!({"role": "assistant", "content": turn.text}));
    }
    reader.save();
    Ok(())
}
