//! Caches (LRU, hashlink): token tries per model and EOS set, and compiled grammars per
//! model and spec text. A compiled grammar is a fresh llguidance matcher; each request
//! gets a clone (which shares the grammar and the lexer's state cache). Both are built
//! outside the locks, by the caller's blocking thread.

use std::sync::{Arc, LazyLock, Mutex};

use anyhow::Result;
use hashlink::LruCache;
use llguidance::Matcher;

use super::{ConstraintFactory, ConstraintSpec, SpecError};
use crate::model::tokenizer::Tokenizer;

/// Token tries kept (one per loaded model, and a few more).
const FACTORIES: usize = 8;
/// Compiled grammars kept (all models together).
const COMPILED: usize = 128;

type FactoryKey = (String, Vec<u32>);

static FACTORY: LazyLock<Mutex<LruCache<FactoryKey, Arc<ConstraintFactory>>>> =
    LazyLock::new(|| Mutex::new(LruCache::new(FACTORIES)));
static GRAMMARS: LazyLock<Mutex<LruCache<(String, String), Matcher>>> =
    LazyLock::new(|| Mutex::new(LruCache::new(COMPILED)));

/// The factory cached under `key` (a model id or tokenizer) and `eos_ids`, built on a miss.
/// A cached entry whose vocabulary no longer matches the tokenizer is rebuilt.
pub(super) fn factory(key: &str, tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Arc<ConstraintFactory>> {
    let mut eos = eos_ids.to_vec();
    eos.sort_unstable();
    eos.dedup();
    let k = (key.to_string(), eos);
    if let Some(f) = FACTORY.lock().unwrap().get(&k) {
        if f.tokenizer.vocab_size() == tokenizer.vocab_size() {
            return Ok(f.clone());
        }
    }
    let f = Arc::new(ConstraintFactory::new(tokenizer, &k.1)?);
    FACTORY.lock().unwrap().insert(k, f.clone());
    Ok(f)
}

/// A fresh matcher for `spec` under `key`, compiled by `build` on a miss.
pub(super) fn compiled(
    key: &str,
    spec: &ConstraintSpec,
    build: impl FnOnce() -> Result<Matcher, SpecError>,
) -> Result<Matcher, SpecError> {
    let k = (key.to_string(), spec.key());
    if let Some(m) = GRAMMARS.lock().unwrap().get(&k) {
        return Ok(m.clone());
    }
    let m = build()?;
    GRAMMARS.lock().unwrap().insert(k, m.clone());
    Ok(m)
}

/// How many compiled grammars are cached under `key` (tests).
#[cfg(test)]
pub(super) fn compiled_count(key: &str) -> usize {
    GRAMMARS.lock().unwrap().iter().filter(|((k, _), _)| k == key).count()
}
