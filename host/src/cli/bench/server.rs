//! `rmlx bench --url URL`: drives a running OpenAI-compatible server with N
//! concurrent streams of streamed `/v1/completions` (greedy, fixed
//! `max_tokens`, EOS suppressed) and reports, per concurrency level, TTFT
//! p50/p95, per-stream and aggregate decode tok/s, requests/s and peak
//! memory; optionally the TTFT of a request that shares an N-token prefix
//! with the one before it. Definitions are in docs/CLI.md.
use super::prompts::{Maker, Prompt};
use super::Args;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens appended to the shared prefix for the second request.
const SUFFIX_TOKENS: usize = 16;

struct Bench {
    client: reqwest::Client,
    base: String,
    model: String,
    api_key: Option<String>,
    maker: Maker,
    /// logit_bias suppressing the EOS ids (empty: none known).
    bias: serde_json::Map<String, Value>,
}

/// One streamed request, timed on arrival of its chunks.
struct Sample {
    start: Instant,
    first: Option<Instant>,
    end: Instant,
    tokens: usize,
    prompt_tokens: Option<u64>,
}

impl Sample {
    fn ttft(&self) -> f64 {
        self.first.map_or(f64::NAN, |f| (f - self.start).as_secs_f64())
    }
    /// (tokens - 1) over the time from the first token to the end.
    fn decode_tps(&self) -> Option<f64> {
        let f = self.first?;
        let dt = (self.end - f).as_secs_f64();
        (self.tokens >= 2 && dt > 0.0).then(|| (self.tokens - 1) as f64 / dt)
    }
}

pub fn run(url: String, args: Args) -> Result<()> {
    let p = args.prompt_tokens.unwrap_or(128);
    let g = args.generation_tokens.unwrap_or(64);
    if p == 0 || g == 0 || args.requests_per_stream == 0 || args.concurrency.contains(&0) {
        bail!("--prompt-tokens, --generation-tokens, --requests-per-stream and --concurrency must be positive");
    }
    if args.shared_prefix == Some(0) {
        bail!("--shared-prefix must be positive");
    }
    let (maker, mut eos) = match &args.tokenizer {
        Some(dir) => Maker::text(dir)?,
        None => (Maker::ids(), Vec::new()),
    };
    eos.extend(&args.eos_id);
    eos.sort_unstable();
    eos.dedup();
    let base = url.trim_end_matches('/').to_string();
    if !base.starts_with("http://") && !base.starts_with("https://") {
        bail!("--url must start with http:// or https://, got {url:?}");
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout))
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => first_model(&client, &base, args.api_key.as_deref()).await?,
        };
        let bias = eos.iter().map(|id| (id.to_string(), json!(-100))).collect();
        let b = Arc::new(Bench { client, base, model, api_key: args.api_key.clone(), maker, bias });
        let seeds = AtomicU64::new(1);
        // Warm-up (model load, kernel compilation); not counted.
        let warm = b.maker.make(seeds.fetch_add(1, Ordering::Relaxed), p.min(16))?;
        eprintln!("warm-up request to {} (model {}) ...", b.base, b.model);
        b.request(&warm, 2).await?;
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            eprintln!(
                "concurrency {c}: {} request(s) of {p} prompt + {g} generated tokens ...",
                c * args.requests_per_stream
            );
            let t = std::time::Instant::now();
            let l = level(&b, c, args.requests_per_stream, p, g, &seeds, args.server_pid).await?;
            eprintln!("concurrency {c}: done in {:.1} s", t.elapsed().as_secs_f64());
            levels.push(l);
        }
        let shared = match args.shared_prefix {
            Some(n) => {
                eprintln!("shared prefix: {n} tokens, two requests ...");
                Some(shared_prefix(&b, n, g, &seeds).await?)
            }
            None => None,
        };
        let doc = json!({
            "url": b.base, "model": b.model,
            "prompt_tokens": p, "generation_tokens": g, "requests_per_stream": args.requests_per_stream,
            "prompts": if args.tokenizer.is_some() { "text" } else { "token_ids" },
            "suppressed_token_ids": eos,
            "levels": levels, "shared_prefix": shared,
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            print_table(&doc);
        }
        Ok(())
    })
}

/// The first model id in the server's /v1/models.
async fn first_model(client: &reqwest::Client, base: &str, key: Option<&str>) -> Result<String> {
    let mut req = client.get(format!("{base}/v1/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.with_context(|| format!("cannot reach {base}"))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{base}/v1/models answered {status}: {}", error_message(&text));
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{base}/v1/models: not JSON"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{base}/v1/models lists no model: give --model ID"))
}

