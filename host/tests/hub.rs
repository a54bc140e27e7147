//! `--model REPO_ID`, `rmlx pull` and `rmlx ls` against a fake hub: a tiny
//! std::net HTTP server that serves the hub's revision, tree and resolve
//! routes from a fixture model (tests/fixtures/models/llama-f32).
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "test-org/tiny-llama";

/// One request the fake hub saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
}

struct HubFile {
    path: String,
    bytes: Vec<u8>,
    etag: String,
    lfs: bool,
}

#[derive(Default)]
struct HubState {
    seen: Vec<Seen>,
    /// Resolve paths whose next answer stops halfway and closes.
    drop_once: Vec<String>,
    /// Repos that answer 401 without `Authorization`.
    gated: Vec<String>,
}

struct FakeHub {
    url: String,
    state: Arc<Mutex<HubState>>,
}

fn hex_id(data: &[u8], len: usize) -> String {
    // FNV-1a, repeated to the length of a git (40) or sha256 (64) id.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}").repeat(4)[..len].to_string()
}

fn fixture_files() -> Vec<HubFile> {
    let dir = common::fixture("models/llama-f32");
    let mut files: Vec<HubFile> = ["config.json", "model.safetensors.index.json", "model.safetensors"]
        .iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(n)).unwrap();
            let lfs = n.ends_with(".safetensors");
            HubFile { path: n.to_string(), etag: hex_id(&bytes, if lfs { 64 } else { 40 }), bytes, lfs }
        })
        .collect();
    // Files mlx-lm would not fetch: rmlx must not either.
    for (n, b) in [("README.md", &b"# tiny"[..]), ("pytorch_model.bin", &b"not mlx"[..])] {
        files.push(HubFile { path: n.into(), etag: hex_id(b, 40), bytes: b.to_vec(), lfs: false });
    }
    files
}

impl FakeHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState::default()));
        let files = Arc::new(fixture_files());
        let (st, base) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, files, base) = (st.clone(), files.clone(), base.clone());
                std::thread::spawn(move || serve(conn, &st, &files, &base));
            }
        });
        FakeHub { url, state }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve(mut conn: TcpStream, st: &Mutex<HubState>, files: &[HubFile], base: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let (drop_now, gated) = {
        let mut s = st.lock().unwrap();
        s.seen.push(Seen { path: path.clone(), headers: headers.clone() });
        let d = s.drop_once.iter().position(|p| *p == path).map(|i| s.drop_once.remove(i)).is_some();
        let g = s.gated.iter().any(|r| path.contains(r.as_str()));
        (d, g)
    };
    if gated && !headers.contains_key("authorization") {
        return respond(&mut conn, "401 Unauthorized", &[], br#"{"error":"Access to model is restricted"}"#);
    }
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let ct = || ("Content-Type", "application/json".to_string());
    for repo in [REPO, "test-org/gated"] {
        if path == format!("/api/models/{repo}/revision/main") {
            let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({"rfilename": f.path})).collect();
            return respond(&mut conn, "200 OK", &[ct()], &json(serde_json::json!({"id": repo, "sha": SHA, "siblings": siblings})));
        }
        // The tree comes in two pages (the hub pages with a Link header).
        let tree = format!("/api/models/{repo}/tree/{SHA}");
        if path.starts_with(&tree) {
            let entry = |f: &HubFile| {
                let mut e = serde_json::json!({"type": "file", "path": f.path, "size": f.bytes.len(), "oid": hex_id(f.path.as_bytes(), 40)});
                if f.lfs {
                    e["lfs"] = serde_json::json!({"oid": f.etag, "size": f.bytes.len(), "pointerSize": 134});
                } else {
                    e["oid"] = f.etag.clone().into();
                }
                e
            };
            let (page, link): (Vec<_>, Vec<(&str, String)>) = if path.contains("cursor=2") {
                (files[2..].iter().map(entry).collect(), vec![ct()])
            } else {
                let mut p: Vec<_> = files[..2].iter().map(entry).collect();
                p.push(serde_json::json!({"type": "directory", "path": "sub", "oid": "ffff"}));
                (p, vec![ct(), ("Link", format!("<{base}{tree}?recursive=true&cursor=2>; rel=\"next\""))])
            };
            return respond(&mut conn, "200 OK", &link, &json(serde_json::Value::Array(page)));
        }
        let prefix = format!("/{repo}/resolve/{SHA}/");
        if let Some(name) = path.strip_prefix(&prefix) {
            let Some(f) = files.iter().find(|f| f.path == name) else {
                return respond(&mut conn, "404 Not Found", &[], b"{}");
            };
            let from: usize = headers
                .get("range")
                .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                .unwrap_or(0);
            let body = &f.bytes[from.min(f.bytes.len())..];
            let mut hs = vec![("ETag", format!("\"{}\"", f.etag)), ("X-Repo-Commit", SHA.to_string())];
            let status = if from > 0 {
                hs.push(("Content-Range", format!("bytes {from}-{}/{}", f.bytes.len() - 1, f.bytes.len())));
                "206 Partial Content"
            } else {
                "200 OK"
            };
            if drop_now {
                // Promise the whole body, send half, hang up.
                let head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body[..body.len() / 2]);
                let _ = conn.flush();
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return;
            }
            return respond(&mut conn, status, &hs, body);
        }
    }
    respond(&mut conn, "404 Not Found", &[ct()], br#"{"error":"Repository not found"}"#)
}

