//! Several drafters per model in the server (issue 14: "sequences in a
//! batch may use different drafters or none"; engine/scheduler/spec.rs,
//! spec/plan.rs, spec/forward.rs): a model served with two drafters, rows of
//! one batch drafting with either (the request's `draft_kind`, else the
//! model's first) or not at all, one verify forward for every row.
//!
//! On the tiny fixtures (vocabulary 256): llama-f32 with itself as draft
//! model (every draft kept) and its random Eagle-3 head (few kept); the
//! Qwen3.5 hybrid with its MTP head and a quantized copy as draft model
//! (recurrent state rolled back for both); qwen3-f32 with its DFlash
//! drafter and a quantized copy. Greedy output of a mixed batch equals each
//! request alone without speculation, token for token; each request's
//! counts are its drafter's (they add up to the engine's per-kind counts);
//! through the HTTP API a bad `draft_kind` is a 400 in each API's error
//! shape naming the field and the model's kinds, and /metrics shows both
//! drafters; `rmlx serve` takes the list from `--drafter` and from
//! rmlx.toml's `drafters`, and refuses a kind given twice at start.
mod common;

use common::engine::{collect, entry, stats_after, submit, worker};

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::{serve::DraftSpec, DraftKind};
use rmlx::engine::worker::{GenParams, ModelCatalog};
use std::sync::Arc;

/// `model` twice: `plain` without a drafter and `multi` with `drafters`
/// ((kind, directory under tests/fixtures/models, or None for the model's
/// own), the first its default).
fn catalog(model: &str, drafters: &[(&str, Option<&str>)], k: usize) -> ModelCatalog {
    let dir = common::fixture(&format!("models/{model}"));
    let mut specs: Vec<DraftSpec> = drafters
        .iter()
        .map(|(kind, d)| {
            let path = d.map_or(dir.clone(), |d| common::fixture(&format!("models/{d}")));
            // A DFlash drafter drafts its block less one by default.
            let k = (*kind != "dflash").then_some(k);
            DraftSpec::new(path, k, Some(kind)).unwrap()
        })
        .collect();
    let mut cat = common::spec::plain_and("multi", &dir, specs.remove(0));
    Arc::get_mut(&mut cat.entries[1]).unwrap().extra_drafters = specs;
    cat
}

fn greedy(max_tokens: usize, k: Option<usize>, kind: Option<DraftKind>) -> GenParams {
    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 16, num_draft_tokens: k, draft_kind: kind, ..GenParams::default() }
}

/// Six prompts of 1 to 40 tokens (ids < 256).
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 6, 19, 40, 3, 12].iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i * 11 + k * 37 + 5) % 250 + 3) as u32).collect()).collect()
}

