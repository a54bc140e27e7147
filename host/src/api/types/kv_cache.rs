//! The rmlx extension field `kv_cache` of OpenAI chat completions, OpenAI
//! completions and Anthropic messages: the KV-cache families this request's
//! keys and values are stored in (docs/KV_CACHE.md).
use super::schema::untagged_union;
use poem_openapi::{registry::MetaSchema, Object};
use serde::Deserialize;

/// `kv_cache`: one family for keys and values (`"q4"`), or one per side
/// (`{"k": "q8", "v": "turbo3"}`; a side left out takes the model's own).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KvCacheSpec {
    Both(String),
    Sides(KvCacheSides),
}

/// `kv_cache` per side.
#[derive(Debug, Clone, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCacheSides {
    /// The keys' family (left out: the model's own).
    #[serde(default)]
    #[oai(nullable)]
    pub k: Option<String>,
    /// The values' family (left out: the model's own).
    #[serde(default)]
    #[oai(nullable)]
    pub v: Option<String>,
}

untagged_union!(KvCacheSpec, "KvCacheSpec",
    "rmlx extension: the KV-cache families of this request, as `rmlx serve --kv-cache` names them \
     (`f16`, `bf16`, `f32`, `fp8`, `q8`, `q4`, `q2`, `turbo4`, `turbo3`, ...: `rmlx plugins` lists \
     those installed): one name for keys and values, or `{\"k\": NAME, \"v\": NAME}` (a side left \
     out, or `auto`, takes the model's own). Requests of different families run side by side in \
     one batch, each family in its own KV pool; an unknown name is a 400.",
    { Both(String), Sides(KvCacheSides) }, [
    String::schema_ref().merge(MetaSchema { min_length: Some(1), ..MetaSchema::ANY }),
    KvCacheSides::schema_ref(),
]);