/// The message of an OpenAI-style error body, else the body itself.
fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    match v["error"]["message"].as_str().or(v["error"].as_str()) {
        Some(m) => m.to_string(),
        None => body.chars().take(300).collect::<String>().trim().to_string(),
    }
}

impl Bench {
    /// One streamed completion read to `[DONE]`.
    async fn request(&self, prompt: &Prompt, max_tokens: usize) -> Result<Sample> {
        let mut body = json!({
            "model": self.model, "prompt": prompt.json(), "max_tokens": max_tokens, "temperature": 0.0,
            "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
        });
        if !self.bias.is_empty() {
            body["logit_bias"] = Value::Object(self.bias.clone());
        }
        let url = format!("{}/v1/completions", self.base);
        let mut req = self.client.post(&url).json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let start = Instant::now();
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("{url} answered {status}: {}", error_message(&text));
        }
        let mut stream = resp.bytes_stream();
        let (mut buf, mut first, mut chunks, mut usage, mut done) = (String::new(), None, 0usize, None, false);
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.with_context(|| format!("reading the stream from {url}"))?;
            let now = Instant::now();
            buf.push_str(&String::from_utf8_lossy(&bytes).replace('\r', ""));
            while let Some(i) = buf.find("\n\n") {
                let block: String = buf.drain(..i + 2).collect();
                for line in block.lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let v: Value = serde_json::from_str(data)
                        .with_context(|| format!("{url}: a stream chunk is not JSON: {data}"))?;
                    if !v["error"].is_null() {
                        bail!("{url}: error in the stream: {}", error_message(data));
                    }
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        usage = Some((n as usize, v["usage"]["prompt_tokens"].as_u64()));
                    }
                    let c = &v["choices"][0];
                    let n = match c["token_ids"].as_array() {
                        Some(ids) => ids.len(),
                        None => usize::from(c["text"].as_str().is_some_and(|t| !t.is_empty())),
                    };
                    if n > 0 {
                        first.get_or_insert(now);
                        chunks += n;
                    }
                }
            }
        }
        if !done {
            bail!("{url}: the stream ended without [DONE]");
        }
        let end = Instant::now();
        let (tokens, prompt_tokens) = match usage {
            Some((n, p)) => (n, p),
            None => (chunks, None),
        };
        Ok(Sample { start, first, end, tokens, prompt_tokens })
    }

    /// The server's `rmlx_memory_peak_bytes` gauge (largest over labels), if any.
    async fn peak_gauge(&self) -> Option<f64> {
        let mut req = self.client.get(format!("{}/metrics", self.base));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        let text = r.text().await.ok()?;
        text.lines()
            .filter(|l| l.starts_with("rmlx_memory_peak_bytes"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .reduce(f64::max)
    }
}

/// Resident memory of `pid` in bytes, from /proc.
fn rss_bytes(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

/// Nearest-rank percentile of `xs` (not empty).
fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// `c` streams, each sending `k` requests one after another.
async fn level(
    b: &Arc<Bench>,
    c: usize,
    k: usize,
    p: usize,
    g: usize,
    seeds: &AtomicU64,
    pid: Option<u32>,
) -> Result<Value> {
    let mut prompts = Vec::new();
    for _ in 0..c {
        let mut v = Vec::new();
        for _ in 0..k {
            v.push(b.maker.make(seeds.fetch_add(1, Ordering::Relaxed), p)?);
        }
        prompts.push(v);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = pid.map(|pid| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = rss_bytes(pid).unwrap_or(0.0);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                peak = peak.max(rss_bytes(pid).unwrap_or(0.0));
            }
            peak
        })
    });
    let t0 = Instant::now();
    let tasks: Vec<_> = prompts
        .into_iter()
        .map(|list| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for prompt in &list {
                    out.push(b.request(prompt, g).await?);
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.map_err(|e| anyhow!("a stream task failed: {e}"))??);
    }
    stop.store(true, Ordering::Relaxed);
    let rss = match sampler {
        Some(s) => s.await.ok().filter(|&v| v > 0.0),
        None => None,
    };
    let (peak, source) = match (b.peak_gauge().await, rss) {
        (Some(v), _) => (Some(v), "metrics"),
        (None, Some(v)) => (Some(v), "rss"),
        (None, None) => (None, "n/a"),
    };
    let end = samples.iter().map(|s| s.end).max().unwrap_or(t0);
    let first = samples.iter().filter_map(|s| s.first).min().unwrap_or(t0);
    let ttft: Vec<f64> = samples.iter().map(Sample::ttft).collect();
    let tps: Vec<f64> = samples.iter().filter_map(Sample::decode_tps).collect();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let decode_tokens: usize = samples.iter().map(|s| s.tokens.saturating_sub(1)).sum();
    let wall = (end - t0).as_secs_f64();
    let decode_wall = end.saturating_duration_since(first).as_secs_f64();
    let n = samples.len();
    let prompt_tokens: Vec<u64> = samples.iter().filter_map(|s| s.prompt_tokens).collect();
    Ok(json!({
        "concurrency": c, "requests": n,
        "ttft_p50_s": percentile(&ttft, 0.5), "ttft_p95_s": percentile(&ttft, 0.95),
        "stream_decode_tps_mean": (!tps.is_empty()).then(|| tps.iter().sum::<f64>() / tps.len() as f64),
        "stream_decode_tps_min": tps.iter().copied().reduce(f64::min),
        "aggregate_decode_tps": (decode_wall > 0.0).then(|| decode_tokens as f64 / decode_wall),
        "requests_per_s": n as f64 / wall, "wall_s": wall, "decode_wall_s": decode_wall,
        "generated_tokens": tokens, "expected_tokens": n * g,
        "min_generated_tokens": samples.iter().map(|s| s.tokens).min(),
        "prompt_tokens_reported": (prompt_tokens.len() == n).then(|| prompt_tokens.iter().sum::<u64>() / n as u64),
        "peak_memory_bytes": peak, "peak_memory_source": source, "peak_rss_bytes": rss,
    }))
}

