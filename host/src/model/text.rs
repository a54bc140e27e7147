//! The text side of a model: tokenizer, chat template and EOS ids.
use super::{
    chat_template::{ChatTemplate, RenderOptions},
    generation_config::eos_ids,
    tokenizer::{StreamDecoder, Tokenizer},
    ModelDir,
};
use anyhow::{anyhow, Result};

pub struct TextSide {
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

impl TextSide {
    /// Tokenizer and template are optional (tiny test models have neither).
    pub fn load(dir: &ModelDir) -> Result<Self> {
        let tokenizer = if dir.file("tokenizer.json").is_file() {
            Some(Tokenizer::from_model_dir(&dir.path)?)
        } else {
            None
        };
        let template = match &tokenizer {
            Some(_) => ChatTemplate::from_model_dir(&dir.path)?,
            None => None,
        };
        let eos_ids = eos_ids(&dir.path, tokenizer.as_ref());
        Ok(Self { tokenizer, template, eos_ids })
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| anyhow!("the model has no tokenizer.json: give --prompt-tokens"))
    }

    /// Prompt text -> ids: through the chat template (as one user turn, after an
    /// optional system turn) when `chat`, else encoded with the tokenizer's
    /// special tokens (BOS) as Hugging Face does.
    pub fn prompt_ids(&self, prompt: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
        let tok = self.tokenizer()?;
        if !chat {
            return tok.encode(prompt, true);
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": prompt}));
        let text = self.render(&messages, &RenderOptions::new(true))?;
        // The template already holds BOS where the model wants it.
        tok.encode(&text, false)
    }

    pub fn render(&self, messages: &[serde_json::Value], opts: &RenderOptions) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| anyhow!("the model has no chat template"))?;
        t.render(messages, opts).map_err(|e| anyhow!("chat template: {e}"))
    }

    pub fn stream_decoder(&self) -> Option<StreamDecoder> {
        self.tokenizer.as_ref().map(|t| t.stream_decoder(true))
    }

    /// Generated ids -> text (special tokens skipped); empty without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.tokenizer {
            Some(t) => t.decode(ids, true),
            None => Ok(String::new()),
        }
    }
}
