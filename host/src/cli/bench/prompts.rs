//! Benchmark prompts of exact token counts, distinct per seed from the first
//! token on (so no two share a cached prefix): token ids, or, with a model's
//! tokenizer, text made of words that are one token each (for servers that
//! take only text prompts, such as mlx_lm.server).
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// Token ids 3..250: below every vocabulary the bench meets (the test
/// fixtures have 256) and past the usual BOS/EOS/pad ids.
const ID_BASE: u32 = 3;
const ID_COUNT: u64 = 247;
/// Most words kept for text prompts.
const MAX_WORDS: usize = 2000;

pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

impl Prompt {
    pub fn json(&self) -> Value {
        match self {
            Prompt::Ids(v) => serde_json::json!(v),
            Prompt::Text(s) => Value::String(s.clone()),
        }
    }
}

pub struct Maker {
    text: Option<Words>,
}

struct Words {
    tokenizer: Tokenizer,
    /// Each one token under `tokenizer`, with its leading space.
    list: Vec<String>,
    /// Tokens the tokenizer adds around any text (BOS and the like).
    special: usize,
}

/// The `k`-th pick in `0..m` for `seed`; the first pick is `seed % m`, so
/// consecutive seeds start differently.
fn pick(seed: u64, k: usize, m: u64) -> usize {
    if k == 0 {
        return (seed % m) as usize;
    }
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add((k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % m) as usize
}

impl Maker {
    /// Token-id prompts.
    pub fn ids() -> Self {
        Maker { text: None }
    }

    /// Text prompts under `dir`'s tokenizer.json; also returns the model's
    /// EOS ids from its config.json and generation_config.json.
    pub fn text(dir: &Path) -> Result<(Self, Vec<u32>)> {
        let path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| anyhow!("--tokenizer: reading {}: {e}", path.display()))?;
        let enc = |s: &str, special: bool| -> Result<Vec<u32>> {
            Ok(tokenizer.encode(s, special).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
        };
        let mut list = Vec::new();
        for id in 0..tokenizer.get_vocab_size(false) as u32 {
            let Ok(s) = tokenizer.decode(&[id], false) else { continue };
            let word = s.trim_start();
            if !(3..=10).contains(&word.len()) || !word.bytes().all(|b| b.is_ascii_lowercase()) {
                continue;
            }
            let w = format!(" {word}");
            if enc(&w, false)? == [id] {
                list.push(w);
                if list.len() == MAX_WORDS {
                    break;
                }
            }
        }
        if list.len() < 100 {
            bail!("--tokenizer {}: found only {} one-token words to build prompts from", dir.display(), list.len());
        }
        let special = enc("", true)?.len();
        let mut eos = Vec::new();
        for f in ["config.json", "generation_config.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(f)) else { continue };
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{}", dir.join(f).display()))?;
            match &v["eos_token_id"] {
                Value::Number(n) => eos.extend(n.as_u64().map(|n| n as u32)),
                Value::Array(a) => eos.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32)),
                _ => {}
            }
        }
        Ok((Maker { text: Some(Words { tokenizer, list, special }) }, eos))
    }

    /// A prompt of `n` tokens for `seed`.
    pub fn make(&self, seed: u64, n: usize) -> Result<Prompt> {
        self.extend(None, seed, n)
    }

    /// `base` (a prompt from this maker) followed by tokens for `seed`, `n`
    /// tokens in all.
    pub fn extend(&self, base: Option<&Prompt>, seed: u64, n: usize) -> Result<Prompt> {
        match (&self.text, base) {
            (None, b) => {
                let mut ids = match b {
                    Some(Prompt::Ids(v)) => v.clone(),
                    _ => Vec::new(),
                };
                let start = ids.len();
                ids.extend((start..n).map(|k| ID_BASE + pick(seed, k - start, ID_COUNT) as u32));
                Ok(Prompt::Ids(ids))
            }
            (Some(w), b) => {
                let mut text = match b {
                    Some(Prompt::Text(s)) => s.clone(),
                    _ => String::new(),
                };
                let have = if text.is_empty() { w.special } else { w.count(&text)? };
                if n <= have {
                    bail!("a prompt of {n} tokens is too short for this tokenizer");
                }
                for k in 0..n - have {
                    text.push_str(&w.list[pick(seed, k, w.list.len() as u64)]);
                }
                let got = w.count(&text)?;
                if got != n {
                    bail!("--tokenizer: built a text prompt of {got} tokens instead of {n}");
                }
                Ok(Prompt::Text(text))
            }
        }
    }
}

impl Words {
    fn count(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(text, true).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().len())
    }
}
