//! POST /v1/embeddings (OpenAI): inputs are tokenized here (off the async
//! threads), embedded on the engine thread (`Worker::embed`,
//! engine/embed.rs) and returned as numbers or base64.
use super::errors::{ApiError, OaiResult, OpenAIError};
use super::generation as g;
use super::types::embeddings::*;
use super::types::ApiJson;
use super::{State, Tag};
use crate::engine::embed::{base64_f32, not_an_embedder, EmbedTokenizer};
use crate::engine::embed_image::{doc_ids, DOC_AFTER, DOC_BEFORE};
use crate::engine::media::PromptImage;
use crate::media::{ImageSource, MediaHash, Pixels};
use crate::engine::worker::ModelEntry;
use crate::model::pooling::EmbedTasks;
use poem_openapi::{payload::Json, OpenApi};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub struct EmbeddingsApi(pub State);

#[OpenApi]
impl EmbeddingsApi {
    /// Create embeddings
    ///
    /// OpenAI's embeddings for an embedding model (a BERT-family encoder, or
    /// a decoder with sentence-transformers files such as Qwen3-Embedding).
    /// `input` is a string, an array of strings, an array of token ids, or
    /// an array of those (one embedding per input, in order; at most 2048).
    /// Strings are tokenized with the model's special tokens and truncated
    /// to its limit (sentence-transformers' `max_seq_length`, else its
    /// positions); token ids are used exactly as given and must fit the
    /// limit. Pooling and normalisation follow the model's
    /// sentence-transformers files. `encoding_format: base64` returns each
    /// vector's little-endian float32 bytes in base64.
    #[oai(path = "/v1/embeddings", method = "post", operation_id = "createEmbedding", tag = "Tag::OpenAI")]
    async fn create(&self, body: ApiJson<EmbeddingRequest>) -> OaiResult<Json<CreateEmbeddingResponse>> {
        create(self.0.clone(), body.0).await.map(Json).map_err(OpenAIError::from)
    }
}

/// The embedding tokenizer of each model (by id and directory), built once.
fn tokenizer(entry: &Arc<ModelEntry>, limit: usize) -> Result<Arc<EmbedTokenizer>, ApiError> {
    static CACHE: OnceLock<Mutex<HashMap<(String, std::path::PathBuf), Arc<EmbedTokenizer>>>> = OnceLock::new();
    let key = (entry.id.clone(), entry.path.clone());
    if let Some(t) = CACHE.get_or_init(Default::default).lock().unwrap().get(&key) {
        return Ok(t.clone());
    }
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| {
        ApiError::bad_request("input", format!("model `{}` has no tokenizer: give the input as token ids", entry.id))
    })?;
    let t = Arc::new(EmbedTokenizer::new(tok, limit).map_err(|e| ApiError::internal(format!("{e:#}")))?);
    CACHE.get_or_init(Default::default).lock().unwrap().insert(key, t.clone());
    Ok(t)
}

/// Token-id input `v` (input `i` of a list when `i` is Some), checked
/// against the vocabulary and the token limit.
fn token_ids(v: &[i64], i: Option<usize>, vocab: Option<usize>, limit: usize) -> Result<Vec<u32>, ApiError> {
    let at = i.map(|i| format!(" (input {i})")).unwrap_or_default();
    if v.is_empty() {
        return Err(ApiError::bad_request("input", format!("`input` holds an empty token list{at}")));
    }
    if v.len() > limit {
        return Err(ApiError::bad_request("input", format!("`input` holds {} tokens{at}; this model takes at most {limit}", v.len()))
            .with_code("context_length_exceeded"));
    }
    v.iter()
        .map(|&t| match u32::try_from(t) {
            Ok(id) if vocab.is_none_or(|n| (id as usize) < n) => Ok(id),
            _ => Err(ApiError::bad_request(
                "input",
                format!("`input` holds token id {t}{at}, outside this model's vocabulary of {}", vocab.unwrap_or(u32::MAX as usize)),
            )),
        })
        .collect()
}

