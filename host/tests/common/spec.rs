//! Speculative decoding in the server's engine, from a test: catalogs with
//! and without a drafter, the prompts and greedy parameters the
//! speculative_serve*.rs files share, and the checks they all make (greedy
//! output equals plain decoding, one at a time and batched; the server's
//! drafts equal `rmlx generate`'s; sampled output follows the verifier's
//! distribution; usage and /metrics per drafter kind), and the same for
//! a model's own multi-token-prediction head; requests with a logits hook
//! or logprobs, and JSON posts to a served API.
use super::engine::{collect, entry, stats_after, submit, worker};
use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::{mtp, serve::DraftSpec, stats::chi_square_p, SpecOptions, SpecOutput};
use rmlx::engine::worker::{Finish, GenEvent, GenParams, GenRequest, LogitsHook, ModelCatalog, ModelEntry, TokenLogprob, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The model at `dir` twice: `plain` without a drafter and `id` with `draft`.
pub fn plain_and(id: &str, dir: &Path, draft: DraftSpec) -> ModelCatalog {
    let mut cat = ModelCatalog::discover(&[(Some("plain".into()), dir.to_path_buf()), (Some(id.into()), dir.to_path_buf())], &[]).unwrap();
    Arc::get_mut(&mut cat.entries[1]).unwrap().draft = Some(draft);
    cat
}

/// Greedy, `max_tokens` tokens past any EOS, prefill chunks of 16, `k`
/// draft tokens (None: the drafter's default).
pub fn greedy(max_tokens: usize, k: Option<usize>) -> GenParams {
    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 16, num_draft_tokens: k, ..GenParams::default() }
}

/// Five prompts of 1, 6, 19, 40 and 3 tokens, ids in 3..3 + `span`.
pub fn prompts_in(span: usize) -> Vec<Vec<u32>> {
    [1usize, 6, 19, 40, 3].iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i * 11 + k * 37 + 5) % span + 3) as u32).collect()).collect()
}

/// `prompts_in(250)`: ids < 256, the fixtures' vocabulary; 40 tokens pass
/// gemma3_text-f32's sliding window of 8.
pub fn prompts() -> Vec<Vec<u32>> {
    prompts_in(250)
}

/// Each of `prompts` with 40 more tokens (for budgets that force preemption).
pub fn lengthened(prompts: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
    prompts
        .into_iter()
        .map(|mut p| {
            p.extend((0..40).map(|i| (i % 200 + 9) as u32));
            p
        })
        .collect()
}

/// Waits until `w` runs no sequence (at most 30 s).
pub fn wait_idle(w: &Worker) {
    let t0 = std::time::Instant::now();
    while w.stats().running > 0 && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A request's draft counts for its `num_draft_tokens` `k`: none for 0,
/// (drafted, kept) with kept <= drafted otherwise; returns them.
pub fn check_counts(k: Option<usize>, speculation: Option<(usize, usize)>, what: &str) -> Option<(usize, usize)> {
    match (k, speculation) {
        (Some(0), s) => assert!(s.is_none(), "num_draft_tokens 0 turns speculation off: {s:?}"),
        (_, Some((d, a))) => assert!(a <= d, "{a} of {d}, k {k:?}, {what}"),
        (_, None) => panic!("a drafted row reports its counts"),
    }
    speculation
}

/// Greedy output of `cat`'s entry `kind` equals entry `plain`'s for each of
/// `prompts` (`n` tokens), one stream at a time (each drafted) and all at
/// once with draft lengths `ks`; the engine's counts for `kind` show steps
/// and drafts, and none for a draft model.
pub fn assert_greedy_equals_plain(cat: &ModelCatalog, kind: &str, prompts: &[Vec<u32>], n: usize, ks: &[Option<usize>]) {
    let w = worker(cat, SchedulerConfig::default());
    let (plain, spec) = (entry(cat, "plain"), entry(cat, kind));
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(n, None))).0).collect();
    for (p, want) in prompts.iter().zip(&want) {
        let (got, f) = collect(&mut submit(&w, &spec, p, greedy(n, None)));
        assert_eq!(&got, want, "prompt of {}", p.len());
        let (d, a) = f.speculation.expect("the usage reports draft counts");
        assert!(d > 0 && a <= d, "{a} of {d}");
    }
    let mut rxs: Vec<_> = prompts.iter().zip(ks).map(|(p, &k)| submit(&w, &spec, p, greedy(n, k))).collect();
    for ((rx, want), &k) in rxs.iter_mut().zip(&want).zip(ks) {
        let (got, f) = collect(rx);
        assert_eq!(&got, want, "batched, k {k:?}");
        if let Some((d, _)) = check_counts(k, f.speculation, "batched") {
            assert!(d > 0, "batched, k {k:?}: nothing drafted");
        }
    }
    let s = w.stats().speculation[kind].clone();
    assert!(s.steps > 0 && s.drafted_tokens > 0 && s.accepted_tokens <= s.drafted_tokens, "{s:?}");
    assert!(!w.stats().speculation.contains_key("draft"));
}