/// One batch of six rows on `multi` (drafters `a` first, then `b`): the
/// default (a), a, b, none (`num_draft_tokens: 0`), b, a. Every row's
/// tokens equal its prompt's plain run; a row's counts are its drafter's:
/// per kind they add up to the engine's counts, which both drafters have;
/// the step held all six rows at once. Returns per kind (drafted, kept).
fn mixed_batch_equals_plain(model: &str, drafters: &[(&str, Option<&str>)]) -> [(u64, u64); 2] {
    const N: usize = 16;
    let cat = catalog(model, drafters, 3);
    let w = worker(&cat, SchedulerConfig::default());
    let (plain, multi) = (entry(&cat, "plain"), entry(&cat, "multi"));
    let want: Vec<Vec<u32>> = prompts().iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, None, None))).0).collect();
    let (a, b) = (DraftKind::parse(drafters[0].0).unwrap(), DraftKind::parse(drafters[1].0).unwrap());
    // (request kind, num_draft_tokens, the kind it drafts with)
    let rows = [(None, None, Some(a)), (Some(a), None, Some(a)), (Some(b), None, Some(b)), (Some(b), Some(0), None), (Some(b), Some(2), Some(b)), (Some(a), Some(1), Some(a))];
    let mut rxs: Vec<_> = prompts().iter().zip(&rows).map(|(p, &(kind, k, _))| submit(&w, &multi, p, greedy(N, k, kind))).collect();
    let mut per_kind = [(0u64, 0u64); 2];
    for ((rx, want), &(kind, k, used)) in rxs.iter_mut().zip(&want).zip(&rows) {
        let (got, f) = collect(rx);
        assert_eq!(&got, want, "{model}: a row asking {kind:?} with num_draft_tokens {k:?}");
        match (used, f.speculation) {
            (None, s) => assert!(s.is_none(), "{model}: num_draft_tokens 0 turns speculation off: {s:?}"),
            (Some(u), Some((d, acc))) => {
                assert!(acc <= d, "{model}: {acc} of {d}");
                let slot = &mut per_kind[usize::from(u == b)];
                (slot.0, slot.1) = (slot.0 + d as u64, slot.1 + acc as u64);
            }
            (Some(_), None) => panic!("{model}: a drafted row reports its counts"),
        }
    }
    let s = stats_after(&w, (2 * rows.len()) as u64);
    for (i, kind) in [drafters[0].0, drafters[1].0].into_iter().enumerate() {
        let c = s.speculation.get(kind).unwrap_or_else(|| panic!("{model}: no counts for `{kind}`: {:?}", s.speculation));
        assert_eq!((c.drafted_tokens, c.accepted_tokens), per_kind[i], "{model}: `{kind}`'s counts are its rows'");
        assert!(c.steps > 0 && c.drafted_tokens > 0, "{model}: `{kind}` drafted: {c:?}");
    }
    assert_eq!(s.speculation.len(), 2, "{model}: {:?}", s.speculation.keys().collect::<Vec<_>>());
    // Three rows ask for `a`, two for `b`: a decode step of five or more
    // of them held rows of both drafters (a step with drafting rows is a
    // speculative one).
    assert!(s.max_batch >= rows.len() - 1, "{model}: a step held rows of both drafters: at most {} rows at once", s.max_batch);
    per_kind
}

/// A draft model (llama-f32 drafting for itself: every draft kept) and an
/// Eagle-3 head (random: few kept) in one batch.
#[test]
fn a_batch_mixing_a_draft_model_an_eagle3_head_and_no_drafter_equals_plain() {
    let _g = common::mlx_lock();
    let [draft, eagle3] = mixed_batch_equals_plain("llama-f32", &[("draft", Some("llama-f32")), ("eagle3", Some("llama-eagle3-head"))]);
    assert_eq!(draft.0, draft.1, "the model drafting for itself keeps every draft: {draft:?}");
    assert!(eagle3.1 < eagle3.0, "the random head's drafts are mostly rejected: {eagle3:?}");
}

/// The hybrid's MTP head and a draft model with recurrent state of its
/// own, in one batch (the verifier's state rolled back per row).
#[test]
fn a_batch_mixing_an_mtp_head_a_draft_model_and_no_drafter_equals_plain() {
    let _g = common::mlx_lock();
    mixed_batch_equals_plain("qwen3_5-mtp-f32", &[("mtp", None), ("draft", Some("qwen3_5-q8-g64"))]);
}

/// A DFlash block drafter (context stores outside the paged pool) and a
/// draft model (its paged pool), in one batch.
#[test]
fn a_batch_mixing_a_dflash_drafter_a_draft_model_and_no_drafter_equals_plain() {
    let _g = common::mlx_lock();
    mixed_batch_equals_plain("qwen3-f32", &[("dflash", Some("qwen3-dflash-f32")), ("draft", Some("qwen3-q4-g64"))]);
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty
/// over 1200 seeds in batches of 16, on llama-f32 served with its q4 copy
/// (the default) and its Eagle-3 head, the seeds taking the default, the
/// head and no drafter in turn: the 27 possible sequences occur as often as
/// the verifier's own sampler gives them (chi-square p > 0.001); both
/// drafters drafted, the q4 copy's drafts both kept and rejected.
#[test]
fn sampled_rows_of_two_drafters_follow_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::spec::verifier_sequences("models/llama-f32", &prompt, &params);
    let cat = catalog("llama-f32", &[("draft", Some("llama-q4-g64")), ("eagle3", Some("llama-eagle3-head"))], 2);
    let w = worker(&cat, SchedulerConfig { spec_max_batch: 16, ..SchedulerConfig::default() });
    let multi = entry(&cat, "multi");
    let mut counts = vec![0u64; expected.len()];
    for wave in 0..1200u64 / 16 {
        let mut rxs: Vec<_> = (0..16)
            .map(|j| {
                let seed = wave * 16 + j;
                let (kind, k) = [(None, None), (Some(DraftKind::Eagle3), None), (None, Some(0))][seed as usize % 3];
                let sampling = SamplingParams { seed: Some(seed), ..params.clone() };
                submit(&w, &multi, &prompt, GenParams { sampling, max_tokens: 3, ignore_eos: true, num_draft_tokens: k, draft_kind: kind, ..GenParams::default() })
            })
            .collect();
        for rx in rxs.iter_mut() {
            let (toks, _) = collect(rx);
            let i = expected.iter().position(|(s, _)| *s == toks);
            counts[i.unwrap_or_else(|| panic!("a sequence outside the verifier's top-k support was emitted: {toks:?}"))] += 1;
        }
    }
    common::spec::assert_follows(&counts, &expected);
    let s = stats_after(&w, 1200);
    let (draft, eagle3) = (&s.speculation["draft"], &s.speculation["eagle3"]);
    assert!(draft.accepted_tokens > 0 && draft.accepted_tokens < draft.drafted_tokens, "the q4 copy's drafts both kept and rejected: {draft:?}");
    assert!(eagle3.drafted_tokens > 0, "{eagle3:?}");
}