fn rmlx(args: &[&str], cache: &Path, endpoint: &str, token: Option<&str>) -> Output {
    let mut c = Command::new(common::rmlx_bin());
    c.args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", cache.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    if args[0] == "info" {
        c.arg("--plugins").arg(common::target_dir().join("plugins"));
    }
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--test-org--tiny-llama")
}

/// The snapshot holds exactly the fixture's files, as relative symlinks into
/// blobs/ named by etag, and refs/main names the commit.
fn assert_cached_like_huggingface_hub(cache: &Path) {
    let dir = repo_dir(cache);
    assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap().trim(), SHA);
    let snap = dir.join("snapshots").join(SHA);
    let mut names: Vec<String> = std::fs::read_dir(&snap).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "model.safetensors.index.json"]);
    for f in fixture_files().iter().filter(|f| names.contains(&f.path)) {
        let p = snap.join(&f.path);
        let target = std::fs::read_link(&p).unwrap_or_else(|e| panic!("{} is not a symlink: {e}", p.display()));
        assert_eq!(target, Path::new("../../blobs").join(&f.etag), "{}", f.path);
        assert_eq!(std::fs::read(&p).unwrap(), f.bytes, "{} differs from the fixture", f.path);
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn resolve_path(name: &str) -> String {
    format!("/{REPO}/resolve/{SHA}/{name}")
}

#[test]
fn pull_downloads_into_the_hf_cache_resuming_a_dropped_connection_with_the_token() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().drop_once.push(resolve_path("model.safetensors"));
    let cache = tempfile::tempdir().unwrap();
    let out = rmlx(&["pull", REPO], cache.path(), &hub.url, Some("hf_secret"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_cached_like_huggingface_hub(cache.path());
    let seen = hub.seen();
    // Every request carried the token.
    for s in &seen {
        assert_eq!(s.headers.get("authorization").map(String::as_str), Some("Bearer hf_secret"), "{}", s.path);
    }
    // Both tree pages were read.
    assert!(seen.iter().any(|s| s.path.contains("cursor=2")), "{seen:?}");
    // The weights came twice: the second time from where the first stopped.
    let weights: Vec<&Seen> = seen.iter().filter(|s| s.path == resolve_path("model.safetensors")).collect();
    assert_eq!(weights.len(), 2, "{weights:?}");
    assert_eq!(weights[0].headers.get("range"), None);
    let size = std::fs::metadata(common::fixture("models/llama-f32/model.safetensors")).unwrap().len();
    let range = weights[1].headers.get("range").expect("the retry resumes with a Range header");
    let from: u64 = range.strip_prefix("bytes=").unwrap().strip_suffix('-').unwrap().parse().unwrap();
    assert!(from > 0 && from < size, "{range}");
    // Files mlx-lm would skip were not fetched.
    assert!(!seen.iter().any(|s| s.path.ends_with("README.md") || s.path.ends_with(".bin")), "{seen:?}");

    // A second pull finds everything cached and fetches no file.
    let before = hub.seen().len();
    let out = rmlx(&["pull", REPO], cache.path(), &hub.url, Some("hf_secret"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!hub.seen()[before..].iter().any(|s| s.path.contains("/resolve/")));
}

#[test]
fn pull_resumes_a_partial_file_left_by_an_earlier_run() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let weights = fixture_files().into_iter().find(|f| f.path == "model.safetensors").unwrap();
    let blobs = repo_dir(cache.path()).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.incomplete", weights.etag)), &weights.bytes[..1000]).unwrap();
    let out = rmlx(&["pull", REPO], cache.path(), &hub.url, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_cached_like_huggingface_hub(cache.path());
    let seen = hub.seen();
    let w: Vec<&Seen> = seen.iter().filter(|s| s.path == resolve_path("model.safetensors")).collect();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].headers.get("range").map(String::as_str), Some("bytes=1000-"));
    // No token set: none sent.
    assert!(seen.iter().all(|s| !s.headers.contains_key("authorization")));
}

#[test]
fn model_repo_id_downloads_on_a_miss_then_resolves_from_the_cache_offline() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    // Not cached: `--model REPO` downloads it.
    let out = rmlx(&["info", "--model", REPO, "--json"], cache.path(), &hub.url, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap = repo_dir(cache.path()).join("snapshots").join(SHA);
    assert_eq!(Path::new(v["path"].as_str().unwrap()), snap);
    assert_eq!(v["model_type"], "llama");
    assert_cached_like_huggingface_hub(cache.path());
    // Cached: resolved through refs/main with no hub at all.
    let out = rmlx(&["info", "--model", REPO, "--json"], cache.path(), "http://127.0.0.1:9", None);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(Path::new(v["path"].as_str().unwrap()), snap);
}

#[test]
fn a_cache_written_by_huggingface_hub_is_found_by_its_ref() {
    // The layout huggingface_hub writes, built by hand: refs/main -> commit.
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("models--someone--model");
    let snap = dir.join("snapshots/feedbeef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), "feedbeef").unwrap();
    std::fs::copy(common::fixture("models/llama-f32/config.json"), snap.join("config.json")).unwrap();
    let out = rmlx(&["ls", "--json"], cache.path(), "http://127.0.0.1:9", None);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["repo"], "someone/model");
    assert_eq!(Path::new(v["models"][0]["path"].as_str().unwrap()), snap);
}

#[test]
fn ls_lists_cached_models_with_sizes() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let out = rmlx(&["ls"], cache.path(), &hub.url, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no models"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(rmlx(&["pull", REPO], cache.path(), &hub.url, None).status.success());
    let want: u64 = fixture_files().iter().filter(|f| !f.path.ends_with(".md") && !f.path.ends_with(".bin")).map(|f| f.bytes.len() as u64).sum();
    let out = rmlx(&["ls", "--json"], cache.path(), &hub.url, None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["repo"], REPO);
    assert_eq!(v["models"][0]["size_bytes"], want);
    assert_eq!(v["models"][0]["revision"], SHA);
    let out = rmlx(&["ls"], cache.path(), &hub.url, None);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with(REPO)).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains(&rmlx::hub::human_bytes(want)), "{row}");
}

#[test]
fn a_gated_repo_without_a_token_is_a_one_line_error() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().gated.push("test-org/gated".into());
    let cache = tempfile::tempdir().unwrap();
    let out = rmlx(&["pull", "test-org/gated"], cache.path(), &hub.url, None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("HF_TOKEN") && err.contains("401"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Unknown repo: not found, named.
    let out = rmlx(&["pull", "test-org/nope"], cache.path(), &hub.url, None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("test-org/nope: not found"), "{}", stderr(&out));
    // Neither a directory nor a repo id.
    let out = rmlx(&["info", "--model", "no/such/dir"], cache.path(), &hub.url, None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a Hugging Face repo id"), "{}", stderr(&out));
}
