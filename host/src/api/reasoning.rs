//! Streaming split of reasoning ("thinking") from answer text for models that think inside
//! `<think>...</think>` (Qwen 3, DeepSeek-R1 and its distills, SmolLM 3, ...).
//!
//! The output may open the block itself (`<think>\n...</think>\n\nanswer`, Qwen 3) or the
//! prompt may already end with `<think>` (DeepSeek-R1, Qwen3 "thinking-2507"): then the output
//! starts inside the block ([`ReasoningSplitter::for_prompt`] tells the two apart).
//!
//! Thinking budget: the engine calls [`ReasoningSplitter::count_token`] once per generated
//! token; when the budget is spent while still thinking, it returns the text that closes the
//! block (e.g. `"\n</think>\n\n"`). The engine encodes it (`encode(text, false)`) and feeds
//! those tokens to the model as if sampled (their decoded text goes through
//! [`feed`](ReasoningSplitter::feed) like any other output), then samples the answer.

/// A piece of split output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningEvent {
    Thinking(String),
    Answer(String),
}

/// Where the output is relative to the thinking block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing but whitespace yet: the block may still open.
    Start,
    Thinking,
    /// After `</think>`: leading whitespace of the answer is dropped.
    AfterClose,
    Answer,
}

/// Splits `<think>` reasoning from the answer, as the text streams.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    open: String,
    close: String,
    st: Phase,
    buf: String,
    /// Whether thinking text has been emitted (leading whitespace is dropped before).
    thought: bool,
    budget: Option<usize>,
    used: usize,
    forced: bool,
}

impl ReasoningSplitter {
    /// A `<think>`/`</think>` splitter; `starts_in_thinking` when the prompt ends with `<think>`.
    pub fn new(starts_in_thinking: bool) -> Self {
        Self::with_tags("<think>", "</think>", starts_in_thinking)
    }

    /// A splitter for other tags (e.g. `<|begin_of_thought|>`).
    pub fn with_tags(open: &str, close: &str, starts_in_thinking: bool) -> Self {
        Self {
            open: open.to_owned(),
            close: close.to_owned(),
            st: if starts_in_thinking {
                Phase::Thinking
            } else {
                Phase::Start
            },
            buf: String::new(),
            thought: false,
            budget: None,
            used: 0,
            forced: false,
        }
    }

    /// The splitter a chat template calls for, given the rendered prompt: `None` when the
    /// template never mentions `<think>`; starts inside the block when the prompt ends with
    /// `<think>` (after trailing whitespace); starts after the block when the prompt ends
    /// with `</think>` (thinking turned off, as Qwen 3's `enable_thinking: false` renders an
    /// empty block): the output is all answer, its leading whitespace dropped.
    pub fn for_prompt(template_source: &str, rendered_prompt: &str) -> Option<Self> {
        if !template_source.contains("<think>") && !template_source.contains("</think>") {
            return None;
        }
        let tail = rendered_prompt.trim_end();
        let mut s = Self::new(tail.ends_with("<think>"));
        if tail.ends_with("</think>") {
            s.st = Phase::AfterClose;
        }
        Some(s)
    }

    /// Where the output is now: [`Phase::Start`] (the block may still open),
    /// [`Phase::Thinking`], [`Phase::AfterClose`] (closed, whitespace being skipped) or
    /// [`Phase::Answer`].
    pub fn phase(&self) -> Phase {
        self.st
    }

    /// The tags (open, close).
    pub fn tags(&self) -> (&str, &str) {
        (&self.open, &self.close)
    }

    /// Limits thinking to `tokens` generated tokens (see [`count_token`](Self::count_token)).
    pub fn with_budget(mut self, tokens: usize) -> Self {
        self.budget = Some(tokens);
        self
    }

    pub fn set_budget(&mut self, tokens: Option<usize>) {
        self.budget = tokens;
    }

    /// Whether the output is (or may still be about to be) inside the thinking block.
    pub fn is_thinking(&self) -> bool {
        self.st == Phase::Thinking
    }

    /// Thinking tokens counted so far.
    pub fn thinking_tokens(&self) -> usize {
        self.used
    }

    /// The text that closes the thinking block now, taking into account a partial closing
    /// tag already generated (held back); `None` when not thinking.
    pub fn closing_text(&self) -> Option<String> {
        if self.st != Phase::Thinking {
            return None;
        }
        let partial = super::tools::partial_marker_len(&self.buf, &[&self.close]);
        if partial > 0 {
            return Some(format!("{}\n\n", &self.close[partial..]));
        }
        Some(format!("\n{}\n\n", self.close))
    }

