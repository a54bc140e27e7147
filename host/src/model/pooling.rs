//! How a model directory turns hidden states into one embedding: the
//! sentence-transformers files (`modules.json`, the Pooling module's
//! `config.json`, `sentence_bert_config.json`,
//! `config_sentence_transformers.json`), or defaults for a bare encoder.
//!
//! A directory is an embedder when `modules.json` lists a Pooling module, or
//! when its `model_type` is an encoder (BERT family) with no such file; then
//! it pools by mean and does not normalise, as sentence-transformers does
//! for a plain transformers checkpoint. A decoder with a `modules.json`
//! whose Pooling module has no config pools by the last token (Qwen3-Embedding).
//! A decoder without `modules.json` is a generator, not an embedder.
//!
//! A **multi-task embedder** (jina-embeddings-v4's layout; [`EmbedTasks`]):
//! config.json lists `task_names` and `matryoshka_dims`, and `adapters/`
//! holds the per-task LoRA adapters (model/adapters.rs). It pools by mean
//! over the valid tokens and normalises (`single_vector_pool_strategy`
//! `mean`; another is refused by name), as its published
//! `get_single_vector_embeddings` does; `dimensions` must be one of
//! `matryoshka_dims`; text gets the task's prompt prefix (api/embeddings.rs).
//!
//! Refused by name (the model is listed as unavailable, with the reason):
//! several pooling modes at once (concatenated outputs), weighted-mean
//! pooling, and modules other than Transformer, Pooling and Normalize (a
//! Dense projection would change the vectors).
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Model types that are encoders (embedders even without sentence-transformers files).
pub const ENCODER_TYPES: [&str; 3] = ["bert", "roberta", "xlm-roberta"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the valid tokens.
    Mean,
    /// The first token's state ([CLS]).
    Cls,
    /// Element-wise max over the valid tokens.
    Max,
    /// The last valid token's state (decoder embedders).
    LastToken,
    /// Sum over the valid tokens divided by sqrt(count).
    MeanSqrtLen,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::LastToken => "lasttoken",
            Pooling::MeanSqrtLen => "mean_sqrt_len_tokens",
        }
    }
}

/// Everything that makes a model an embedder.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedSpec {
    pub pooling: Pooling,
    /// A Normalize module: unit L2 norm.
    pub normalize: bool,
    /// sentence_bert_config.json's `max_seq_length`: inputs are truncated
    /// to it (with the model's own limit as a cap).
    pub max_seq_length: Option<usize>,
    /// `dimensions` a request may ask for: Some(n) when
    /// config_sentence_transformers.json has `truncate_dim` n (a
    /// Matryoshka-trained model): any 1..=n. None: only the full size.
    pub truncate_dim: Option<usize>,
    /// Whether the settings came from sentence-transformers files.
    pub from_files: bool,
    /// Tokens one input may hold: `max_seq_length` capped by the model's
    /// positions (config.json's `max_position_embeddings`, less RoBERTa's
    /// `pad_token_id + 1` offset), 512 when neither is given.
    pub max_tokens: usize,
    /// A multi-task embedder's tasks, prompts and Matryoshka sizes.
    pub tasks: Option<EmbedTasks>,
}

/// What a multi-task embedder (jina-embeddings-v4) declares. The published
/// definition (modeling_jina_embeddings_v4.py) prefixes text with
/// `"Query: "` or `"Passage: "` by `prompt_name` (query by default), except
/// under `text-matching`, a symmetric task, where both get `"Query: "`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedTasks {
    /// config.json's `task_names`: an index is the adapters' task index.
    pub names: Vec<String>,
    /// The task of a request that names none: `retrieval` when listed, else the first.
    pub default: usize,
    /// `dimensions` a request may ask for (config.json's `matryoshka_dims`).
    pub dims: Vec<usize>,
    /// config.json's `truncate_dim`: the size of a request without `dimensions`.
    pub default_dims: Option<usize>,
    /// config.json's (`vision_start_token_id`, `vision_end_token_id`): an
    /// image document pools over the span from the one to the other,
    /// inclusive (engine/embed_image.rs). None: the model takes no images.
    pub vision: Option<(u32, u32)>,
}

