//! Limits on what one request may ask for, so that no request can stall the
//! engine or the async runtime for everyone, and the parsing of the values
//! that feed timers (`keep_alive`, `--idle-timeout`). Each limit is a 400
//! naming the field; docs/SERVER.md ("Limits and errors") lists them all.
use super::errors::ApiError;
use crate::engine::worker::{KeepAlive, ModelEntry};
use serde_json::Value;
use std::time::Duration;

/// OpenAI's limit on `stop` strings.
pub const MAX_STOP: usize = 4;
/// `stop_sequences` on /v1/messages (Anthropic documents no number).
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Bytes in one stop string (the engine matches each against the text's
/// tail after every token).
pub const MAX_STOP_BYTES: usize = 256;
/// OpenAI's limit on `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Prompts in one /v1/completions request (they run one after the other).
pub const MAX_PROMPTS: usize = 64;
/// A prompt of more than `context * MAX_BYTES_PER_TOKEN + PROMPT_SLACK_BYTES`
/// bytes cannot fit the context, whatever the tokenizer: it is refused before
/// it is tokenized (tokenizing megabytes takes seconds).
pub const MAX_BYTES_PER_TOKEN: usize = 32;
/// Room for the chat template's and the tools' text on top of the above.
pub const PROMPT_SLACK_BYTES: usize = 64 << 10;
/// The longest `keep_alive` / `--idle-timeout`: ten years (`-1` keeps a
/// model loaded for good).
pub const MAX_KEEP_ALIVE_SECS: u64 = 10 * 365 * 24 * 3600;

/// A duration like `30`, `30s`, `1.5m`, `10m`, `1h`, `1h30m`, `300ms` (Go's
/// and Ollama's units; a bare number is seconds) in seconds. Only finite,
/// non-negative values up to [`MAX_KEEP_ALIVE_SECS`]; `Err` is the reason.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if let Ok(n) = s.parse::<f64>() {
        // A bare number (Rust also parses "nan", "inf": refused below).
        return checked_secs(n);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?} is not a duration (units: ms, s, m, h)")),
        };
        total += n * mult;
        rest = next;
    }
    checked_secs(total)
}

fn checked_secs(n: f64) -> Result<f64, String> {
    if !n.is_finite() {
        return Err(format!("{n} is not a finite number of seconds"));
    }
    if n < 0.0 {
        return Err(format!("{n} is negative"));
    }
    if n > MAX_KEEP_ALIVE_SECS as f64 {
        return Err(format!("{n} seconds is more than the maximum of {MAX_KEEP_ALIVE_SECS} (ten years)"));
    }
    Ok(n)
}

/// `keep_alive`: seconds (a JSON number) or a duration string; `0` unloads
/// right after the request, `-1` (or `"-1"`, `"-1m"`, as Ollama) keeps the
/// model loaded for good. Anything else negative, non-finite, unparsable or
/// longer than ten years is a 400 naming `keep_alive`.
pub fn keep_alive(seconds: Option<f64>, text: Option<&str>) -> Result<Option<KeepAlive>, ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(
            "keep_alive",
            format!("`keep_alive` must be seconds (0 to {MAX_KEEP_ALIVE_SECS}, or -1 for forever) or a duration like \"5m\": {why}"),
        )
    };
    let secs = match (seconds, text) {
        (Some(n), _) if n == -1.0 => return Ok(Some(KeepAlive::Forever)),
        (Some(n), _) => checked_secs(n).map_err(bad)?,
        (None, Some(t)) => {
            let t = t.trim();
            if let Some(pos) = t.strip_prefix('-') {
                // Ollama's "forever": -1 in any unit.
                let unit = pos.trim_start_matches('1');
                if pos.len() == unit.len() + 1 && matches!(unit, "" | "s" | "m" | "h" | "ms") {
                    return Ok(Some(KeepAlive::Forever));
                }
                return Err(bad(format!("{t:?} is negative (use -1 to keep the model loaded)")));
            }
            parse_duration(t).map_err(bad)?
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(if secs == 0.0 { KeepAlive::Unload } else { KeepAlive::For(Duration::from_secs_f64(secs)) }))
}

/// `--idle-timeout` / `server.idle_timeout`: a duration in whole seconds.
pub fn idle_timeout_secs(s: &str) -> Result<u64, String> {
    parse_duration(s).map(|n| n.ceil() as u64)
}

/// Stop strings: at most `max` of at most [`MAX_STOP_BYTES`] bytes each;
/// empty strings are dropped (they would match at once).
pub fn stops(v: Vec<String>, max: usize, field: &str) -> Result<Vec<String>, ApiError> {
    if v.len() > max {
        return Err(ApiError::bad_request(field, format!("`{field}` holds {} strings; at most {max} are allowed", v.len())));
    }
    if let Some((i, s)) = v.iter().enumerate().find(|(_, s)| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_request(
            field,
            format!("`{field}`[{i}] is {} bytes long; at most {MAX_STOP_BYTES} are allowed", s.len()),
        ));
    }
    Ok(v.into_iter().filter(|s| !s.is_empty()).collect())
}