    /// Call once per generated token, after feeding its text. Returns the closing text to
    /// force-feed when the thinking budget has just been spent (once).
    pub fn count_token(&mut self) -> Option<String> {
        if self.st == Phase::Thinking {
            self.used += 1;
        }
        self.force_close_now()
    }

    /// The closing text if the budget is spent and the block is still open (once). Also
    /// useful before the first token (a zero budget with a prompt that opened the block).
    pub fn force_close_now(&mut self) -> Option<String> {
        let budget = self.budget?;
        if self.forced || self.st != Phase::Thinking || self.used < budget {
            return None;
        }
        self.forced = true;
        self.closing_text()
    }

    /// More output text; returns the newly known thinking / answer pieces.
    pub fn feed(&mut self, delta: &str) -> Vec<ReasoningEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        self.run(&mut out, false);
        out
    }

    /// End of output: flushes everything held back.
    pub fn finish(&mut self) -> Vec<ReasoningEvent> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        out
    }

    fn emit(out: &mut Vec<ReasoningEvent>, ev: ReasoningEvent) {
        match (out.last_mut(), ev) {
            (_, ReasoningEvent::Thinking(t) | ReasoningEvent::Answer(t)) if t.is_empty() => {}
            (Some(ReasoningEvent::Thinking(a)), ReasoningEvent::Thinking(b)) => a.push_str(&b),
            (Some(ReasoningEvent::Answer(a)), ReasoningEvent::Answer(b)) => a.push_str(&b),
            (_, ev) => out.push(ev),
        }
    }

    fn run(&mut self, out: &mut Vec<ReasoningEvent>, last: bool) {
        loop {
            match self.st {
                Phase::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() && !last {
                        return;
                    }
                    if t.starts_with(self.open.as_str()) {
                        let skip = self.buf.len() - t.len() + self.open.len();
                        self.buf.drain(..skip);
                        self.st = Phase::Thinking;
                    } else if self.open.starts_with(t) && !last {
                        return;
                    } else {
                        self.st = Phase::Answer;
                    }
                }
                Phase::Thinking => {
                    if !self.thought {
                        let t = self.buf.trim_start();
                        let skip = self.buf.len() - t.len();
                        self.buf.drain(..skip);
                    }
                    if let Some(p) = self.buf.find(self.close.as_str()) {
                        let think = self.buf[..p].trim_end().to_owned();
                        self.buf.drain(..p + self.close.len());
                        self.thought |= !think.is_empty();
                        Self::emit(out, ReasoningEvent::Thinking(think));
                        self.st = Phase::AfterClose;
                        continue;
                    }
                    if last {
                        let think = std::mem::take(&mut self.buf);
                        Self::emit(out, ReasoningEvent::Thinking(think.trim_end().to_owned()));
                        return;
                    }
                    // Hold back a possible closing tag and trailing whitespace (dropped
                    // before the tag).
                    let hold = super::tools::partial_marker_len(&self.buf, &[&self.close]);
                    let cut = self.buf[..self.buf.len() - hold].trim_end().len();
                    if cut > 0 {
                        let think: String = self.buf.drain(..cut).collect();
                        self.thought = true;
                        Self::emit(out, ReasoningEvent::Thinking(think));
                    }
                    return;
                }
                Phase::AfterClose => {
                    let t = self.buf.trim_start();
                    let skip = self.buf.len() - t.len();
                    self.buf.drain(..skip);
                    if self.buf.is_empty() {
                        return;
                    }
                    self.st = Phase::Answer;
                }
                Phase::Answer => {
                    let a = std::mem::take(&mut self.buf);
                    Self::emit(out, ReasoningEvent::Answer(a));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(s: &mut ReasoningSplitter, chunks: &[&str]) -> (String, String) {
        let mut ev = Vec::new();
        for c in chunks {
            ev.extend(s.feed(c));
        }
        ev.extend(s.finish());
        let (mut t, mut a) = (String::new(), String::new());
        for e in ev {
            match e {
                ReasoningEvent::Thinking(x) => t.push_str(&x),
                ReasoningEvent::Answer(x) => a.push_str(&x),
            }
        }
        (t, a)
    }

    /// Same result whole, char by char and split anywhere in two.
    fn all_ways(starts_in: bool, input: &str) -> (String, String) {
        let whole = collect(&mut ReasoningSplitter::new(starts_in), &[input]);
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(collect(&mut ReasoningSplitter::new(starts_in), &refs), whole);
        for (i, _) in input.char_indices().skip(1) {
            let (a, b) = input.split_at(i);
            assert_eq!(
                collect(&mut ReasoningSplitter::new(starts_in), &[a, b]),
                whole,
                "split at {i}"
            );
        }
        whole
    }

    #[test]
    fn qwen3_style_output_opens_the_block() {
        let (t, a) = all_ways(
            false,
            "<think>\nLet me think. 2 < 3 </thin.\n</think>\n\nThe answer is 4.",
        );
        assert_eq!(t, "Let me think. 2 < 3 </thin.");
        assert_eq!(a, "The answer is 4.");
    }

    #[test]
    fn prompt_opened_block() {
        let (t, a) = all_ways(true, "Hmm, 東京.\n</think>\n\nAnswer");
        assert_eq!(t, "Hmm, 東京.");
        assert_eq!(a, "Answer");
    }

    #[test]
    fn no_thinking_and_empty_thinking() {
        assert_eq!(all_ways(false, "Plain <think> answer"), (String::new(), "Plain <think> answer".into()));
        assert_eq!(
            all_ways(false, "<think>\n\n</think>\n\nHi"),
            (String::new(), "Hi".into())
        );
        // Cut off while thinking: all of it is thinking.
        assert_eq!(all_ways(true, "still going </thi"), ("still going </thi".into(), String::new()));
        assert_eq!(all_ways(false, "  <thi"), (String::new(), "  <thi".into()));
    }

    #[test]
    fn streams_thinking_early_holding_only_tag_prefixes() {
        let mut s = ReasoningSplitter::new(false);
        assert!(s.feed("<thi").is_empty());
        assert!(s.feed("nk>\n").is_empty());
        assert_eq!(s.feed("one two\n"), vec![ReasoningEvent::Thinking("one two".into())]);
        assert!(s.is_thinking());
        assert_eq!(s.feed("three </"), vec![ReasoningEvent::Thinking("\nthree".into())]);
        assert!(s.feed("think>\n\n").is_empty());
        assert!(!s.is_thinking());
        assert_eq!(s.feed("Yes"), vec![ReasoningEvent::Answer("Yes".into())]);
    }

    #[test]
    fn detection_from_template_and_prompt() {
        assert!(ReasoningSplitter::for_prompt("{{ messages }}", "x").is_none());
        let tpl = "{{ '<think>' }}";
        assert!(!ReasoningSplitter::for_prompt(tpl, "<|im_start|>assistant\n").unwrap().is_thinking());
        assert!(ReasoningSplitter::for_prompt(tpl, "<|im_start|>assistant\n<think>\n").unwrap().is_thinking());
        let off = ReasoningSplitter::for_prompt(tpl, "assistant\n<think>\n\n</think>\n\n").unwrap();
        assert_eq!(off.phase(), Phase::AfterClose);
        let mut off2 = off.clone();
        // Thinking turned off: all answer, leading whitespace dropped, `<think>` is text.
        let mut ev = off2.feed("\n");
        ev.extend(off2.feed("Hi <think>"));
        ev.extend(off2.finish());
        assert_eq!(ev, vec![ReasoningEvent::Answer("Hi <think>".into())]);
    }

    #[test]
    fn budget_forces_close() {
        let mut s = ReasoningSplitter::new(false).with_budget(3);
        let mut forced = None;
        for (i, tok) in ["<think>", "\na", " b", " c", " d"].iter().enumerate() {
            s.feed(tok);
            if let Some(t) = s.count_token() {
                forced = Some((i, t));
                break;
            }
        }
        // The token that opens the block counts (as in the engine's count), then a, b.
        assert_eq!(forced, Some((2, "\n</think>\n\n".to_string())));
        // The engine feeds the forced text back; the block closes.
        s.feed("\n</think>\n\n");
        assert!(!s.is_thinking());
        assert!(s.count_token().is_none());
        assert_eq!(s.feed("ans"), vec![ReasoningEvent::Answer("ans".into())]);

        // A partial closing tag already generated is completed, not repeated.
        let mut s = ReasoningSplitter::new(true).with_budget(1);
        s.feed("x </thi");
        assert_eq!(s.count_token(), Some("nk>\n\n".into()));
        // Zero budget with the block opened by the prompt: close before any token.
        let mut s = ReasoningSplitter::new(true).with_budget(0);
        assert_eq!(s.force_close_now(), Some("\n</think>\n\n".into()));
        assert_eq!(s.force_close_now(), None);
    }
}
