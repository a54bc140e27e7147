//! Image parts of chat requests (issue 15): OpenAI `image_url` parts and
//! Anthropic `image` blocks become template content parts (`{"type":
//! "image"}`, which e.g. Gemma 3's template renders as `<start_of_image>`,
//! Gemma 4's as `<|image|>`)
//! and images loaded, decoded and preprocessed for the model
//! (crate::media). The prompt's image markers are expanded as the model's
//! processor does it, each image to its own placeholder count (fixed for
//! Gemma 3, from the resized size for Gemma 4), and each image's
//! placeholder positions recorded (media/vision.rs); the engine runs the
//! vision tower (engine/media.rs).
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
    /// Each image's placeholder count (it may depend on the image's size).
    pub counts: Vec<usize>,
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
                    "model `{}` takes no images: it has no vision encoder the server can use (config.json `vision_config` with an image token id, and a preprocessor_config.json or processor_config.json whose placeholder layout the server knows: `mm_tokens_per_image`, or a `max_soft_tokens` budget)",
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
    // image is fetched or decoded (with the fewest an image can take).
    let need = refs.len().saturating_mul(spec.min_tokens());
    if let Some(ctx) = entry.context_length.filter(|&c| need >= c) {
        return Err(ApiError::bad_request(
            "messages",
            format!("{} images take at least {need} placeholder tokens; the context of `{}` is {ctx}", refs.len(), entry.id),
        )
        .with_code("context_length_exceeded"));
    }
    let opts = &state.opts.media;
    let mut images = Vec::with_capacity(refs.len());
    let mut counts = Vec::with_capacity(refs.len());
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
        counts.push(spec.tokens_for(&img.0).map_err(|m| ApiError::bad_request(&r.part, format!("{}: {m}", r.part)))?);
        images.push(img);
    }
    Ok(Some(Loaded { spec, images, counts }))
}

/// Each image's placeholder count for count_tokens: without loading any
/// when the count is fixed (their sources must still parse), else the
/// images loaded and preprocessed as a chat request would.
pub async fn counts(state: &State, entry: &Arc<ModelEntry>, spec: &VisionSpec, refs: Vec<ImageRef>) -> Result<Vec<usize>, ApiError> {
    match spec.fixed_tokens() {
        Some(t) => {
            let n = refs.len();
            for r in refs {
                r.source.map_err(|e| ApiError::bad_request(r.part.clone(), e.to_string()))?;
            }
            Ok(vec![t; n])
        }
        None => Ok(load(state, entry, refs).await?.map(|l| l.counts).unwrap_or_default()),
    }
}

/// The rendered prompt with its image markers expanded, tokenized; with the
/// images, the request's [`PromptMedia`]. `rendered` is the template's text.
pub fn tokenize(entry: &ModelEntry, rendered: &str, loaded: Loaded) -> Result<(Vec<u32>, PromptMedia), ApiError> {
    let Loaded { spec, images, counts } = loaded;
    let expanded = spec.expand(rendered, &counts).map_err(|m| ApiError::bad_request("messages", m))?;
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| ApiError::internal("a vision model without a tokenizer"))?;
    let ids = tok.encode(&expanded, false).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let spans = spec.placeholder_spans(&ids, &counts).map_err(|m| ApiError::bad_request("messages", m))?;
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
            let (ids, media) = tokenize(entry, &rendered, l)?;
            Ok((ids, rendered, Some(Arc::new(media))))
        }
    }
}

/// The prompt length of a request whose images take `counts` placeholders
/// (count_tokens): the markers expanded.
pub fn count(entry: &ModelEntry, rendered: &str, spec: &VisionSpec, counts: &[usize]) -> Result<usize, ApiError> {
    let expanded = spec.expand(rendered, counts).map_err(|m| ApiError::bad_request("messages", m))?;
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| ApiError::internal("a vision model without a tokenizer"))?;
    Ok(tok.encode(&expanded, false).map_err(|e| ApiError::internal(format!("{e:#}")))?.len())
}
