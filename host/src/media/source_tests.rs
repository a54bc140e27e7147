//! Image sources: the SSRF table, data URLs, files, HTTP (a local server),
//! decoding errors. No network.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;

use super::source::{load_source_with, parse_data_url};
use super::ssrf::{check_host, refused_reason};
use super::{decode_image, ImageSource, MediaError, MediaOptions};

const PART: &str = "messages[0].content[1]";

fn png_bytes() -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/rgba13x9.png"),
    )
    .unwrap()
}

fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn no_dns() -> Arc<super::ssrf::Resolver> {
    Arc::new(|h: &str, _| Err(std::io::Error::other(format!("no DNS in tests ({h})"))))
}

async fn load(url: &str, opts: &MediaOptions) -> Result<super::SourceBytes, MediaError> {
    load_source_with(PART, &ImageSource::from_url(url), opts, no_dns()).await
}

#[test]
fn ssrf_table() {
    let refused = [
        "127.0.0.1",
        "127.8.9.10",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "100.64.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
    ];
    for a in refused {
        let ip: IpAddr = a.parse().unwrap();
        assert!(refused_reason(ip).is_some(), "{a} should be refused");
    }
    let public = [
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
    ];
    for a in public {
        let ip: IpAddr = a.parse().unwrap();
        assert_eq!(refused_reason(ip), None, "{a} should be allowed");
    }
}

#[test]
fn check_host_resolver_hook() {
    let table = |h: &str, port: u16| -> std::io::Result<Vec<SocketAddr>> {
        let ips: &[&str] = match h {
            "public.test" => &["93.184.216.34"],
            "mixed.test" => &["93.184.216.34", "10.0.0.7"],
            "metadata.test" => &["169.254.169.254"],
            _ => return Err(std::io::Error::other("NXDOMAIN")),
        };
        Ok(ips
            .iter()
            .map(|s| SocketAddr::new(s.parse().unwrap(), port))
            .collect())
    };
    assert_eq!(
        check_host("public.test", 443, false, &table)
            .unwrap()
            .to_string(),
        "93.184.216.34:443"
    );
    let e = check_host("mixed.test", 443, false, &table).unwrap_err();
    assert!(e.contains("10.0.0.7") && e.contains("RFC 1918"), "{e}");
    assert!(check_host("metadata.test", 80, false, &table)
        .unwrap_err()
        .contains("link-local"));
    assert!(check_host("metadata.test", 80, true, &table).is_ok());
    assert!(check_host("[::1]", 80, false, &table)
        .unwrap_err()
        .contains("loopback"));
    assert!(check_host("nope.test", 80, false, &table)
        .unwrap_err()
        .contains("cannot resolve"));
}

#[tokio::test]
async fn data_urls() {
    let png = png_bytes();
    let opts = MediaOptions::default();
    let got = load(&data_url(&png), &opts).await.unwrap();
    assert_eq!(got.bytes, png);
    assert_eq!(got.media_type.as_deref(), Some("image/png"));
    let img = decode_image(PART, &got.bytes, &opts).unwrap();
    assert_eq!((img.width(), img.height()), (13, 9));

    let msg = |r: Result<super::SourceBytes, MediaError>| r.unwrap_err().to_string();
    let e = msg(parse_data_url(
        PART,
        "data:image/png;base64,@@@not base64@@@",
        1 << 20,
    ));
    assert!(
        e.starts_with("messages[0].content[1]: malformed data URL (bad base64"),
        "{e}"
    );
    let e = msg(parse_data_url(
        PART,
        "data:text/plain;base64,aGVsbG8=",
        1 << 20,
    ));
    assert!(e.starts_with("messages[0].content[1]: not an image"), "{e}");
    assert!(msg(parse_data_url(PART, "data:;base64,aGVsbG8=", 1 << 20)).contains("no media type"));
    assert!(msg(parse_data_url(PART, "data:image/png,rawbytes", 1 << 20)).contains("not base64"));
    assert!(msg(parse_data_url(PART, "data:image/png;base64", 1 << 20)).contains("no ','"));
    // Whitespace inside the payload (wrapped base64) is tolerated.
    let wrapped = format!("data:image/png;base64,{}", {
        let b = base64::engine::general_purpose::STANDARD.encode(&png);
        b.as_bytes()
            .chunks(20)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    });
    assert_eq!(parse_data_url(PART, &wrapped, 1 << 20).unwrap().bytes, png);
    // Anthropic's base64 source.
    let src = ImageSource::Base64 {
        media_type: "image/png".into(),
        data: base64::engine::general_purpose::STANDARD.encode(&png),
    };
    assert_eq!(
        load_source_with(PART, &src, &opts, no_dns())
            .await
            .unwrap()
            .bytes,
        png
    );
}

