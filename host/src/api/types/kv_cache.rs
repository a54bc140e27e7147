//! The rmlx extension field `kv_cache` of OpenAI chat completions, OpenAI
//! completions and Anthropic messages: the KV-cache families this request's
//! keys and values are stored in (docs/KV_CACHE.md).
use super::schema::untagged_union;
use poem_openapi::{registry::MetaSchema, Object};
use serde::Deserialize;

/// `kv_cache`: one family for keys and values (`"q4"`), or one per side
/// (`{"k": "q8", "v": "turbo3"}`; a side left out takes the model's own).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub enum KvCacheSpec {
    Both(String),
    Sides(KvCacheSides),
}

/// A string or an object, nothing else (serde would read an array into the
/// object's fields by position).
impl TryFrom<serde_json::Value> for KvCacheSpec {
    type Error = String;
    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        match v {
            serde_json::Value::String(s) => Ok(Self::Both(s)),
            o @ serde_json::Value::Object(_) => serde_json::from_value(o).map(Self::Sides).map_err(|e| e.to_string()),
            other => Err(format!("`kv_cache` is a family name or {{\"k\": NAME, \"v\": NAME}}, not {other}")),
        }
    }
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