/// The most bytes a prompt for `entry` may have before tokenizing (None: the
/// model's context length is unknown, only the body limit applies).
pub fn max_prompt_bytes(entry: &ModelEntry) -> Option<usize> {
    entry.context_length.map(|c| c.saturating_mul(MAX_BYTES_PER_TOKEN).saturating_add(PROMPT_SLACK_BYTES))
}

/// 400 (`context_length_exceeded`) when `bytes` of prompt text cannot fit
/// the context, before any tokenizing.
pub fn check_prompt_bytes(entry: &ModelEntry, bytes: usize, field: &str) -> Result<(), ApiError> {
    match (max_prompt_bytes(entry), entry.context_length) {
        (Some(max), Some(ctx)) if bytes > max => Err(ApiError::bad_request(
            field,
            format!(
                "The prompt is {bytes} bytes long, far more than this model's maximum context length of {ctx} tokens can hold \
                 (prompts over {max} bytes are not tokenized). Shorten the prompt."
            ),
        )
        .with_code("context_length_exceeded")),
        _ => Ok(()),
    }
}

/// The bytes of text in a JSON value (every string, keys included).
pub fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_bytes).fold(0, usize::saturating_add),
        Value::Object(m) => m.iter().map(|(k, v)| k.len().saturating_add(text_bytes(v))).fold(0, usize::saturating_add),
        _ => 8,
    }
}

/// The generation budget. 400 (`context_length_exceeded`) when the prompt
/// leaves no room, or when `max_tokens` (asked for) does not fit beside the
/// prompt, as OpenAI does. With no `max_tokens`, `default` capped to the room
/// left.
pub fn budget(
    entry: &ModelEntry,
    prompt_len: usize,
    max_tokens: Option<usize>,
    default: usize,
    field: &str,
    max_field: &str,
) -> Result<usize, ApiError> {
    let Some(ctx) = entry.context_length else {
        return Ok(max_tokens.unwrap_or(default));
    };
    if prompt_len >= ctx {
        return Err(ApiError::bad_request(
            field,
            format!("This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens. Shorten the prompt."),
        )
        .with_code("context_length_exceeded"));
    }
    let room = ctx - prompt_len;
    match max_tokens {
        None => Ok(default.min(room)),
        Some(m) => match prompt_len.checked_add(m) {
            Some(total) if total <= ctx => Ok(m),
            _ => Err(ApiError::bad_request(
                max_field,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt_len} in the prompt, \
                     {m} for the completion). Lower `{max_field}` to at most {room}, or shorten the prompt.",
                    prompt_len.saturating_add(m)
                ),
            )
            .with_code("context_length_exceeded")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(30.0));
        assert_eq!(parse_duration("10m"), Ok(600.0));
        assert_eq!(parse_duration("1h30m"), Ok(5400.0));
        assert_eq!(parse_duration("300ms"), Ok(0.3));
        assert_eq!(parse_duration("1.5m"), Ok(90.0));
        for bad in ["", "abc", "nan", "inf", "-inf", "1e19", "1e308", "18446744073709551615", "-5", "5x", "m", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keep_alive_values() {
        assert_eq!(keep_alive(Some(0.0), None).unwrap(), Some(KeepAlive::Unload));
        assert_eq!(keep_alive(Some(-1.0), None).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(keep_alive(None, Some("-1m")).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(keep_alive(None, Some("5m")).unwrap(), Some(KeepAlive::For(Duration::from_secs(300))));
        for n in [1e19, 1e20, 1e308, f64::NAN, f64::INFINITY, -5.0, -0.5] {
            let e = keep_alive(Some(n), None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("keep_alive"), "{n}");
        }
        for t in ["nan", "inf", "abc", "-5", "1e20", "-10m", "18446744073709551615s"] {
            assert!(keep_alive(None, Some(t)).is_err(), "{t}");
        }
    }

    #[test]
    fn idle_timeout() {
        assert_eq!(idle_timeout_secs("10m"), Ok(600));
        assert!(idle_timeout_secs("18446744073709551615").is_err());
        assert!(idle_timeout_secs("18446744073709551615m").is_err());
    }

    #[test]
    fn stop_limits() {
        assert_eq!(stops(vec!["a".into(), "".into()], 4, "stop").unwrap(), vec!["a".to_string()]);
        assert!(stops(vec!["a".into(); 5], 4, "stop").is_err());
        assert!(stops(vec!["x".repeat(MAX_STOP_BYTES + 1)], 4, "stop").is_err());
    }
}
