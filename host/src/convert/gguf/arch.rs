//! Per-architecture dispatch for GGUF conversion: picks the llama, qwen2 or
//! Gemma plan from `general.architecture` and forwards name mapping, q/k
//! un-permutation (llama only), the Gemma norm offset and the config files to it.

use anyhow::{bail, Result};
use serde_json::Value;

use super::gemma::{self, GemmaPlan, Gen};
use super::qwen2::{self, Qwen2Plan};
use super::GgufFile;
use crate::convert::llama::{self, LlamaPlan, MappedName};
use crate::convert::tokenizer::TokenizerFiles;

/// `general.architecture` values the converter maps.
pub const SUPPORTED: &[&str] = &["llama", "gemma", "gemma2", "gemma3", "qwen2"];

/// The model plan of one GGUF.
#[derive(Debug, Clone)]
pub enum ModelPlan {
    Llama(LlamaPlan),
    Qwen2(Qwen2Plan),
    Gemma(GemmaPlan),
}

impl ModelPlan {
    pub fn new(g: &GgufFile, arch: &str) -> Result<Self> {
        if arch == "llama" {
            return Ok(ModelPlan::Llama(LlamaPlan::new(g, arch)?));
        }
        if arch == "qwen2" {
            return Ok(ModelPlan::Qwen2(Qwen2Plan::new(g)?));
        }
        if let Some(gen) = Gen::from_arch(arch) {
            return Ok(ModelPlan::Gemma(GemmaPlan::new(g, gen)?));
        }
        bail!(
            "unsupported general.architecture '{}': supported are {}",
            arch,
            SUPPORTED.join(", ")
        )
    }

    pub fn map_tensor_name(&self, name: &str) -> Result<Option<MappedName>> {
        match self {
            ModelPlan::Llama(_) => llama::map_tensor_name(name),
            ModelPlan::Qwen2(_) => qwen2::map_tensor_name(name),
            ModelPlan::Gemma(p) => gemma::map_tensor_name(p.gen, name),
        }
    }

    /// Heads to un-permute q/k rows with (llama only; qwen2 and Gemma are not permuted).
    pub fn unpermute_heads(&self, m: &MappedName) -> Option<usize> {
        match self {
            ModelPlan::Llama(p) => p.unpermute_heads(m),
            ModelPlan::Qwen2(_) | ModelPlan::Gemma(_) => None,
        }
    }

    /// True if the tensor carries llama.cpp's Gemma norm `+ 1`.
    pub fn norm_offset(&self, m: &MappedName) -> bool {
        match self {
            ModelPlan::Llama(_) | ModelPlan::Qwen2(_) => false,
            ModelPlan::Gemma(p) => p.norm_offset(m),
        }
    }

    pub fn context_length(&self) -> Option<u64> {
        match self {
            ModelPlan::Llama(p) => p.context_length,
            ModelPlan::Qwen2(p) => p.context_length,
            ModelPlan::Gemma(p) => p.context_length,
        }
    }

    pub fn warnings(&self) -> &[String] {
        match self {
            ModelPlan::Llama(p) => &p.warnings,
            ModelPlan::Qwen2(p) => &p.warnings,
            ModelPlan::Gemma(p) => &p.warnings,
        }
    }

    pub fn config_json(
        &self,
        g: &GgufFile,
        quant: Option<&Value>,
        tok: Option<&TokenizerFiles>,
    ) -> Result<Value> {
        match self {
            ModelPlan::Llama(p) => p.config_json(g, quant, tok),
            ModelPlan::Qwen2(p) => p.config_json(g, quant, tok),
            ModelPlan::Gemma(p) => p.config_json(g, quant, tok),
        }
    }

    pub fn generation_config(&self, tok: Option<&TokenizerFiles>) -> Value {
        crate::convert::llama::generation_config(tok)
    }
}
