//! Where an image comes from: `data:` URLs, `http(s)://` URLs (timeout, size
//! cap, SSRF guard on every hop), `file://` URLs (allow-listed directories
//! only), Anthropic base64 sources; and decoding the bytes to RGB8.
use std::io::Cursor;
use std::sync::Arc;

use base64::Engine as _;
use reqwest::Url;

use super::ssrf::{self, Resolver};
use super::{MediaError, MediaOptions};

/// An image part's source, as the API layer parses it.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// OpenAI `image_url.url` or Anthropic `{"type": "url", "url": ...}`.
    Url(String),
    /// Anthropic `{"type": "base64", "media_type": ..., "data": ...}`.
    Base64 { media_type: String, data: String },
}

impl ImageSource {
    pub fn from_url(url: impl Into<String>) -> Self {
        ImageSource::Url(url.into())
    }

    /// An Anthropic image block's `source` object: `{"type": "base64",
    /// "media_type", "data"}` or `{"type": "url", "url"}`.
    pub fn from_anthropic(part: &str, source: &serde_json::Value) -> Result<Self, MediaError> {
        let field = |k: &str| source.get(k).and_then(serde_json::Value::as_str);
        let bad = |reason: String| MediaError::BadDataUrl {
            part: part.into(),
            reason,
        };
        match field("type") {
            Some("base64") => Ok(ImageSource::Base64 {
                media_type: field("media_type")
                    .ok_or_else(|| bad("base64 source without media_type".into()))?
                    .into(),
                data: field("data")
                    .ok_or_else(|| bad("base64 source without data".into()))?
                    .into(),
            }),
            Some("url") => Ok(ImageSource::Url(
                field("url")
                    .ok_or_else(|| bad("url source without url".into()))?
                    .into(),
            )),
            other => Err(MediaError::UnsupportedScheme {
                part: part.into(),
                scheme: other.unwrap_or("(no type)").into(),
            }),
        }
    }
}

/// The encoded bytes of an image and the media type its source claimed.
#[derive(Debug, Clone)]
pub struct SourceBytes {
    pub bytes: Vec<u8>,
    pub media_type: Option<String>,
}

/// Loads an image part's bytes with the system resolver.
pub async fn load_source(
    part: &str,
    src: &ImageSource,
    opts: &MediaOptions,
) -> Result<SourceBytes, MediaError> {
    load_source_with(part, src, opts, Arc::new(ssrf::system_resolver)).await
}

/// [`load_source`] with a resolver hook (tests pass a fixed table).
pub async fn load_source_with(
    part: &str,
    src: &ImageSource,
    opts: &MediaOptions,
    resolve: Arc<Resolver>,
) -> Result<SourceBytes, MediaError> {
    match src {
        ImageSource::Base64 { media_type, data } => {
            check_media_type(part, media_type)?;
            let bytes = decode_base64(part, data, opts.max_bytes)?;
            Ok(SourceBytes {
                bytes,
                media_type: Some(media_type.clone()),
            })
        }
        ImageSource::Url(url) => {
            let trimmed = url.trim_start();
            let scheme = trimmed.split(':').next().unwrap_or("").to_ascii_lowercase();
            match scheme.as_str() {
                "data" => parse_data_url(part, trimmed, opts.max_bytes),
                "http" | "https" => fetch_http(part, trimmed, opts, resolve).await,
                "file" => read_file_url(part, trimmed, opts),
                _ => Err(MediaError::UnsupportedScheme {
                    part: part.into(),
                    scheme: if trimmed.contains(':') {
                        scheme
                    } else {
                        String::new()
                    },
                }),
            }
        }
    }
}

fn check_media_type(part: &str, mt: &str) -> Result<(), MediaError> {
    if mt.to_ascii_lowercase().starts_with("image/") {
        Ok(())
    } else {
        Err(MediaError::NotAnImage {
            part: part.into(),
            reason: format!("media type {mt:?}"),
        })
    }
}