/// Request 1: `n` tokens; request 2: the same `n` plus a short distinct suffix.
async fn shared_prefix(b: &Arc<Bench>, n: usize, g: usize, seeds: &AtomicU64) -> Result<Value> {
    let first = b.maker.make(seeds.fetch_add(1, Ordering::Relaxed), n)?;
    let second = b.maker.extend(Some(&first), seeds.fetch_add(1, Ordering::Relaxed), n + SUFFIX_TOKENS)?;
    let s1 = b.request(&first, g).await?;
    let s2 = b.request(&second, g).await?;
    Ok(json!({
        "prefix_tokens": n, "suffix_tokens": SUFFIX_TOKENS,
        "ttft_first_s": s1.ttft(), "ttft_second_s": s2.ttft(), "ratio": s2.ttft() / s1.ttft(),
        "prompt_tokens_reported": [s1.prompt_tokens, s2.prompt_tokens],
        "generated_tokens": [s1.tokens, s2.tokens],
    }))
}

fn print_table(doc: &Value) {
    println!(
        "{} model {}  prompt {} tokens ({}), generation {}, {} request(s) per stream",
        doc["url"].as_str().unwrap_or(""),
        doc["model"].as_str().unwrap_or(""),
        doc["prompt_tokens"],
        doc["prompts"].as_str().unwrap_or(""),
        doc["generation_tokens"],
        doc["requests_per_stream"]
    );
    let f = |v: &Value, d: usize| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.d$}"));
    let head = [
        "streams",
        "reqs",
        "ttft p50 s",
        "ttft p95 s",
        "tok/s/stream",
        "min",
        "aggregate tok/s",
        "req/s",
        "tokens",
        "peak mem",
    ];
    println!(
        "{:>7} {:>5} {:>10} {:>10} {:>12} {:>7} {:>15} {:>6} {:>11} {:>10}",
        head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8], head[9]
    );
    for l in doc["levels"].as_array().into_iter().flatten() {
        let mem = l["peak_memory_bytes"].as_f64().map_or("n/a".to_string(), |b| {
            format!("{:.0} MB{}", b / 1e6, if l["peak_memory_source"] == "rss" { " rss" } else { "" })
        });
        println!(
            "{:>7} {:>5} {:>10} {:>10} {:>12} {:>7} {:>15} {:>6} {:>11} {:>10}",
            l["concurrency"].to_string(),
            l["requests"].to_string(),
            f(&l["ttft_p50_s"], 3),
            f(&l["ttft_p95_s"], 3),
            f(&l["stream_decode_tps_mean"], 2),
            f(&l["stream_decode_tps_min"], 2),
            f(&l["aggregate_decode_tps"], 2),
            f(&l["requests_per_s"], 3),
            format!("{}/{}", l["generated_tokens"], l["expected_tokens"]),
            mem
        );
    }
    let s = &doc["shared_prefix"];
    if !s.is_null() {
        println!(
            "shared prefix {} tokens (+{}): ttft first {} s, second {} s, ratio {}",
            s["prefix_tokens"],
            s["suffix_tokens"],
            f(&s["ttft_first_s"], 3),
            f(&s["ttft_second_s"], 3),
            f(&s["ratio"], 3)
        );
    }
}