/// Rows of `prompts` with `ns` tokens each submitted together to `spec`
/// with draft lengths `ks`: each equals its own run on `plain` alone, and
/// reports counts unless its `k` is 0.
pub fn assert_mixed_batch_equals_alone(w: &Worker, plain: &Arc<ModelEntry>, spec: &Arc<ModelEntry>, prompts: &[Vec<u32>], ns: &[usize], ks: &[Option<usize>], what: &str) {
    let alone: Vec<Vec<u32>> = prompts.iter().zip(ns).map(|(p, &n)| collect(&mut submit(w, plain, p, greedy(n, None))).0).collect();
    let mut rxs: Vec<_> = prompts.iter().zip(ks).zip(ns).map(|((p, &k), &n)| submit(w, spec, p, greedy(n, k))).collect();
    for ((rx, want), &k) in rxs.iter_mut().zip(&alone).zip(ks) {
        let (got, f) = collect(rx);
        assert_eq!(&got, want, "k {k:?}, {what}");
        check_counts(k, f.speculation, what);
    }
}

/// Round by round, the server's drafts for `cat`'s entry `kind` equal
/// `generate`'s (`rmlx generate`'s loop for that drafter, given the prompt
/// and 3 adaptive draft tokens, `n` tokens, prefill chunks of 16) for each
/// of `prompts`: the same draft tokens, the same tokens, the same drafted
/// and accepted counts; at least 20 rounds compared.
pub fn assert_drafts_equal_generate(cat: &ModelCatalog, kind: &str, prompts: &[Vec<u32>], n: usize, mut generate: impl FnMut(&[u32], &SpecOptions) -> SpecOutput) {
    let w = worker(cat, SchedulerConfig { log_drafts: true, ..SchedulerConfig::default() });
    let e = entry(cat, kind);
    let (mut seen, mut rounds) = (0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: n, prefill_chunk: 16 };
        let want = generate(p, &opts);
        let (got, f) = collect(&mut submit(&w, &e, p, greedy(n, None)));
        assert_eq!(got, want.tokens, "prompt of {}", p.len());
        let log = stats_after(&w, i as u64 + 1).speculation[kind].draft_log.clone();
        assert_eq!(log[seen..], want.draft_log[..], "drafts, prompt of {}", p.len());
        assert_eq!(f.speculation, Some((want.drafted_tokens, want.accepted_tokens)), "prompt of {}", p.len());
        (seen, rounds) = (log.len(), rounds + want.draft_log.len());
    }
    assert!(rounds >= 20, "{rounds} draft rounds compared");
}

/// The 27 three-token sequences after `prompt` under `params` (top-k 3) on
/// fixture `model` and their probabilities under the verifier's own sampler.
pub fn verifier_sequences(model: &str, prompt: &[u32], params: &SamplingParams) -> Vec<(Vec<u32>, f64)> {
    let mut target = LoadedModel::load(&super::fixture(model), &super::registry()).unwrap();
    let expected = super::sampling::three_token_sequences(&mut target, prompt, params, |_, _| {});
    assert_eq!(expected.len(), 27);
    expected
}

