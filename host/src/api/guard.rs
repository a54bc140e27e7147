//! Cross-site protection, as Ollama's `OLLAMA_HOST`/`OLLAMA_ORIGINS` checks:
//! with no API key, any web page the user opens could otherwise drive the
//! server (use, load, unload a model) from the browser.
//!
//! - `Host`: on a loopback bind only loopback names are accepted
//!   (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`, any port), plus
//!   `--allowed-host`s; this stops DNS rebinding (a page on `evil.example`
//!   whose name is re-pointed at 127.0.0.1 sends `Host: evil.example`).
//! - `Origin`: a browser's request from another origin is refused (403)
//!   unless the origin is the server's own, a loopback one, or allowed by
//!   `--cors-origin` (`*` for any); allowed ones get
//!   `Access-Control-Allow-Origin`, and their CORS preflights (`OPTIONS` with
//!   `Access-Control-Request-Method`) are answered.
//! - `Content-Type`: a request body must be JSON (`application/json`, with
//!   parameters, or `*/*+json`), else 415: HTML forms and `text/plain`
//!   fetches need no preflight, JSON ones do.
use super::errors::{self, ApiError};
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response};
use std::net::IpAddr;
use std::sync::Arc;

/// What the guard lets through (from `--host`, `--allowed-host`, `--cors-origin`).
#[derive(Debug, Clone)]
pub struct CrossSite {
    /// Check `Host` (true when the server binds a loopback address).
    pub loopback_bind: bool,
    /// More accepted `Host` names: exact (`myhost`, port ignored),
    /// `*.example.com`, or `*` for any. Checked on any bind once given.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed cross-origin: exact (`https://app.example`), with `*`
    /// as a wildcard (`http://localhost:*`, `https://*.example.com`), or `*`.
    pub cors_origins: Vec<String>,
}

impl Default for CrossSite {
    fn default() -> Self {
        Self { loopback_bind: true, allowed_hosts: Vec::new(), cors_origins: Vec::new() }
    }
}

impl CrossSite {
    /// The checks for a server bound to `bind` (an address or a name).
    pub fn for_bind(bind: &str, allowed_hosts: Vec<String>, cors_origins: Vec<String>) -> Self {
        Self { loopback_bind: is_loopback_name(strip_brackets(bind)), allowed_hosts, cors_origins }
    }

    fn host_allowed(&self, host: &str) -> bool {
        if !self.loopback_bind && self.allowed_hosts.is_empty() {
            return true;
        }
        let name = host_name(host).to_ascii_lowercase();
        is_loopback_name(&name) || self.allowed_hosts.iter().any(|p| glob(&p.to_ascii_lowercase(), &name))
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if self.cors_origins.iter().any(|p| p == "*" || glob(p.trim_end_matches('/').to_ascii_lowercase().as_str(), &origin)) {
            return true;
        }
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false; // "null" (sandboxed frames, file: pages) and the like
        };
        if !matches!(scheme, "http" | "https") {
            return false;
        }
        // The server's own origin (its /docs page), or a loopback page.
        host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) || is_loopback_name(host_name(authority))
    }
}

/// Installs the checks on an endpoint.
pub struct Guard(pub Arc<CrossSite>);

impl<E: Endpoint> Middleware<E> for Guard {
    type Output = GuardEndpoint<E>;
    fn transform(&self, inner: E) -> Self::Output {
        GuardEndpoint { inner, cfg: self.0.clone() }
    }
}

pub struct GuardEndpoint<E> {
    inner: E,
    cfg: Arc<CrossSite>,
}

fn refuse(req: &Request, status: StatusCode, code: &'static str, message: String) -> Response {
    let flavor = super::flavor_of(req.uri().path());
    errors::render(poem::Error::from(ApiError::new(status, message).with_code(code).flavor(flavor)), flavor)
}

impl<E: Endpoint> Endpoint for GuardEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let host = req.header(header::HOST).map(str::to_string).or_else(|| req.uri().authority().map(|a| a.to_string()));
        if let Some(h) = &host {
            if !self.cfg.host_allowed(h) {
                let msg = format!("Host `{h}` is not allowed on this server (add it with --allowed-host)");
                return Ok(refuse(&req, StatusCode::FORBIDDEN, "host_not_allowed", msg));
            }
        }
        let origin = req.header(header::ORIGIN).map(str::to_string);
        if let Some(o) = &origin {
            if !self.cfg.origin_allowed(o, host.as_deref()) {
                let msg = format!("cross-origin request from `{o}` refused (allow the origin with --cors-origin)");
                return Ok(refuse(&req, StatusCode::FORBIDDEN, "origin_not_allowed", msg));
            }
            if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
                return Ok(preflight(&req, o));
            }
        }
        if let Some(r) = check_content_type(&req) {
            return Ok(with_cors(r, origin.as_deref()));
        }
        let flavor = super::flavor_of(req.uri().path());
        let resp = match self.inner.call(req).await {
            Ok(r) => r.into_response(),
            Err(e) => errors::render(e, flavor),
        };
        Ok(with_cors(resp, origin.as_deref()))
    }
}

