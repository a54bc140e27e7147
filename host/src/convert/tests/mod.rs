//! Tests on small synthetic GGUF files written here.

use std::path::Path;

use half::f16;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::gguf::{GgmlType, GgufFile, GgufValue, GgufValueType};
use super::quant::{self, QuantKind};
use super::*;

mod gemma;
mod gguf_writer;
mod llama;
mod reader;
mod tiny_llama;
mod vocab;

use gguf_writer::*;
use tiny_llama::*;
