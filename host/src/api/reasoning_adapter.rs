//! Adapts `api::reasoning` (thinking vs answer, thinking budget) to the
//! routes' splitter and the engine's logits hook.
use super::generation::ReasoningSplit;
use super::reasoning::{ReasoningEvent, ReasoningSplitter};
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

/// Closes the thinking block after `budget` thinking tokens by forcing the
/// closing text's tokens (the model then answers).
pub struct ThinkingBudget {
    splitter: ReasoningSplitter,
    decoder: StreamDecoder,
    tokenizer: Tokenizer,
    forced: VecDeque<u32>,
}

impl ThinkingBudget {
    pub fn new(template_source: &str, rendered_prompt: &str, tokenizer: &Tokenizer, budget: u32) -> Option<Self> {
        let mut splitter = ReasoningSplitter::for_prompt(template_source, rendered_prompt)?.with_budget(budget as usize);
        let mut forced = VecDeque::new();
        if let Some(close) = splitter.force_close_now() {
            forced.extend(tokenizer.encode(&close, false).ok()?);
        }
        Some(Self { splitter, decoder: tokenizer.stream_decoder(false), tokenizer: tokenizer.clone(), forced })
    }
}

impl LogitsHook for ThinkingBudget {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        if let Some(&t) = self.forced.front() {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != t as usize {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        let text = self.decoder.step(token)?;
        let _ = self.splitter.feed(&text);
        if self.forced.front() == Some(&token) {
            self.forced.pop_front();
            return Ok(());
        }
        if let Some(close) = self.splitter.count_token() {
            self.forced.extend(self.tokenizer.encode(&close, false)?);
        }
        Ok(())
    }
}