/// Three tokens of `prompt` under `params` with seeds 0 to 1199, through
/// `cat`'s entry `kind` in batches of 16 (`spec_max_batch` 16): how often
/// each of `expected`'s sequences came, and the drafted and kept totals.
/// Panics on a sequence outside `expected`.
pub fn sample_sequences(cat: &ModelCatalog, kind: &str, prompt: &[u32], params: &SamplingParams, expected: &[(Vec<u32>, f64)]) -> (Vec<u64>, usize, usize) {
    let w = worker(cat, SchedulerConfig { spec_max_batch: 16, ..SchedulerConfig::default() });
    let e = entry(cat, kind);
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept) = (0, 0);
    for wave in 0..1200u64 / 16 {
        let mut rxs: Vec<_> = (0..16)
            .map(|j| {
                let sampling = SamplingParams { seed: Some(wave * 16 + j), ..params.clone() };
                submit(&w, &e, prompt, GenParams { sampling, max_tokens: 3, ignore_eos: true, ..GenParams::default() })
            })
            .collect();
        for rx in rxs.iter_mut() {
            let (toks, f) = collect(rx);
            let (d, a) = f.speculation.unwrap();
            assert!(a <= d);
            (drafted, kept) = (drafted + d, kept + a);
            let i = expected.iter().position(|(s, _)| *s == toks);
            counts[i.unwrap_or_else(|| panic!("a sequence outside the verifier's top-k support was emitted: {toks:?}"))] += 1;
        }
    }
    (counts, drafted, kept)
}

/// `counts` follow `expected`'s probabilities: chi-square p > 0.001.
pub fn assert_follows(counts: &[u64], expected: &[(Vec<u32>, f64)]) {
    let probs: Vec<f64> = expected.iter().map(|e| e.1).collect();
    let pv = chi_square_p(counts, &probs);
    assert!(pv > 1e-3, "chi-square p-value {pv}: counts {counts:?}, expected {probs:?}");
}

/// Serves the API over a worker for `cat` (queue depth 16, two models
/// loaded at most); returns the base URL.
pub fn serve_catalog(cat: ModelCatalog) -> String {
    let cfg = WorkerConfig { plugins_dir: super::plugins_dir(), max_queue_depth: 16, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 };
    let worker = Worker::start(cfg, &cat).unwrap();
    super::serve(Arc::new(rmlx::api::AppState { catalog: Arc::new(cat), worker, opts: Default::default() }))
}

/// The value of /metrics line `name{drafter="kind"}` in `text`.
pub fn drafter_metric(text: &str, name: &str, kind: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{name}{{drafter=\"{kind}\"}}"))).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

/// The model at fixture `model` (e.g. "models/qwen3_5-mtp-f32") twice:
/// `plain` without a drafter, `mtp` with its own multi-token-prediction
/// head drafting `k` tokens.
pub fn mtp_catalog(model: &str, k: usize) -> ModelCatalog {
    let dir = super::fixture(model);
    plain_and("mtp", &dir, DraftSpec::new(dir.clone(), Some(k), Some("mtp")).unwrap())
}

/// `assert_drafts_equal_generate` for fixture `model`'s MTP head
/// (`mtp_catalog(model, 3)`, 16 tokens) against `mtp::generate`.
pub fn assert_mtp_drafts_equal_generate(model: &str, prompts: &[Vec<u32>]) {
    let dir = super::fixture(model);
    let reg = super::registry();
    let mut target = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    assert_drafts_equal_generate(&mtp_catalog(model, 3), "mtp", prompts, 16, |p, opts| {
        mtp::generate(&mut target, &mut head, p, &SamplingParams::default(), opts, |_| true).unwrap()
    });
}

/// Three tokens after [17, 45, 45] at temperature 1 with top-k 3 and a
/// repetition penalty of 1.5, drafted by fixture `model`'s MTP head
/// (`mtp_catalog(model, 2)`) for 1200 seeds: the sequences follow the
/// verifier's own distribution (`assert_follows`) and the head drafted.
pub fn assert_sampled_mtp_follows_the_verifier(model: &str) {
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = verifier_sequences(model, &prompt, &params);
    let (counts, drafted, _) = sample_sequences(&mtp_catalog(model, 2), "mtp", &prompt, &params, &expected);
    assert_follows(&counts, &expected);
    assert!(drafted > 0);
}