/// 415 unless a request's body (if it has one) is JSON.
fn check_content_type(req: &Request) -> Option<Response> {
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return None;
    }
    let ct = req.header(header::CONTENT_TYPE);
    let has_body = req.header(header::TRANSFER_ENCODING).is_some()
        || req.header(header::CONTENT_LENGTH).is_some_and(|n| n.trim() != "0");
    // The audio routes take OpenAI's multipart uploads.
    let multipart = req.uri().path().starts_with("/v1/audio/");
    let ok = match ct {
        Some(ct) if multipart => ct.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"),
        Some(ct) => is_json(ct),
        None => !has_body,
    };
    if ok {
        return None;
    }
    let got = ct.map_or("no Content-Type".to_string(), |c| format!("`{c}`"));
    Some(refuse(
        req,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("the request body must be JSON, sent with `Content-Type: application/json` (got {got})"),
    ))
}

/// `application/json`, `application/json; charset=utf-8`, `application/x+json`.
fn is_json(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The answer to an allowed origin's CORS preflight.
fn preflight(req: &Request, origin: &str) -> Response {
    let mut r = Response::builder().status(StatusCode::NO_CONTENT).finish();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    // The headers the page asks for (the SDKs send their own x-* headers);
    // a value that is not a plain header list gets the usual ones.
    let asked = req
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b)))
        .unwrap_or("authorization, content-type, x-api-key, anthropic-version");
    if let Ok(v) = HeaderValue::from_str(asked) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(header::VARY, HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"));
    r
}

/// An allowed cross-origin request's response may be read by the page.
fn with_cors(mut r: Response, origin: Option<&str>) -> Response {
    if let Some(v) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        r.headers_mut().append(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}

fn strip_brackets(s: &str) -> &str {
    s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s)
}

/// `host[:port]` or `[v6][:port]` -> the name or address, without brackets.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// `localhost`, `*.localhost` (browsers resolve these to loopback
/// themselves) or a loopback address.
fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `pattern` with `*` matching any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let c = CrossSite::default();
        for ok in ["localhost", "localhost:8080", "127.0.0.1:1", "127.1.2.3", "[::1]:8080", "[::1]", "app.localhost:3000", "LOCALHOST"] {
            assert!(c.host_allowed(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "10.0.0.1:8080", "localhost.evil.example", "[::2]:80"] {
            assert!(!c.host_allowed(bad), "{bad}");
        }
        let c = CrossSite { allowed_hosts: vec!["myhost".into(), "*.lan".into()], ..Default::default() };
        assert!(c.host_allowed("myhost:8080") && c.host_allowed("box.lan") && !c.host_allowed("other"));
        let public = CrossSite::for_bind("0.0.0.0", vec![], vec![]);
        assert!(public.host_allowed("anything.example"));
        assert!(CrossSite::for_bind("[::1]", vec![], vec![]).loopback_bind);
        assert!(CrossSite::for_bind("localhost", vec![], vec![]).loopback_bind);
    }

    #[test]
    fn origins() {
        let c = CrossSite::default();
        assert!(c.origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(c.origin_allowed("http://localhost:3000", Some("127.0.0.1:8080")));
        assert!(c.origin_allowed("http://myhost:8080", Some("myhost:8080")), "the server's own origin");
        assert!(!c.origin_allowed("https://evil.example", Some("127.0.0.1:8080")));
        assert!(!c.origin_allowed("null", Some("127.0.0.1:8080")));
        let c = CrossSite { cors_origins: vec!["https://app.example".into(), "https://*.corp.example".into()], ..Default::default() };
        assert!(c.origin_allowed("https://app.example", None) && c.origin_allowed("https://x.corp.example", None));
        assert!(!c.origin_allowed("https://evil.example", None));
        let any = CrossSite { cors_origins: vec!["*".into()], ..Default::default() };
        assert!(any.origin_allowed("https://evil.example", None) && any.origin_allowed("null", None));
    }

    #[test]
    fn json_types() {
        assert!(is_json("application/json") && is_json("Application/JSON; charset=utf-8") && is_json("application/problem+json"));
        assert!(!is_json("text/plain") && !is_json("application/x-www-form-urlencoded") && !is_json("multipart/form-data"));
    }

    #[test]
    fn globs() {
        assert!(glob("http://localhost:*", "http://localhost:3000"));
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXc") && !glob("ab*ba", "aba"));
    }
}
