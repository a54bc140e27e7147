//! Incremental detokenization for streaming generation.
use anyhow::Result;

use super::Tokenizer;

/// Incremental detokenizer: feed generated ids one at a time, get back the text they complete.
///
/// It decodes the window `ids[prefix_offset..]` and emits what goes beyond the decode of
/// `ids[prefix_offset..read_offset]` (the last emitted step), holding text back while it
/// ends in U+FFFD (a UTF-8 sequence split across byte-level / byte-fallback tokens).
/// Decoding a window that starts one step back keeps SentencePiece-style decoders (which
/// treat the first token's leading space specially) consistent. The concatenation of all
/// [`step`](Self::step) outputs and a final [`flush`](Self::flush) equals
/// `decode(all_ids, skip_special)`.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new(tokenizer: &Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token id; returns the newly completed text (empty if none yet).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.advance(false)
    }

    /// Adds several ids; returns the newly completed text.
    pub fn step_many(&mut self, ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(ids);
        self.advance(false)
    }

    /// Emits whatever is still held back (an incomplete UTF-8 tail comes out as U+FFFD,
    /// as a full decode would show it). Call once at the end of generation.
    pub fn flush(&mut self) -> Result<String> {
        self.advance(true)
    }

    /// Forgets all state, ready for a new sequence.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    /// True if some ids have not produced text yet.
    pub fn has_pending(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    fn advance(&mut self, force: bool) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let tok = &self.tokenizer;
        let prefix = if self.read_offset > self.prefix_offset {
            tok.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special,
            )?
        } else {
            String::new()
        };
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}');
        if !complete && !force {
            return Ok(String::new());
        }
        let new_text = if let Some(rest) = full.strip_prefix(prefix.as_str()) {
            rest.to_owned()
        } else {
            // A decoder that rewrote earlier text: emit past the common prefix.
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .take_while(|((_, a), b)| a == b)
                .last()
                .map(|((i, c), _)| i + c.len_utf8())
                .unwrap_or(0);
            full[common..].to_owned()
        };
        // Only move the window when the text grew; otherwise keep the ids (e.g. skipped
        // special tokens) so a later flush still sees them.
        if full.len() > prefix.len() || force {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(new_text)
    }
}