fn decode_base64(part: &str, data: &str, max_bytes: usize) -> Result<Vec<u8>, MediaError> {
    // Base64 is 4 characters per 3 bytes: refuse before decoding a huge payload.
    if data.len() / 4 * 3 > max_bytes.saturating_add(3) {
        return Err(MediaError::TooLarge {
            part: part.into(),
            limit: max_bytes,
        });
    }
    let clean: String;
    let data = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        clean = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        clean.as_str()
    } else {
        data
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(data))
        .map_err(|e| MediaError::BadDataUrl {
            part: part.into(),
            reason: format!("bad base64: {e}"),
        })?;
    if bytes.len() > max_bytes {
        return Err(MediaError::TooLarge {
            part: part.into(),
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

/// `data:image/png;base64,AAAA`: the media type must be `image/*` and the
/// payload base64 (percent-encoded payloads are not images in practice).
pub fn parse_data_url(part: &str, url: &str, max_bytes: usize) -> Result<SourceBytes, MediaError> {
    let bad = |reason: &str| MediaError::BadDataUrl {
        part: part.into(),
        reason: reason.into(),
    };
    let rest = url
        .get(5..)
        .filter(|_| url[..5].eq_ignore_ascii_case("data:"))
        .ok_or_else(|| bad("no data: prefix"))?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| bad("no ',' before the payload"))?;
    let mut fields = meta.split(';');
    let media_type = fields.next().unwrap_or("").trim().to_string();
    let is_base64 = fields.any(|f| f.trim().eq_ignore_ascii_case("base64"));
    if media_type.is_empty() {
        return Err(bad("no media type (expected data:image/...;base64,...)"));
    }
    check_media_type(part, &media_type)?;
    if !is_base64 {
        return Err(bad("payload is not base64 (expected ;base64,)"));
    }
    let bytes = decode_base64(part, payload, max_bytes)?;
    Ok(SourceBytes {
        bytes,
        media_type: Some(media_type),
    })
}

fn read_file_url(part: &str, url: &str, opts: &MediaOptions) -> Result<SourceBytes, MediaError> {
    let refused = |reason: String| MediaError::Refused {
        part: part.into(),
        reason,
    };
    if opts.allowed_dirs.is_empty() {
        return Err(refused(
            "file:// URLs are disabled (no allowed image directory)".into(),
        ));
    }
    let parsed = Url::parse(url).map_err(|e| refused(format!("bad file URL: {e}")))?;
    let path = parsed
        .to_file_path()
        .map_err(|_| refused("file URL with a host or a relative path".into()))?;
    // Canonical paths, so `..` and symlinks cannot leave an allowed directory.
    let real = std::fs::canonicalize(&path).map_err(|e| MediaError::Fetch {
        part: part.into(),
        reason: format!("{}: {e}", path.display()),
    })?;
    let allowed = opts
        .allowed_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(&d));
    if !allowed {
        return Err(refused(format!(
            "{} is outside the allowed image directories",
            path.display()
        )));
    }
    let io = |e: std::io::Error| MediaError::Fetch {
        part: part.into(),
        reason: format!("{}: {e}", real.display()),
    };
    let len = std::fs::metadata(&real).map_err(io)?.len();
    if len > opts.max_bytes as u64 {
        return Err(MediaError::TooLarge {
            part: part.into(),
            limit: opts.max_bytes,
        });
    }
    let bytes = std::fs::read(&real).map_err(io)?;
    Ok(SourceBytes {
        bytes,
        media_type: None,
    })
}

async fn fetch_http(
    part: &str,
    url: &str,
    opts: &MediaOptions,
    resolve: Arc<Resolver>,
) -> Result<SourceBytes, MediaError> {
    let fetch_err = |reason: String| MediaError::Fetch {
        part: part.into(),
        reason,
    };
    let refused = |reason: String| MediaError::Refused {
        part: part.into(),
        reason,
    };
    let mut url = Url::parse(url).map_err(|e| refused(format!("bad URL: {e}")))?;
    let deadline = tokio::time::Instant::now() + opts.fetch_timeout;
    for _hop in 0..=opts.max_redirects {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused(format!("redirect to a {} URL", url.scheme())));
        }
        let host = url
            .host_str()
            .ok_or_else(|| refused("URL without a host".into()))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let (h, allow, r) = (host.clone(), opts.allow_private, resolve.clone());
        let addr = tokio::task::spawn_blocking(move || ssrf::check_host(&h, port, allow, &*r))
            .await
            .map_err(|e| fetch_err(format!("resolver task: {e}")))?
            .map_err(refused)?;
        // Pin the checked address (no second lookup) and follow redirects by
        // hand so every hop passes the guard.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve(host.trim_start_matches('[').trim_end_matches(']'), addr)
            .timeout(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .build()
            .map_err(|e| fetch_err(format!("HTTP client: {e}")))?;
        let mut resp = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        let status = resp.status();
        if status.is_redirection() {
            let loc = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| fetch_err(format!("HTTP {status} without a Location")))?;
            url = url
                .join(loc)
                .map_err(|e| fetch_err(format!("bad redirect Location: {e}")))?;
            continue;
        }
        if !status.is_success() {
            return Err(fetch_err(format!("HTTP {status}")));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > opts.max_bytes as u64)
        {
            return Err(MediaError::TooLarge {
                part: part.into(),
                limit: opts.max_bytes,
            });
        }
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_err(e.to_string()))? {
            if bytes.len() + chunk.len() > opts.max_bytes {
                return Err(MediaError::TooLarge {
                    part: part.into(),
                    limit: opts.max_bytes,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        return Ok(SourceBytes { bytes, media_type });
    }
    Err(fetch_err(format!(
        "more than {} redirects",
        opts.max_redirects
    )))
}

/// Decodes png/jpeg/webp/gif bytes to RGB8 (grey replicated; transparency
/// composited over white, as Hugging Face's `convert_to_rgb`), refusing images over `max_pixels` before the
/// pixel buffer is allocated.
pub fn decode_image(
    part: &str,
    bytes: &[u8],
    opts: &MediaOptions,
) -> Result<image::RgbImage, MediaError> {
    let not_image = |reason: String| MediaError::NotAnImage {
        part: part.into(),
        reason,
    };
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| not_image(e.to_string()))
    };
    let probe = reader()?;
    if probe.format().is_none() {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(not_image(format!(
            "unrecognised format, first bytes {}",
            head.join(" ")
        )));
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| not_image(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(MediaError::Unusable {
            part: part.into(),
            reason: format!("{width}x{height} image"),
        });
    }
    if width as u64 * height as u64 > opts.max_pixels {
        return Err(MediaError::TooManyPixels {
            part: part.into(),
            width,
            height,
            limit: opts.max_pixels,
        });
    }
    let img = reader()?.decode().map_err(|e| not_image(e.to_string()))?;
    if img.color().has_alpha() {
        Ok(flatten_on_white(&img.to_rgba8()))
    } else {
        Ok(img.to_rgb8())
    }
}

/// Composites RGBA over opaque white, as Hugging Face's `convert_to_rgb`
/// does (PIL `alpha_composite` on a white background): integer arithmetic
/// with 7 extra bits and rounded divisions by 255, bit-exact with PIL.
pub fn flatten_on_white(rgba: &image::RgbaImage) -> image::RgbImage {
    const BITS: u32 = 7;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    let mut out = image::RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0.map(u32::from);
        o.0 = if a == 0 {
            [255, 255, 255]
        } else {
            let blend = 255 * (255 - a); // dst alpha 255
            let outa255 = a * 255 + blend;
            let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
            let coef2 = 255 * (1 << BITS) - coef1;
            [r, g, b].map(|c| (div255(c * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8)
        };
    }
    out
}
