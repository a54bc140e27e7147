//! Minimal, streaming-friendly GGUF (v2/v3) reader.
//!
//! Parses the header, every metadata key/value (all value types, nested
//! arrays included) and the tensor-info table, and computes the absolute
//! offset of each tensor's data. Tensor *data* is not read here; callers use
//! [`GgufFile::read_tensor_bytes`] one tensor at a time.
//!
//! Layout (little-endian), see ggml's `docs/gguf.md`:
//! ```text
//! magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//! n_kv x (string key | u32 value_type | value)
//! n_tensors x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset)
//! padding to `general.alignment` (default 32)
//! tensor data (each tensor at data_start + offset)
//! ```
//! where `string` is `u64 len | len bytes` (v1 used u32 lengths; v1 is refused).
//!
//! [`types`] holds the value and tensor types, [`reader`] the parser,
//! [`dequant`] one f32 dequantizer per GGML type. Per-architecture mapping lives in the submodules: [`arch`] dispatches on
//! `general.architecture` to `convert::llama`, [`qwen2`] or [`gemma`]; [`spm`] rebuilds
//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizers.

pub mod arch;
pub mod dequant;
pub mod gemma;
pub(crate) mod plan;
pub mod qwen2;
mod reader;
pub mod spm;
mod types;

pub use reader::GgufFile;
pub use types::{GgmlType, GgufTensorInfo, GgufValue, GgufValueType};

/// GGUF magic, the first four bytes of every file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment used when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const GGML_MAX_DIMS: u32 = 4;

