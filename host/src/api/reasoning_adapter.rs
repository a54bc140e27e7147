//! Adapts `api::reasoning` (thinking vs answer, thinking budget) to the
//! routes' splitter and the engine's logits hook.
use super::generation::ReasoningSplit;
use super::reasoning::{Phase, ReasoningEvent, ReasoningSplitter};
use crate::engine::worker::LogitsHook;
use crate::model::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::VecDeque;

struct Split(ReasoningSplitter);

fn join(evs: Vec<ReasoningEvent>) -> (String, String) {
    let (mut t, mut a) = (String::new(), String::new());
    for e in evs {
        match e {
            ReasoningEvent::Thinking(s) => t.push_str(&s),
            ReasoningEvent::Answer(s) => a.push_str(&s),
        }
    }
    (t, a)
}

impl ReasoningSplit for Split {
    fn feed(&mut self, text: &str) -> (String, String) {
        join(self.0.feed(text))
    }
    fn finish(&mut self) -> (String, String) {
        join(self.0.finish())
    }
}

/// A thinking splitter when the chat template thinks (`<think>`).
pub fn splitter(template_source: &str, rendered_prompt: &str) -> Option<Box<dyn ReasoningSplit>> {
    ReasoningSplitter::for_prompt(template_source, rendered_prompt).map(|s| Box::new(Split(s)) as Box<dyn ReasoningSplit>)
}

/// The logits hook of a thinking model's request: it lets the model think,
/// closes the block when the thinking budget is spent (by force-feeding the
/// closing tag's tokens), and starts the request's constraint (JSON schema,
/// forced tool call, ...) only after the block is closed, so that `<think>`
/// is never forbidden:
///
/// * prompt ends with `<think>` (the template opened the block): unconstrained
///   until the model (or the budget) writes the closing tag, then `\n\n` is fed
///   if the model wrote no whitespace after it, then the constraint runs;
/// * the output may open the block itself (Qwen 3's own template): the first
///   token may be the opening tag (when it is one token) or what the
///   constraint allows; after a closed block as above;
/// * while thinking with a constraint waiting, EOS is masked: the answer must
///   come (the budget, or max_tokens, bounds the thinking).
pub struct ReasoningGate {
    splitter: ReasoningSplitter,
    decoder: StreamDecoder,
    tokenizer: Tokenizer,
    forced: VecDeque<u32>,
    inner: Option<Box<dyn LogitsHook>>,
    /// The constraint sees (and masks) tokens from now on.
    inner_on: bool,
    /// The constraint starts once the forced tokens are fed.
    inner_pending: bool,
    /// First token only: the one-token opening tag is allowed beside the constraint.
    open_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// The output's last bytes (to see what followed the closing tag).
    recent: String,
}

impl ReasoningGate {
    /// `None` when the template does not think or the prompt already closed
    /// the block (thinking off): then `inner` alone is the hook.
    pub fn new(
        template_source: &str,
        rendered_prompt: &str,
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
        budget: Option<u32>,
        inner: Option<Box<dyn LogitsHook>>,
    ) -> Result<Self, Option<Box<dyn LogitsHook>>> {
        let Some(mut splitter) = ReasoningSplitter::for_prompt(template_source, rendered_prompt) else {
            return Err(inner);
        };
        if !matches!(splitter.phase(), Phase::Start | Phase::Thinking) || (budget.is_none() && inner.is_none()) {
            return Err(inner);
        }
        splitter.set_budget(budget.map(|b| b as usize));
        let mut forced = VecDeque::new();
        if let Some(close) = splitter.force_close_now() {
            match tokenizer.encode(&close, false) {
                Ok(ids) => forced.extend(ids),
                Err(_) => return Err(inner),
            }
        }
        let starts_free = splitter.phase() == Phase::Start;
        let open_id = match tokenizer.encode(splitter.tags().0, false) {
            Ok(ids) if ids.len() == 1 && starts_free && inner.is_some() => Some(ids[0]),
            _ => None,
        };
        Ok(Self {
            splitter,
            decoder: tokenizer.stream_decoder(false),
            tokenizer: tokenizer.clone(),
            forced,
            // Before the block opens, the constraint holds (with the opening tag allowed).
            inner_on: starts_free && inner.is_some(),
            inner_pending: false,
            inner,
            open_id,
            eos_ids: eos_ids.to_vec(),
            recent: String::new(),
        })
    }
}