/// The served model `model` at `base`, with a drafter: 12 greedy tokens of
/// `prompt` on /v1/completions carry (drafted, accepted) counts in `usage`,
/// and `num_draft_tokens: 0` gives the same tokens without them. Returns
/// the counts.
pub async fn assert_api_usage_counts_drafts(base: &str, model: &str, prompt: &[u32]) -> (u64, u64) {
    use serde_json::{json, Value};
    let client = reqwest::Client::new();
    let post = |k: Option<u32>| {
        let mut b = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
        if let Some(k) = k {
            b["num_draft_tokens"] = k.into();
        }
        let r = client.post(format!("{base}/v1/completions")).json(&b).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let (spec, off) = (post(None).await, post(Some(0)).await);
    assert_eq!(spec["choices"][0]["token_ids"], off["choices"][0]["token_ids"]);
    let u = &spec["usage"];
    let (d, a) = (u["drafted_tokens"].as_u64().unwrap(), u["accepted_tokens"].as_u64().unwrap());
    assert!(d > 0 && a <= d && u["completion_tokens"] == 12, "{u}");
    assert!(off["usage"].get("drafted_tokens").is_none(), "{}", off["usage"]);
    (d, a)
}

/// Serves fixture `model` as `id` with its own MTP head drafting 3 tokens
/// (`serve_catalog`); returns the base URL.
pub fn serve_with_mtp(id: &str, model: &str) -> String {
    let dir = super::fixture(model);
    let mut cat = ModelCatalog::discover(&[(Some(id.into()), dir.clone())], &[]).unwrap();
    Arc::get_mut(&mut cat.entries[0]).unwrap().draft = Some(DraftSpec::new(dir, Some(3), Some("mtp")).unwrap());
    serve_catalog(cat)
}

/// POSTs `body` as JSON to `base` + `path` with `client`; returns the
/// response's (status, text).
pub async fn post_json(client: &reqwest::Client, base: &str, path: &str, body: serde_json::Value) -> (u16, String) {
    let r = client.post(format!("{base}{path}")).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Submits `prompt` to `e` with `params` and `hook`; its events come on the
/// receiver.
pub fn submit_hooked(w: &Worker, e: &Arc<ModelEntry>, prompt: &[u32], params: GenParams, hook: Option<Box<dyn LogitsHook>>) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest { model: e.clone(), prompt: prompt.to_vec(), params, hook, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

/// Reads to the end: (token ids, their logprobs when asked, how it
/// finished); panics on a request error.
pub fn collect_logprobs(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> (Vec<u32>, Vec<TokenLogprob>, Finish) {
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, logprob, .. } => {
                ids.push(id);
                lps.extend(logprob);
            }
            GenEvent::Done(f) => return (ids, lps, f),
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// `got` has `want`'s length; each token's logprob, its top alternatives'
/// ids (in order) and their logprobs are within `tol` of `want`'s.
pub fn assert_logprobs_close(got: &[TokenLogprob], want: &[TokenLogprob], tol: f32, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g.logprob - w.logprob).abs() <= tol, "{ctx}, token {i}: logprob {} vs {}", g.logprob, w.logprob);
        assert_eq!(g.top.len(), w.top.len(), "{ctx}, token {i}");
        for (a, b) in g.top.iter().zip(&w.top) {
            assert_eq!(a.0, b.0, "{ctx}, token {i}: top ids {:?} vs {:?}", g.top, w.top);
            assert!((a.2 - b.2).abs() <= tol, "{ctx}, token {i}: top logprob {} vs {}", a.2, b.2);
        }
    }
}

/// A stateful constraint: no token in the same class mod 3 as the one
/// before it (`last`). Its forks share the counters: every commit, and the
/// commits of a token it forbids (which fail).
#[derive(Clone)]
pub struct NoRepeatClass {
    pub last: u32,
    pub commits: Arc<AtomicUsize>,
    pub broken: Arc<AtomicUsize>,
}

impl NoRepeatClass {
    /// The constraint after token `last`, with counters of its own.
    pub fn new(last: u32) -> Self {
        NoRepeatClass { last, commits: Default::default(), broken: Default::default() }
    }
}

impl LogitsHook for NoRepeatClass {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        for (t, l) in logits.iter_mut().enumerate() {
            if t as u32 % 3 == self.last % 3 {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if token % 3 == self.last % 3 {
            self.broken.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::ensure!(token % 3 != self.last % 3, "token {token} breaks the constraint after {}", self.last);
        self.last = token;
        Ok(())
    }
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        Some(Box::new(self.clone()))
    }
}
