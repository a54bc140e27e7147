//! Image parts of chat requests (issue 15): OpenAI `image_url` parts and
//! Anthropic `image` blocks become template content parts (`{"type":
//! "image"}`, which e.g. Gemma 3's template renders as `<start_of_image>`)
//! and images loaded, decoded and preprocessed for the model
//! (crate::media). The prompt's image markers are expanded as the model's
//! processor does it and each image's placeholder positions recorded
//! (media/vision.rs); the engine runs the vision tower (engine/media.rs).
//!
//! Order of checks: a model that takes no images answers 400 before any
//! image is fetched; then each image in prompt order (a bad one: 400 naming
//! its part, e.g. `messages[1].content[2]`).
use super::errors::ApiError;
use super::generation as g;
use super::State;
use crate::engine::media::{PromptImage, PromptMedia};
use crate::engine::worker::ModelEntry;
use crate::media::{decode_image, load_source, vision::VisionSpec, ImageSource, MediaError, MediaHash, Pixels};
use serde_json::{json, Value};
use std::sync::Arc;

/// One image part of a request, as parsed (a malformed source stays an
/// error until the model is known to take images).
pub struct ImageRef {
    /// The request part, e.g. `messages[1].content[2]`.
    pub part: String,
    pub source: Result<ImageSource, MediaError>,
}

/// A turn's content parts for the chat template.
#[derive(Default)]
pub struct Content {
    parts: Vec<Value>,
    text: String,
    images: usize,
}

impl Content {
    pub fn text(&mut self, t: &str) {
        self.text.push_str(t);
        self.parts.push(json!({"type": "text", "text": t}));
    }
    pub fn image(&mut self) {
        self.images += 1;
        self.parts.push(json!({"type": "image"}));
    }
    /// A string, or with images the list of parts (as HF processors pass them).
    pub fn value(self) -> Value {
        if self.images == 0 {
            Value::String(self.text)
        } else {
            Value::Array(self.parts)
        }
    }
}

/// A request's images, loaded, with what the prompt needs to place them.
pub struct Loaded {
    pub spec: VisionSpec,
    pub images: Vec<(Pixels, MediaHash)>,
}

fn media_error(e: MediaError, part: &str) -> ApiError {
    match e {
        MediaError::Config(_) => ApiError::internal(e.to_string()),
        _ => ApiError::bad_request(part, e.to_string()),
    }
}

/// The model's image spec, or a 400 when it takes none.
pub async fn vision(entry: &Arc<ModelEntry>) -> Result<VisionSpec, ApiError> {
    let e = entry.clone();
    g::blocking(move || {
        let text = e.text().map_err(|err| ApiError::internal(format!("{err:#}")))?;
        let spec = VisionSpec::from_model_dir(&e.path, text.tokenizer.as_ref()).map_err(|err| media_error(err, "messages"))?;
        spec.ok_or_else(|| {
            ApiError::bad_request(
                "messages",
                format!(
                    "model `{}` takes no images: it has no vision encoder the server can use (config.json `vision_config` with `image_token_index` and `mm_tokens_per_image`, and a preprocessor_config.json)",
                    e.id
                ),
            )
        })
    })
    .await
}

/// Loads, decodes and preprocesses `refs` for `entry`; None without images.
/// Fetches run on the runtime (async HTTP); decoding and preprocessing off it.
pub async fn load(state: &State, entry: &Arc<ModelEntry>, refs: Vec<ImageRef>) -> Result<Option<Loaded>, ApiError> {
    if refs.is_empty() {
        return Ok(None);
    }
    let spec = vision(entry).await?;
    // Their placeholders alone must fit the context: checked before any
    // image is fetched or decoded.
    let need = refs.len().saturating_mul(spec.tokens_per_image);
    if let Some(ctx) = entry.context_length.filter(|&c| need >= c) {
        return Err(ApiError::bad_request(
            "messages",
            format!("{} images take {need} placeholder tokens; the context of `{}` is {ctx}", refs.len(), entry.id),
        )
        .with_code("context_length_exceeded"));
    }
    let opts = &state.opts.media;
    let mut images = Vec::with_capacity(refs.len());
    for r in refs {
        let src = r.source.map_err(|e| media_error(e, &r.part))?;
        let bytes = load_source(&r.part, &src, opts).await.map_err(|e| media_error(e, &r.part))?;
        let (o, proc, part) = (opts.clone(), spec.processor.clone(), r.part.clone());
        let img = g::blocking(move || {
            let img = decode_image(&part, &bytes.bytes, &o).map_err(|e| media_error(e, &part))?;
            let hash = MediaHash::of_rgb(&img);
            let pixels = proc.preprocess(&part, &img).map_err(|e| media_error(e, &part))?;
            Ok((pixels, hash))
        })
        .await?;
        images.push(img);
    }
    Ok(Some(Loaded { spec, images }))
}

/// The rendered prompt with its image markers expanded, tokenized; with the
/// images, the request's [`PromptMedia`]. `rendered` is the template's text.
pub fn tokenize(entry: &ModelEntry, rendered: &str, spec: &VisionSpec, images: Vec<(Pixels, MediaHash)>) -> Result<(Vec<u32>, PromptMedia), ApiError> {
    let n = images.len();
    let expanded = spec.expand(rendered, n).map_err(|m| ApiError::bad_request("messages", m))?;
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| ApiError::internal("a vision model without a tokenizer"))?;
    let ids = tok.encode(&expanded, false).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let spans = spec.placeholder_spans(&ids, n).map_err(|m| ApiError::bad_request("messages", m))?;
    let images = images.into_iter().zip(spans).map(|((p, h), s)| PromptImage::new(p, h, s)).collect();
    Ok((ids, PromptMedia { images }))
}

/// A rendered chat prompt: its ids, the template's text, its images.
pub type Rendered = (Vec<u32>, String, Option<Arc<PromptMedia>>);

/// What a chat route renders: the prompt ids, the template's text, and the
/// images (None without). Blocking (templating, tokenizing).
pub fn render(
    entry: &ModelEntry,
    messages: Vec<Value>,
    tools: Option<Value>,
    kwargs: serde_json::Map<String, Value>,
    loaded: Option<Loaded>,
) -> Result<Rendered, ApiError> {
    let rendered = super::chat::render_text(entry, messages, tools, kwargs)?;
    match loaded {
        None => {
            let (ids, rendered) = super::chat::tokenize(entry, rendered)?;
            Ok((ids, rendered, None))
        }
        Some(l) => {
            let (ids, media) = tokenize(entry, &rendered, &l.spec, l.images)?;
            Ok((ids, rendered, Some(Arc::new(media))))
        }
    }
}

/// The prompt length of a request with `n` images (count_tokens): the
/// markers expanded, no image loaded (the count does not depend on them).
pub fn count(entry: &ModelEntry, rendered: &str, spec: &VisionSpec, n: usize) -> Result<usize, ApiError> {
    let expanded = spec.expand(rendered, n).map_err(|m| ApiError::bad_request("messages", m))?;
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| ApiError::internal("a vision model without a tokenizer"))?;
    Ok(tok.encode(&expanded, false).map_err(|e| ApiError::internal(format!("{e:#}")))?.len())
}
