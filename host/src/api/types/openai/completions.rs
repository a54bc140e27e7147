//! POST /v1/completions: the prompt, the request, log-probabilities and the
//! response.
use super::{FinishReasonOai, KeepAliveSpec, ResponseFormat, StopSpec, StreamOptions, Usage};
use crate::api::limits::MAX_PROMPTS;
use crate::api::types::schema::{int_items, nullable, serde_schema, untagged_union};
use poem_openapi::{registry::{MetaSchema, MetaSchemaRef}, Enum, Object};
use serde::Deserialize;
use std::collections::HashMap;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}


untagged_union!(PromptSpec, "PromptSpec",
    "`prompt`: a string, strings, token ids, or lists of token ids (none empty; token ids below the model's vocabulary size).", { Text(String), Texts(Vec<String>), Tokens(Vec<i64>), TokenLists(Vec<Vec<i64>>) }, [
    String::schema_ref(),
    <Vec<String>>::schema_ref().merge(MetaSchema { min_items: Some(1), max_items: Some(MAX_PROMPTS), ..MetaSchema::ANY }),
    int_items(0.0, u32::MAX as f64, 1),
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(int_items(0.0, u32::MAX as f64, 1))),
        min_items: Some(1),
        max_items: Some(MAX_PROMPTS),
        ..MetaSchema::new("array")
    })),
]);

/// POST /v1/completions
#[derive(Debug, Clone, Object, Deserialize)]
pub struct CompletionRequest {
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    pub prompt: PromptSpec,
    /// Default 16, as OpenAI.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "4294967295")))]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::temperature2")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit_open")]
    #[oai(nullable, validator(minimum(value = "0", exclusive), maximum(value = "1")))]
    pub top_p: Option<f32>,
    /// rmlx extension.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    /// rmlx extension.
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub min_p: Option<f32>,
    /// rmlx extension.
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::positive")]
    #[oai(nullable, validator(minimum(value = "0", exclusive)))]
    pub repetition_penalty: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub frequency_penalty: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::logit_bias")]
    #[oai(nullable, validator(minimum(value = "-100"), maximum(value = "100"), max_properties = 300))]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    #[oai(nullable)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[oai(nullable)]
    pub stop: Option<StopSpec>,
    /// Only 1.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "1")))]
    pub n: Option<u32>,
    /// Only 1.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "1")))]
    pub best_of: Option<u32>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream: Option<bool>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream_options: Option<StreamOptions>,
    /// 0 to 20: the log-probability of each token and this many alternatives.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "20")))]
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion; with `logprobs`, the prompt
    /// tokens' log-probabilities too (`max_tokens: 0` scores without generating).
    #[serde(default)]
    #[oai(nullable)]
    pub echo: Option<bool>,
    /// Not supported (400 when set).
    #[serde(default)]
    #[oai(nullable, validator(max_length = 0))]
    pub suffix: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub user: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<KeepAliveSpec>,
    // rmlx extension: the KV-cache families of this request (`KvCacheSpec`; a
    // doc comment here would wrap the union in an allOf that generated
    // clients cannot read).
    #[serde(default)]
    #[oai(nullable)]
    pub kv_cache: Option<crate::api::types::kv_cache::KvCacheSpec>,
    /// rmlx extension: speculative decoding's draft tokens per round at first
    /// for this request (0 turns speculation off; the model's default when
    /// absent). Only a model served with a draft model speculates.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "32")))]
    pub num_draft_tokens: Option<u32>,
    /// rmlx extension: the drafter this request drafts with, by kind
    /// (`draft`, `mtp`, `eagle3`, `dflash`): one the model was served with
    /// (its first, the default, when absent). Another kind is a 400.
    #[serde(default)]
    #[oai(nullable)]
    pub draft_kind: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// null for the first echoed prompt token (it has no context).
    #[serde(serialize_with = "crate::api::types::schema::finite_logprobs")]
    pub token_logprobs: Vec<Option<f32>>,
    #[serde(serialize_with = "crate::api::types::schema::finite_top_logprobs")]
    pub top_logprobs: Vec<Option<HashMap<String, f32>>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<u32>,
}

// By hand: the arrays' items are nullable, which a derived `Object` cannot say.
serde_schema!(CompletionLogprobs, "CompletionLogprobs", |_registry| {
    use poem_openapi::registry::MetaSchemaRef;
    let array = |items: MetaSchemaRef| MetaSchemaRef::Inline(Box::new(MetaSchema { items: Some(Box::new(items)), ..MetaSchema::new("array") }));
    MetaSchema {
        required: vec!["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        properties: vec![
            ("tokens", array(String::schema_ref())),
            ("token_logprobs", array(nullable(f32::schema_ref())).merge(MetaSchema {
                description: Some("null for the first echoed prompt token (it has no context)."),
                ..MetaSchema::ANY
            })),
            ("top_logprobs", array(nullable(<HashMap<String, f32>>::schema_ref()))),
            ("text_offset", array(u32::schema_ref()).merge(MetaSchema {
                description: Some("Character offset of each token in the returned text."),
                ..MetaSchema::ANY
            })),
        ],
        ..MetaSchema::new("object")
    }
});

#[derive(Debug, Clone, Object)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub logprobs: Option<CompletionLogprobs>,
    #[oai(nullable)]
    pub finish_reason: Option<FinishReasonOai>,
    /// rmlx extension: the generated token ids (useful for models without a tokenizer).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
pub enum TextCompletionObject {
    #[oai(rename = "text_completion")]
    TextCompletion,
}

/// A completion; the same object is each streamed event (then `data: [DONE]`).
#[derive(Debug, Clone, Object)]
pub struct Completion {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub usage: Option<Usage>,
    #[oai(nullable)]
    pub system_fingerprint: Option<String>,
}