impl LogitsHook for ReasoningGate {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        if let Some(&t) = self.forced.front() {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != t as usize {
                    *l = f32::NEG_INFINITY;
                }
            }
            return Ok(());
        }
        if self.inner_on {
            let inner = self.inner.as_mut().expect("inner_on implies a constraint");
            let keep = self.open_id.and_then(|id| logits.get(id as usize).map(|&l| (id as usize, l)));
            inner.apply(logits)?;
            if let Some((id, l)) = keep {
                logits[id] = l;
            }
        } else if self.inner.is_some() && self.splitter.phase() == Phase::Thinking {
            for &e in &self.eos_ids {
                if let Some(l) = logits.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        let was_thinking = self.splitter.phase() == Phase::Thinking;
        let text = self.decoder.step(token)?;
        let _ = self.splitter.feed(&text);
        self.recent.push_str(&text);
        if self.recent.len() > 256 {
            let mut cut = self.recent.len() - 128;
            while !self.recent.is_char_boundary(cut) {
                cut += 1;
            }
            self.recent.drain(..cut);
        }
        if self.forced.front() == Some(&token) {
            self.forced.pop_front();
        } else {
            if self.inner_on {
                if self.open_id.take() == Some(token) {
                    // The model opened the block: the constraint waits for its end.
                    self.inner_on = false;
                } else if let Some(inner) = self.inner.as_mut() {
                    inner.commit(token)?;
                }
            }
            self.open_id = None;
            if let Some(close) = self.splitter.count_token() {
                self.forced.extend(self.tokenizer.encode(&close, false)?);
            }
        }
        if was_thinking && self.splitter.phase() != Phase::Thinking && self.inner.is_some() && !self.inner_on {
            // The block just closed.
            self.inner_pending = true;
            let close = self.splitter.tags().1;
            let tail = self.recent.rfind(close).map(|p| &self.recent[p + close.len()..]).unwrap_or("");
            if self.forced.is_empty() && tail.is_empty() {
                self.forced.extend(self.tokenizer.encode("\n\n", false)?);
            }
        }
        if self.inner_pending && self.forced.is_empty() {
            self.inner_pending = false;
            self.inner_on = true;
        }
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.inner_on && self.inner.as_ref().is_some_and(|h| h.is_finished())
    }

    /// A copy of the whole state (splitter, decoder, forced tokens, the
    /// constraint's fork): a speculative draft may think, close the block
    /// and start the constraint ahead of the sequence.
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        let inner = match &self.inner {
            Some(h) => Some(h.fork()?),
            None => None,
        };
        Some(Box::new(ReasoningGate {
            splitter: self.splitter.clone(),
            decoder: self.decoder.clone(),
            tokenizer: self.tokenizer.clone(),
            forced: self.forced.clone(),
            inner,
            inner_on: self.inner_on,
            inner_pending: self.inner_pending,
            open_id: self.open_id,
            eos_ids: self.eos_ids.clone(),
            recent: self.recent.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn qwen3() -> (Tokenizer, String) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers/qwen3");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        (Tokenizer::from_model_dir(&dir).unwrap(), cfg["chat_template"].as_str().unwrap().to_owned())
    }

    /// A constraint allowing only `allow`, recording what it was given.
    struct Only {
        allow: Vec<u32>,
        committed: Arc<Mutex<Vec<u32>>>,
    }

    impl LogitsHook for Only {
        fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
            for (i, l) in logits.iter_mut().enumerate() {
                if !self.allow.contains(&(i as u32)) {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn commit(&mut self, token: u32) -> anyhow::Result<()> {
            self.committed.lock().unwrap().push(token);
            Ok(())
        }
    }

    fn allowed(h: &mut ReasoningGate, n: usize) -> Vec<u32> {
        let mut l = vec![0.0f32; n];
        h.apply(&mut l).unwrap();
        (0..n as u32).filter(|&i| l[i as usize].is_finite()).collect()
    }

    fn one(tok: &Tokenizer, s: &str) -> u32 {
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(ids.len(), 1, "{s:?} is {ids:?}");
        ids[0]
    }

    #[test]
    fn constraint_waits_for_a_block_the_model_opens() {
        let (tok, tpl) = qwen3();
        let n = tok.vocab_size();
        let (think, close, nl2, brace, eos) =
            (one(&tok, "<think>"), one(&tok, "</think>"), one(&tok, "\n\n"), one(&tok, "{"), one(&tok, "<|im_end|>"));
        let word = one(&tok, "Hmm");
        let committed = Arc::new(Mutex::new(Vec::new()));
        let inner = Box::new(Only { allow: vec![brace, eos], committed: committed.clone() });
        let mut g = ReasoningGate::new(&tpl, "<|im_start|>assistant\n", &tok, &[eos], None, Some(inner)).ok().unwrap();
        // First token: what the constraint allows, or the opening tag.
        assert_eq!(allowed(&mut g, n), {
            let mut v = vec![brace, eos, think];
            v.sort();
            v
        });
        g.commit(think).unwrap();
        // Thinking: anything but EOS.
        let a = allowed(&mut g, n);
        assert_eq!(a.len(), n - 1);
        assert!(!a.contains(&eos));
        g.commit(word).unwrap();
        g.commit(close).unwrap();
        // The model wrote nothing after the tag: `\n\n` is fed, then the constraint holds.
        assert_eq!(allowed(&mut g, n), vec![nl2]);
        g.commit(nl2).unwrap();
        assert_eq!(allowed(&mut g, n), vec![brace.min(eos), brace.max(eos)]);
        g.commit(brace).unwrap();
        assert_eq!(*committed.lock().unwrap(), vec![brace]);

        // Or the model answers at once: the constraint sees every token.
        let committed = Arc::new(Mutex::new(Vec::new()));
        let inner = Box::new(Only { allow: vec![brace, eos], committed: committed.clone() });
        let mut g = ReasoningGate::new(&tpl, "<|im_start|>assistant\n", &tok, &[eos], None, Some(inner)).ok().unwrap();
        g.commit(brace).unwrap();
        assert_eq!(allowed(&mut g, n), vec![brace.min(eos), brace.max(eos)]);
        assert_eq!(*committed.lock().unwrap(), vec![brace]);
    }

    #[test]
    fn budget_closes_the_block_then_the_constraint_starts() {
        let (tok, tpl) = qwen3();
        let n = tok.vocab_size();
        let (brace, eos, word) = (one(&tok, "{"), one(&tok, "<|im_end|>"), one(&tok, "Hmm"));
        let committed = Arc::new(Mutex::new(Vec::new()));
        let inner = Box::new(Only { allow: vec![brace], committed: committed.clone() });
        let mut g =
            ReasoningGate::new(&tpl, "<|im_start|>assistant\n<think>\n", &tok, &[eos], Some(2), Some(inner)).ok().unwrap();
        g.commit(word).unwrap();
        g.commit(word).unwrap();
        // Spent: the closing text is forced token by token.
        let close = tok.encode("\n</think>\n\n", false).unwrap();
        for &t in &close {
            assert_eq!(allowed(&mut g, n), vec![t]);
            g.commit(t).unwrap();
        }
        assert_eq!(allowed(&mut g, n), vec![brace]);
        assert!(committed.lock().unwrap().is_empty());

        // Zero budget: closed before the first token.
        let mut g = ReasoningGate::new(&tpl, "<think>\n", &tok, &[eos], Some(0), None).ok().unwrap();
        assert_eq!(allowed(&mut g, n), vec![close[0]]);
    }

    #[test]
    fn no_gate_when_thinking_is_off_or_not_a_thinking_template() {
        let (tok, tpl) = qwen3();
        let off = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
        assert!(ReasoningGate::new(&tpl, off, &tok, &[], Some(3), None).is_err());
        assert!(ReasoningGate::new("{{ messages }}", "x", &tok, &[], Some(3), None).is_err());
        assert!(ReasoningGate::new(&tpl, "<think>\n", &tok, &[], None, None).is_err());
    }
}