/// A KV budget far too small for every sequence at once, shared by the
/// verifier's blocks and both drafters' pools (the hybrid's MTP head and its
/// q8 copy as draft model): sequences are preempted (their drafter's KV
/// dropped, in its own pool) and every output still equals plain decoding;
/// both drafters drafted; when all are done no block of any pool is held.
#[test]
fn preemption_with_two_drafters_keeps_output_exact_and_frees_every_pool() {
    let _g = common::mlx_lock();
    // One full-attention layer of 2 KV heads x 16 dims in f32, K and V: 256
    // bytes per token, in the verifier, the head and the draft model alike.
    let per_token = 2 * 16 * 4 * 2;
    let cat = catalog("qwen3_5-mtp-f32", &[("mtp", None), ("draft", Some("qwen3_5-q8-g64"))], 3);
    let sched = SchedulerConfig { kv_budget: rmlx::engine::scheduler::KvBudget::Bytes(per_token * 8 * 40), block_size: 8, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    let ps = common::spec::lengthened(prompts());
    const N: usize = 40;
    let kinds = [None, Some(DraftKind::Draft), Some(DraftKind::Mtp), Some(DraftKind::Draft), None, Some(DraftKind::Draft)];
    let multi = entry(&cat, "multi");
    let mut rxs: Vec<_> = ps.iter().zip(kinds).map(|(p, kind)| submit(&w, &multi, p, greedy(N, None, kind))).collect();
    for ((rx, p), kind) in rxs.iter_mut().zip(&ps).zip(kinds) {
        let (got, f) = collect(rx);
        assert_eq!(got, common::greedy_reference("qwen3_5-mtp-f32", p, N), "prompt of {}, {kind:?}", p.len());
        assert!(f.speculation.is_some());
    }
    common::spec::wait_idle(&w);
    let s = w.stats();
    assert!(s.blocks[0].1.preemptions >= 1, "the budget never forced a preemption: {:?}", s.blocks[0].1);
    for kind in ["mtp", "draft"] {
        assert!(s.speculation.get(kind).is_some_and(|c| c.drafted_tokens > 0), "`{kind}` drafted: {:?}", s.speculation);
    }
    assert_eq!(s.kv_used_bytes, 0, "blocks (verifier, head or draft model) still held: {s:?}");
}

/// Through the HTTP API on llama-f32 served with `draft` (itself) and
/// `eagle3`: `draft_kind` picks the drafter (the usage's counts are its:
/// the self-draft keeps all, the head not), every answer has the plain
/// tokens; an unknown kind and a kind the model was not served with are
/// 400s naming `draft_kind` and the model's kinds, in the OpenAI shape on
/// /v1/completions and /v1/chat/completions and in the Anthropic shape on
/// /v1/messages; /metrics counts both drafters.
#[tokio::test]
async fn the_api_picks_a_drafter_by_kind_and_refuses_others() {
    use serde_json::{json, Value};
    let _g = common::mlx_lock();
    let cat = catalog("llama-f32", &[("draft", Some("llama-f32")), ("eagle3", Some("llama-eagle3-head"))], 3);
    let base = common::spec::serve_catalog(cat);
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: Value| common::spec::post_json(&client, &base, path, body);
    let completion = |kind: Option<&str>, k: Option<u32>| {
        let mut b = json!({"model": "multi", "prompt": [3, 14, 15, 92, 65], "max_tokens": 16, "temperature": 0});
        if let Some(kind) = kind {
            b["draft_kind"] = kind.into();
        }
        if let Some(k) = k {
            b["num_draft_tokens"] = k.into();
        }
        b
    };
    let mut answers = Vec::new();
    let mut sums = std::collections::BTreeMap::<&str, (u64, u64)>::new();
    for (kind, k) in [(None, None), (Some("draft"), None), (Some("eagle3"), None), (Some("eagle3"), Some(0))] {
        let (s, text) = post("/v1/completions", completion(kind, k)).await;
        assert_eq!(s, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let u = v["usage"].clone();
        match k {
            Some(0) => assert!(u.get("drafted_tokens").is_none(), "num_draft_tokens 0 turns it off: {u}"),
            _ => {
                let (d, a) = (u["drafted_tokens"].as_u64().unwrap(), u["accepted_tokens"].as_u64().unwrap());
                let used = kind.unwrap_or("draft");
                match used {
                    "draft" => assert!(d > 0 && a == d, "the self-draft keeps every draft: {u}"),
                    _ => assert!(d > 0 && a < d, "the random head does not: {u}"),
                }
                let e = sums.entry(used).or_default();
                (e.0, e.1) = (e.0 + d, e.1 + a);
            }
        }
        answers.push(v["choices"][0]["token_ids"].clone());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    // An unknown kind and a kind the model was not served with.
    for bad in ["medusa", "mtp"] {
        let (s, err) = post("/v1/completions", completion(Some(bad), None)).await;
        assert_eq!(s, 400, "{err}");
        let v: Value = serde_json::from_str(&err).unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(v["error"]["param"] == "draft_kind" && msg.contains(bad) && msg.contains("draft, eagle3"), "{err}");
        let chat = json!({"model": "multi", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "draft_kind": bad});
        let (s, err) = post("/v1/chat/completions", chat).await;
        assert_eq!(s, 400, "{err}");
        let v: Value = serde_json::from_str(&err).unwrap();
        assert!(v["error"]["param"] == "draft_kind" && v["error"]["message"].as_str().unwrap_or_default().contains("draft, eagle3"), "{err}");
        let msg = json!({"model": "multi", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "draft_kind": bad});
        let (s, err) = post("/v1/messages", msg).await;
        assert_eq!(s, 400, "{err}");
        let v: Value = serde_json::from_str(&err).unwrap();
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(v["type"] == "error" && v["error"]["type"] == "invalid_request_error" && m.contains("draft_kind") && m.contains("draft, eagle3"), "{err}");
    }
    // The model without drafters refuses every kind.
    let mut b = completion(Some("draft"), None);
    b["model"] = "plain".into();
    let (s, err) = post("/v1/completions", b).await;
    assert!(s == 400 && err.contains("without a drafter"), "{s} {err}");
    // /metrics: both drafters, each with its requests' counts.
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str, kind: &str| common::spec::drafter_metric(&text, name, kind) as u64;
    for (kind, (d, a)) in &sums {
        assert_eq!((value("rmlx_spec_draft_tokens_total", kind), value("rmlx_spec_accepted_tokens_total", kind)), (*d, *a), "{kind}");
    }
    assert_eq!(sums.len(), 2);
}

/// `rmlx serve` with `args`: its first stderr line naming where it serves
/// (`http://ADDR`), or its stderr when it stops first. The child is killed
/// when the returned guard drops.
struct Serve {
    child: std::process::Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Result<(Serve, String), String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--no-metrics-db"])
        .args(args)
        .env_remove("RMLX_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("rmlx serving") {
            let at = line.find("http://").expect("an address on the start line");
            let addr: String = line[at..].chars().take_while(|c| !c.is_whitespace()).collect();
            // Keep reading its stderr: the server never writes to a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((Serve { child }, addr));
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    let _ = child.wait();
    Err(seen)
}

/// The drafters `rmlx serve` gave `model`, as its 400 for an unknown
/// `draft_kind` names them, and the usage counts of a request drafting
/// with `kind`.
async fn served_kinds(base: &str, model: &str, kind: &str) -> (String, serde_json::Value) {
    use serde_json::json;
    let client = reqwest::Client::new();
    let body = |k: &str| json!({"model": model, "prompt": [3, 14, 15], "max_tokens": 6, "temperature": 0, "draft_kind": k});
    let r = client.post(format!("{base}/v1/completions")).json(&body("medusa")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let err: serde_json::Value = r.json().await.unwrap();
    let r = client.post(format!("{base}/v1/completions")).json(&body(kind)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    (err["error"]["message"].as_str().unwrap().to_string(), v["usage"].clone())
}

/// The CLI's `--drafter KIND[=DIR]` and rmlx.toml's `drafters` list give a
/// model its drafters (the first its default, requests picking the others
/// by kind), a flag's drafter replacing the file's of its kind; a kind
/// given twice by one source, or a `--drafter` lacking its directory,
/// stops the server at start with one line.
#[tokio::test]
async fn serve_takes_drafters_from_flags_and_rmlx_toml_and_refuses_a_kind_twice() {
    let (model, head) = (common::fixture("models/llama-f32"), common::fixture("models/llama-eagle3-head"));
    let (m, h) = (model.to_str().unwrap(), head.to_str().unwrap());
    let eagle3 = format!("eagle3={h}");
    // Flags: the first drafter, then one more.
    let (guard, base) = serve(&["--model", &format!("tiny={m}"), "--draft-model", m, "--drafter", &eagle3]).unwrap_or_else(|e| panic!("{e}"));
    let (kinds, usage) = served_kinds(&base, "tiny", "eagle3").await;
    assert!(kinds.contains("the model `tiny` drafts with: draft, eagle3"), "{kinds}");
    assert!(usage["drafted_tokens"].as_u64().unwrap() > 0, "{usage}");
    drop(guard);
    // rmlx.toml: the single keys and the list.
    let dir = std::env::temp_dir().join(format!("rmlx-drafters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("rmlx.toml");
    let write = |list: &str| std::fs::write(&toml, format!("[[server.models]]\nid = \"tiny\"\npath = \"{m}\"\ndraft_kind = \"eagle3\"\ndraft_model = \"{h}\"\ndrafters = [{list}]\n")).unwrap();
    write(&format!("{{ kind = \"draft\", model = \"{m}\", num_draft_tokens = 2 }}"));
    let (guard, base) = serve(&["--config", toml.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
    let (kinds, usage) = served_kinds(&base, "tiny", "draft").await;
    assert!(kinds.contains("the model `tiny` drafts with: eagle3, draft"), "{kinds}");
    assert_eq!(usage["drafted_tokens"], usage["accepted_tokens"], "the self-draft keeps every draft: {usage}");
    drop(guard);
    // Flags beat the file: a `--drafter` of a kind the file gives takes its place.
    let q4 = common::fixture("models/llama-q4-g64");
    let (guard, base) = serve(&["--config", toml.to_str().unwrap(), "--drafter", &format!("draft={}", q4.display())]).unwrap_or_else(|e| panic!("{e}"));
    let (kinds, usage) = served_kinds(&base, "tiny", "draft").await;
    assert!(kinds.contains("the model `tiny` drafts with: eagle3, draft"), "{kinds}");
    assert!(usage["accepted_tokens"].as_u64() < usage["drafted_tokens"].as_u64(), "the q4 copy drafts, not the model itself: {usage}");
    drop(guard);
    // A kind twice: in the list, and between the flags.
    write(&format!("{{ kind = \"draft\", model = \"{m}\" }}, {{ kind = \"eagle3\", model = \"{h}\" }}"));
    let err = serve(&["--config", toml.to_str().unwrap()]).err().expect("refused");
    assert!(err.contains("model `tiny` has two `eagle3` drafters") && !err.contains("panick"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let err = serve(&["--model", m, "--draft-model", m, "--drafter", &format!("draft={m}")]).err().expect("refused");
    assert!(err.contains("has two `draft` drafters") && !err.contains("panick"), "{err}");
    let err = serve(&["--model", m, "--drafter", "eagle3"]).err().expect("refused");
    assert!(err.contains("--drafter eagle3 needs a directory: --drafter eagle3=DIR") && !err.contains("panick"), "{err}");
}