impl EmbedTasks {
    /// Prompt names and their prefixes, as the published definition has them.
    pub const PROMPTS: [(&'static str, &'static str); 2] = [("query", "Query: "), ("passage", "Passage: ")];
    /// Tasks whose passages are embedded as queries.
    pub const SYMMETRIC: [&'static str; 1] = ["text-matching"];

    /// The task index of `name`.
    pub fn task(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The prefix of `prompt_name` under task `task` (None: an unknown prompt name).
    pub fn prefix(&self, task: usize, prompt_name: &str) -> Option<&'static str> {
        let pn = if Self::SYMMETRIC.contains(&self.names[task].as_str()) { "query" } else { prompt_name };
        Self::PROMPTS.iter().find(|(n, _)| *n == prompt_name).and(Self::PROMPTS.iter().find(|(n, _)| *n == pn)).map(|(_, p)| *p)
    }

    /// The task settings of config.json, when it declares `task_names` and
    /// the directory has `adapters/adapter_config.json`.
    fn detect(dir: &Path, config: &Value) -> Result<Option<Self>> {
        let Some(names) = config.get("task_names") else {
            return Ok(None);
        };
        if !dir.join("adapters").join("adapter_config.json").is_file() {
            return Ok(None);
        }
        let names: Vec<String> = names
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .filter(|v: &Vec<String>| !v.is_empty())
            .ok_or_else(|| anyhow!("config.json: `task_names` must be a non-empty list of strings"))?;
        if let Some(p) = config.get("single_vector_pool_strategy").and_then(Value::as_str).filter(|p| *p != "mean") {
            bail!("config.json: single_vector_pool_strategy `{p}` is not supported (mean is)");
        }
        let hidden = config
            .get("hidden_size")
            .or_else(|| config.get("text_config").and_then(|t| t.get("hidden_size")))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let mut dims: Vec<usize> = match config.get("matryoshka_dims") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => v
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).map(|n| n as usize).collect())
                .ok_or_else(|| anyhow!("config.json: `matryoshka_dims` must be a list of sizes"))?,
        };
        if let Some(h) = hidden {
            if let Some(bad) = dims.iter().find(|&&d| d == 0 || d > h) {
                bail!("config.json: matryoshka_dims holds {bad}, outside 1..={h}");
            }
            if !dims.contains(&h) {
                dims.push(h);
            }
        }
        dims.sort_unstable();
        let default_dims = config.get("truncate_dim").and_then(Value::as_u64).map(|n| n as usize);
        if let Some(d) = default_dims.filter(|d| !dims.contains(d)) {
            bail!("config.json: truncate_dim {d} is not one of matryoshka_dims {dims:?}");
        }
        let default = names.iter().position(|n| n == "retrieval").unwrap_or(0);
        let id = |k: &str| config.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok());
        let vision = match (config.get("vision_config"), id("vision_start_token_id"), id("vision_end_token_id")) {
            (Some(Value::Object(_)), Some(s), Some(e)) => Some((s, e)),
            _ => None,
        };
        Ok(Some(Self { names, default, dims, default_dims, vision }))
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))
}