#[tokio::test]
async fn oversize_and_schemes() {
    let png = png_bytes();
    let small = MediaOptions {
        max_bytes: png.len() - 1,
        ..Default::default()
    };
    let e = load(&data_url(&png), &small).await.unwrap_err();
    assert!(matches!(e, MediaError::TooLarge { .. }), "{e}");
    assert_eq!(e.http_status(), 400);
    let e = load("ftp://example.com/a.png", &MediaOptions::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("unsupported image source \"ftp\""),
        "{e}"
    );
    // Literal private addresses are refused before any connection.
    for url in [
        "http://127.0.0.1:1/a.png",
        "http://[::1]/a.png",
        "https://169.254.169.254/latest",
        "http://10.0.0.1/",
    ] {
        let e = load(url, &MediaOptions::default()).await.unwrap_err();
        assert!(matches!(e, MediaError::Refused { .. }), "{url}: {e}");
    }
}

#[test]
fn decoding_errors() {
    let opts = MediaOptions::default();
    let e = decode_image(PART, b"hello, not a picture", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("messages[0].content[1]: not an image (unrecognised format"),
        "{e}"
    );
    let mut truncated = png_bytes();
    truncated.truncate(40);
    let e = decode_image(PART, &truncated, &opts).unwrap_err();
    assert!(matches!(e, MediaError::NotAnImage { .. }), "{e}");
    let tiny = MediaOptions {
        max_pixels: 100,
        ..Default::default()
    };
    let e = decode_image(PART, &png_bytes(), &tiny)
        .unwrap_err()
        .to_string();
    assert!(e.contains("13x9, over the 100-pixel limit"), "{e}");
}

#[tokio::test]
async fn file_urls() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("imgs");
    std::fs::create_dir(&inside).unwrap();
    std::fs::write(inside.join("a.png"), png_bytes()).unwrap();
    std::fs::write(dir.path().join("secret.png"), png_bytes()).unwrap();
    let url = format!("file://{}", inside.join("a.png").display());
    let e = load(&url, &MediaOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("file:// URLs are disabled"), "{e}");
    let opts = MediaOptions {
        allowed_dirs: vec![inside.clone()],
        ..Default::default()
    };
    assert_eq!(load(&url, &opts).await.unwrap().bytes, png_bytes());
    let escape = format!("file://{}/../secret.png", inside.display());
    let e = load(&escape, &opts).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("outside the allowed image directories"),
        "{e}"
    );
}

/// A one-shot-per-connection HTTP server on 127.0.0.1: `/img` serves the
/// PNG, `/hop` redirects to `/img`, `/loop` redirects to itself.
async fn serve() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let head = |s: &str, extra: &str, len: usize| {
                    format!(
                        "HTTP/1.1 {s}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n"
                    )
                };
                let out = match path.as_str() {
                    "/img" => {
                        let body = png_bytes();
                        let mut o =
                            head("200 OK", "Content-Type: image/png\r\n", body.len()).into_bytes();
                        o.extend(body);
                        o
                    }
                    "/hop" => head("302 Found", "Location: /img\r\n", 0).into_bytes(),
                    "/loop" => head("302 Found", "Location: /loop\r\n", 0).into_bytes(),
                    _ => head("404 Not Found", "", 0).into_bytes(),
                };
                let _ = sock.write_all(&out).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_fetch_redirects_and_caps() {
    let port = serve().await;
    let base = format!("http://127.0.0.1:{port}");
    // Loopback is refused unless allow_private.
    let e = load(&format!("{base}/img"), &MediaOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, MediaError::Refused { .. }), "{e}");
    let open = MediaOptions {
        allow_private: true,
        ..Default::default()
    };
    let got = load(&format!("{base}/hop"), &open).await.unwrap();
    assert_eq!(got.bytes, png_bytes());
    assert_eq!(got.media_type.as_deref(), Some("image/png"));
    let e = load(&format!("{base}/loop"), &open).await.unwrap_err();
    assert!(e.to_string().contains("more than 3 redirects"), "{e}");
    let e = load(&format!("{base}/missing"), &open).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    let capped = MediaOptions {
        allow_private: true,
        max_bytes: 10,
        ..Default::default()
    };
    let e = load(&format!("{base}/img"), &capped).await.unwrap_err();
    assert!(matches!(e, MediaError::TooLarge { .. }), "{e}");
}

#[test]
fn anthropic_sources() {
    let v = serde_json::json!({"type": "base64", "media_type": "image/png", "data": "aGk="});
    assert_eq!(
        ImageSource::from_anthropic(PART, &v).unwrap(),
        ImageSource::Base64 {
            media_type: "image/png".into(),
            data: "aGk=".into()
        }
    );
    let v = serde_json::json!({"type": "url", "url": "https://example.com/a.png"});
    assert_eq!(
        ImageSource::from_anthropic(PART, &v).unwrap(),
        ImageSource::from_url("https://example.com/a.png")
    );
    let e = ImageSource::from_anthropic(PART, &serde_json::json!({"type": "file", "file_id": "x"}))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("messages[0].content[1]: unsupported"),
        "{e}"
    );
    let e =
        ImageSource::from_anthropic(PART, &serde_json::json!({"type": "base64", "data": "aGk="}))
            .unwrap_err();
    assert!(e.to_string().contains("without media_type"), "{e}");
}