/// A multi-task embedder's task index and text prefix for the request's
/// `task` and `prompt_name` (docs/SERVER.md, Embeddings); (None, None) for
/// other models, which refuse both fields.
fn task_and_prefix(
    id: &str,
    spec: &crate::model::pooling::EmbedSpec,
    task: Option<&str>,
    prompt_name: Option<&str>,
) -> Result<(Option<usize>, Option<&'static str>), ApiError> {
    let Some(tasks) = &spec.tasks else {
        for (field, v) in [("task", task), ("prompt_name", prompt_name)] {
            if v.is_some() {
                return Err(ApiError::bad_request(field, format!("model `{id}` has no task adapters: `{field}` is for multi-task embedders")));
            }
        }
        return Ok((None, None));
    };
    // Jina's API form: `retrieval.query`, `code.passage`.
    let (name, implied) = match task.and_then(|t| t.rsplit_once('.')) {
        Some((t, p)) if EmbedTasks::PROMPTS.iter().any(|(n, _)| *n == p) => (Some(t), Some(p)),
        _ => (task, None),
    };
    let t = match name {
        None => tasks.default,
        Some(n) => tasks.task(n).ok_or_else(|| {
            ApiError::bad_request("task", format!("`task` must be one of {:?} for model `{id}`, got `{n}`", tasks.names))
        })?,
    };
    let pn = match (prompt_name, implied) {
        (Some(p), Some(q)) if p != q => {
            return Err(ApiError::bad_request("prompt_name", format!("`prompt_name` `{p}` contradicts `task` `{}`", task.unwrap_or(""))))
        }
        (Some(p), _) => p,
        (None, Some(q)) => q,
        (None, None) => "query",
    };
    let prefix = tasks.prefix(t, pn).ok_or_else(|| {
        let names: Vec<&str> = EmbedTasks::PROMPTS.iter().map(|(n, _)| *n).collect();
        ApiError::bad_request("prompt_name", format!("`prompt_name` must be one of {names:?}, got `{pn}`"))
    })?;
    Ok((Some(t), Some(prefix)))
}

pub async fn create(state: State, req: EmbeddingRequest) -> Result<CreateEmbeddingResponse, ApiError> {
    let entry = state.model(&req.model)?;
    let Some(spec) = entry.embedding.clone() else {
        return Err(ApiError::bad_request("model", format!("{}", not_an_embedder(&entry.id))).with_code("model_not_embedding"));
    };
    let (task, prefix) = task_and_prefix(&entry.id, &spec, req.task.as_deref(), req.prompt_name.as_deref())?;
    let dims = match (req.dimensions, &spec.tasks) {
        (None, Some(t)) => t.default_dims,
        (Some(d), Some(t)) => {
            if !t.dims.contains(&(d as usize)) {
                return Err(ApiError::bad_request(
                    "dimensions",
                    format!("`dimensions` must be one of {:?} for model `{}` (its matryoshka_dims)", t.dims, entry.id),
                ));
            }
            Some(d as usize)
        }
        (None, None) => None,
        (Some(d), None) => match spec.truncate_dim {
            Some(max) if (d as usize) <= max => Some(d as usize),
            Some(max) => {
                return Err(ApiError::bad_request("dimensions", format!("`dimensions` must be between 1 and {max} for model `{}`", entry.id)))
            }
            None => {
                return Err(ApiError::bad_request(
                    "dimensions",
                    format!(
                        "model `{}` does not support `dimensions` (it declares no Matryoshka `truncate_dim` in config_sentence_transformers.json)",
                        entry.id
                    ),
                ))
            }
        },
    };
    let keep_alive = g::keep_alive(&req.keep_alive)?;
    let count = match &req.input {
        EmbeddingInput::Texts(v) => v.len(),
        EmbeddingInput::TokenLists(v) => v.len(),
        EmbeddingInput::Items(v) => v.len(),
        _ => 1,
    };
    if count == 0 {
        return Err(ApiError::bad_request("input", "`input` is empty"));
    }
    if count > MAX_INPUTS {
        return Err(ApiError::bad_request("input", format!("`input` holds {count} inputs; at most {MAX_INPUTS} are allowed")));
    }
    let limit = spec.max_tokens;
    let docs = image_docs(&state, &entry, &spec, &req.input).await?;
    let (vocab, e2) = (entry.vocab_size, entry.clone());
    let input = req.input;
    let (rows, images): (Vec<Vec<u32>>, Vec<(usize, PromptImage)>) = g::blocking(move || {
        let text = |s: &str, i: Option<usize>| -> Result<Vec<u32>, ApiError> {
            if s.is_empty() {
                let at = i.map(|i| format!(" (input {i})")).unwrap_or_default();
                return Err(ApiError::bad_request("input", format!("`input` holds an empty string{at}")));
            }
            let prefixed;
            let s = match prefix {
                Some(p) => {
                    prefixed = format!("{p}{s}");
                    prefixed.as_str()
                }
                None => s,
            };
            let ids = tokenizer(&e2, limit)?.encode(s).map_err(|e| ApiError::internal(format!("{e:#}")))?;
            if ids.is_empty() {
                return Err(ApiError::bad_request("input", "an input has no tokens"));
            }
            Ok(ids)
        };
        let rows = match &input {
            EmbeddingInput::Text(s) => vec![text(s, None)?],
            EmbeddingInput::Texts(v) => v.iter().enumerate().map(|(i, s)| text(s, Some(i))).collect::<Result<_, _>>()?,
            EmbeddingInput::Tokens(v) => vec![token_ids(v, None, vocab, limit)?],
            EmbeddingInput::TokenLists(v) => {
                v.iter().enumerate().map(|(i, t)| token_ids(t, Some(i), vocab, limit)).collect::<Result<_, _>>()?
            }
            EmbeddingInput::Items(v) => {
                // Image items get their document ids below; a placeholder row here.
                v.iter().enumerate().map(|(i, it)| it.text.as_deref().map_or(Ok(Vec::new()), |s| text(s, Some(i)))).collect::<Result<_, _>>()?
            }
        };
        place_images(&e2, limit, rows, docs)
    })
    .await?;
    let tokens: usize = rows.iter().map(Vec::len).sum();
    let vecs = state.worker.embed_mixed(entry.clone(), rows, images, dims, task, keep_alive).await.map_err(g::worker_error)?;
    let base64 = req.encoding_format == Some(EncodingFormat::Base64);
    let data = vecs
        .into_iter()
        .enumerate()
        .map(|(i, v)| Embedding {
            object: EmbeddingObject::Embedding,
            index: i as u32,
            embedding: if base64 { EmbeddingValue::Base64(base64_f32(&v)) } else { EmbeddingValue::Float(v) },
        })
        .collect();
    let tokens = tokens.min(u32::MAX as usize) as u32;
    Ok(CreateEmbeddingResponse {
        object: ListObject::List,
        data,
        model: entry.id.clone(),
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    })
}