impl EmbedSpec {
    /// The embedding settings of the model in `dir` (its config.json says
    /// `model_type`); None when it is not an embedder.
    pub fn detect(dir: &Path, model_type: &str, config: &Value) -> Result<Option<Self>> {
        let encoder = ENCODER_TYPES.contains(&model_type);
        let max_tokens = max_tokens(dir, model_type, config)?;
        if let Some(tasks) = EmbedTasks::detect(dir, config)? {
            // The published processor truncates text to 32768 tokens.
            return Ok(Some(Self {
                pooling: Pooling::Mean,
                normalize: true,
                max_seq_length: None,
                truncate_dim: None,
                from_files: false,
                max_tokens: max_tokens.min(32768),
                tasks: Some(tasks),
            }));
        }
        let Some(modules) = read_json(&dir.join("modules.json"))? else {
            if !encoder {
                return Ok(None);
            }
            return Ok(Some(Self {
                pooling: Pooling::Mean,
                normalize: false,
                max_seq_length: max_seq_length(dir)?,
                truncate_dim: truncate_dim(dir)?,
                from_files: false,
                max_tokens,
                tasks: None,
            }));
        };
        let list = modules.as_array().ok_or_else(|| anyhow!("modules.json: expected an array of modules"))?;
        let mut pooling = None;
        let mut normalize = false;
        for m in list {
            let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
            let path = m.get("path").and_then(Value::as_str).unwrap_or("");
            match ty.rsplit('.').next().unwrap_or("") {
                "Transformer" => {}
                "Normalize" => normalize = true,
                "Pooling" => {
                    let cfg = read_json(&dir.join(path).join("config.json"))?;
                    pooling = Some(match cfg {
                        Some(c) => pooling_of(&c).with_context(|| format!("{path}/config.json"))?,
                        None if encoder => Pooling::Mean,
                        None => Pooling::LastToken,
                    });
                }
                _ => bail!("modules.json: module `{ty}` is not supported (Transformer, Pooling and Normalize are)"),
            }
        }
        let Some(pooling) = pooling else {
            if encoder {
                bail!("modules.json lists no Pooling module");
            }
            return Ok(None);
        };
        Ok(Some(Self { pooling, normalize, max_seq_length: max_seq_length(dir)?, truncate_dim: truncate_dim(dir)?, from_files: true, max_tokens, tasks: None }))
    }
}

