//! Text side of a model: tokenizer, chat template, EOS ids (placeholder while wiring).
use super::ModelDir;
use anyhow::{bail, Result};

pub struct TextSide {
    pub eos_ids: Vec<u32>,
}

pub struct NoStream;
impl NoStream {
    pub fn push(&mut self, _t: u32) -> Option<String> {
        None
    }
}

impl TextSide {
    pub fn load(_dir: &ModelDir) -> Result<Self> {
        Ok(Self { eos_ids: vec![] })
    }
    pub fn prompt_ids(&self, _p: &str, _chat: bool, _system: Option<&str>) -> Result<Vec<u32>> {
        bail!("no tokenizer")
    }
    pub fn stream_decoder(&self) -> Option<NoStream> {
        None
    }
    pub fn decode(&self, _ids: &[u32]) -> Result<String> {
        Ok(String::new())
    }
}