/// A request's image items, loaded and preprocessed (api/images.rs, chat's
/// rules): per image, (input index, pixels, hash, placeholder count), and
/// the model's image token. Each item must hold exactly one of `text` and
/// `image`; images need a multi-task embedder with a vision tower.
struct ImageItems {
    images: Vec<(usize, Pixels, MediaHash, usize)>,
    image_token: u32,
    vision: (u32, u32),
}

async fn image_docs(
    state: &State,
    entry: &Arc<ModelEntry>,
    spec: &crate::model::pooling::EmbedSpec,
    input: &EmbeddingInput,
) -> Result<Option<ImageItems>, ApiError> {
    let EmbeddingInput::Items(items) = input else {
        return Ok(None);
    };
    let mut refs = Vec::new();
    let mut at = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let part = format!("input[{i}]");
        match (&it.text, &it.image) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                refs.push(super::images::ImageRef { part, source: Ok(ImageSource::from_url(url.clone())) });
                at.push(i);
            }
            _ => return Err(ApiError::bad_request(&part, format!("{part} must hold exactly one of `text` and `image`"))),
        }
    }
    if refs.is_empty() {
        return Ok(None);
    }
    let Some(vision) = spec.tasks.as_ref().and_then(|t| t.vision) else {
        return Err(ApiError::bad_request(
            "input",
            format!("model `{}` takes no images: image inputs are for multi-task embedders with a vision tower (jina-embeddings-v4)", entry.id),
        ));
    };
    let loaded = super::images::load(state, entry, refs).await?.expect("images were given");
    let image_token = loaded.spec.image_token;
    let images = at.into_iter().zip(loaded.images).zip(loaded.counts).map(|((i, (p, h)), n)| (i, p, h, n)).collect();
    Ok(Some(ImageItems { images, image_token, vision }))
}

/// `rows` with each image item's document ids in its place, and the images
/// with their placeholder spans.
fn place_images(
    entry: &Arc<ModelEntry>,
    limit: usize,
    mut rows: Vec<Vec<u32>>,
    docs: Option<ImageItems>,
) -> Result<(Vec<Vec<u32>>, Vec<(usize, PromptImage)>), ApiError> {
    let Some(docs) = docs else {
        return Ok((rows, Vec::new()));
    };
    // The document's text around the image (a few tokens).
    let tok = tokenizer(entry, limit)?;
    let enc = |s: &str| tok.encode(s).map_err(|e| ApiError::internal(format!("{e:#}")));
    let (before, after) = (enc(DOC_BEFORE)?, enc(DOC_AFTER)?);
    let mut images = Vec::with_capacity(docs.images.len());
    for (i, pixels, hash, count) in docs.images {
        let (ids, span) = doc_ids(&before, &after, docs.vision, docs.image_token, count);
        if ids.len() > limit {
            return Err(ApiError::bad_request(
                format!("input[{i}]"),
                format!("input[{i}]: the image takes {} tokens; this model takes at most {limit}", ids.len()),
            )
            .with_code("context_length_exceeded"));
        }
        rows[i] = ids;
        images.push((i, PromptImage::new(pixels, hash, span)));
    }
    Ok((rows, images))
}