/// The one pooling mode a Pooling module's config.json turns on: the
/// `pooling_mode_*` flags, or the newer single `pooling_mode` string.
fn pooling_of(c: &Value) -> Result<Pooling> {
    if let Some(m) = c.get("pooling_mode").and_then(Value::as_str) {
        return match m {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "max" => Ok(Pooling::Max),
            "lasttoken" => Ok(Pooling::LastToken),
            "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
            other => bail!("pooling_mode `{other}` is not supported (mean, cls, max, lasttoken, mean_sqrt_len_tokens)"),
        };
    }
    let on = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
    if on("pooling_mode_weightedmean_tokens") {
        bail!("pooling_mode_weightedmean_tokens is not supported");
    }
    let modes: Vec<Pooling> = [
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
        ("pooling_mode_lasttoken", Pooling::LastToken),
    ]
    .into_iter()
    .filter(|(k, _)| on(k))
    .map(|(_, p)| p)
    .collect();
    match modes.as_slice() {
        [p] => Ok(*p),
        [] => bail!("no pooling_mode_* flag is on"),
        _ => bail!(
            "several pooling modes are on ({}): concatenated poolings are not supported",
            modes.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn max_seq_length(dir: &Path) -> Result<Option<usize>> {
    let c = read_json(&dir.join("sentence_bert_config.json"))?;
    Ok(c.and_then(|c| c.get("max_seq_length").and_then(Value::as_u64)).map(|n| n as usize).filter(|&n| n > 0))
}

/// `max_seq_length` capped by the positions the model has.
fn max_tokens(dir: &Path, model_type: &str, config: &Value) -> Result<usize> {
    let positions = config
        .get("max_position_embeddings")
        .or_else(|| config.get("text_config").and_then(|t| t.get("max_position_embeddings")))
        .and_then(Value::as_u64)
        .map(|n| {
        let offset = match model_type {
            "roberta" | "xlm-roberta" => config.get("pad_token_id").and_then(Value::as_u64).unwrap_or(1) + 1,
            _ => 0,
        };
        n.saturating_sub(offset) as usize
    });
    Ok(match (max_seq_length(dir)?, positions) {
        (Some(m), Some(p)) => m.min(p),
        (Some(m), None) => m,
        (None, Some(p)) => p,
        (None, None) => 512,
    }
    .max(1))
}

fn truncate_dim(dir: &Path) -> Result<Option<usize>> {
    let c = read_json(&dir.join("config_sentence_transformers.json"))?;
    Ok(c.and_then(|c| c.get("truncate_dim").and_then(Value::as_u64)).map(|n| n as usize).filter(|&n| n > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pooling_flags_and_strings() {
        assert_eq!(pooling_of(&json!({"pooling_mode_mean_tokens": true})).unwrap(), Pooling::Mean);
        assert_eq!(pooling_of(&json!({"pooling_mode_lasttoken": true, "pooling_mode_mean_tokens": false})).unwrap(), Pooling::LastToken);
        assert_eq!(pooling_of(&json!({"pooling_mode": "cls"})).unwrap(), Pooling::Cls);
        let e = pooling_of(&json!({"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true})).unwrap_err();
        assert!(format!("{e}").contains("cls, max"), "{e}");
        assert!(pooling_of(&json!({})).is_err());
        assert!(format!("{}", pooling_of(&json!({"pooling_mode_weightedmean_tokens": true})).unwrap_err()).contains("weightedmean"));
    }

    #[test]
    fn detect_from_files_and_defaults() {
        let d = tempfile::tempdir().unwrap();
        // A bare encoder: mean, not normalised.
        let s = EmbedSpec::detect(d.path(), "bert", &json!({})).unwrap().unwrap();
        assert_eq!((s.pooling, s.normalize, s.from_files), (Pooling::Mean, false, false));
        // A bare decoder is no embedder.
        assert!(EmbedSpec::detect(d.path(), "qwen3", &json!({"max_position_embeddings": 4096})).unwrap().is_none());
        // A decoder with modules.json and no pooling config: last token.
        std::fs::write(
            d.path().join("modules.json"),
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        let s = EmbedSpec::detect(d.path(), "qwen3", &json!({"max_position_embeddings": 4096})).unwrap().unwrap();
        assert_eq!((s.pooling, s.normalize, s.from_files), (Pooling::LastToken, true, true));
        std::fs::create_dir(d.path().join("1_Pooling")).unwrap();
        std::fs::write(d.path().join("1_Pooling/config.json"), r#"{"pooling_mode_cls_token": true}"#).unwrap();
        std::fs::write(d.path().join("sentence_bert_config.json"), r#"{"max_seq_length": 128}"#).unwrap();
        std::fs::write(d.path().join("config_sentence_transformers.json"), r#"{"truncate_dim": 64}"#).unwrap();
        let s = EmbedSpec::detect(d.path(), "bert", &json!({})).unwrap().unwrap();
        assert_eq!((s.pooling, s.max_seq_length, s.truncate_dim, s.max_tokens), (Pooling::Cls, Some(128), Some(64), 128));
        let s = EmbedSpec::detect(d.path(), "roberta", &json!({"max_position_embeddings": 100, "pad_token_id": 1})).unwrap().unwrap();
        assert_eq!(s.max_tokens, 98);
        // A multi-task embedder: config.json's task_names + adapters/.
        let t = tempfile::tempdir().unwrap();
        let cfg = json!({"hidden_size": 32, "max_position_embeddings": 512, "task_names": ["retrieval", "text-matching", "code"], "matryoshka_dims": [8, 16]});
        assert!(EmbedSpec::detect(t.path(), "qwen2_5_vl", &cfg).unwrap().is_none(), "no adapters/: a generator");
        std::fs::create_dir(t.path().join("adapters")).unwrap();
        std::fs::write(t.path().join("adapters/adapter_config.json"), "{}").unwrap();
        let s = EmbedSpec::detect(t.path(), "qwen2_5_vl", &cfg).unwrap().unwrap();
        let k = s.tasks.clone().unwrap();
        assert_eq!((s.pooling, s.normalize, s.max_tokens), (Pooling::Mean, true, 512));
        assert_eq!((k.default, k.dims.clone(), k.task("code")), (0, vec![8, 16, 32], Some(2)));
        assert_eq!((k.prefix(0, "passage"), k.prefix(1, "passage"), k.prefix(2, "query"), k.prefix(0, "doc")), (Some("Passage: "), Some("Query: "), Some("Query: "), None));
        let bad = json!({"hidden_size": 32, "task_names": ["a"], "single_vector_pool_strategy": "cls"});
        assert!(format!("{}", EmbedSpec::detect(t.path(), "qwen2_5_vl", &bad).unwrap_err()).contains("single_vector_pool_strategy"));
        // A Dense module is refused by name.
        std::fs::write(d.path().join("modules.json"), r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#).unwrap();
        let e = EmbedSpec::detect(d.path(), "bert", &json!({})).unwrap_err();
        assert!(format!("{e}").contains("sentence_transformers.models.Dense"), "{e}");
    }
}
