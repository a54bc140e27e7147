//! `rmlx plugins`: a table of loaded plugins and what each provides.
use crate::config::Settings;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// Print the supported architectures and formats as a Markdown table
    /// (the README's table is this output).
    #[arg(long)]
    markdown: bool,
}

/// The supported architectures and formats as a Markdown table: one row per
/// architecture, weight format, KV-cache family and drafter a loaded plugin
/// provides, and the checkpoint `quant_method`s they cover.
pub fn markdown_table(reg: &crate::plugins::Registry) -> String {
    // (kind order, kind, key, provided by)
    let mut rows: Vec<(usize, &str, String, String)> = Vec::new();
    for p in &reg.plugins {
        let i = &p.info;
        for (order, (what, keys)) in [
            ("architecture (`model_type`)", &i.architectures),
            ("weight format (quantization `mode`)", &i.weight_quants),
            ("KV-cache family", &i.kv_families),
            ("speculative drafter", &i.drafters),
        ]
        .into_iter()
        .enumerate()
        {
            for k in keys {
                rows.push((order, what, k.clone(), format!("plugin `{}`", i.id)));
            }
        }
    }
    for (method, modes) in crate::model::quant::METHODS {
        if modes.iter().all(|m| reg.weight_quant_plugin(m).is_ok()) {
            let via: Vec<String> = modes.iter().map(|m| format!("`{m}`")).collect();
            rows.push((4, "checkpoint `quant_method`", method.to_string(), format!("host, as {}", via.join(" + "))));
        }
    }
    rows.sort();
    rows.dedup();
    let mut out = String::from("| Kind | Key | Provided by |\n|---|---|---|\n");
    for (_, what, key, by) in rows {
        out.push_str(&format!("| {what} | `{key}` | {by} |\n"));
    }
    out
}

/// Every KV-cache family with its storage bits per cached value (all of its
/// components, scales and norms included) for heads of 64 and 128 dims with
/// float16 activations, as the family's codec declares its slot layout.
fn kv_families(reg: &crate::plugins::Registry) -> Vec<serde_json::Value> {
    use rmlx_plugin_api::author::kv::{Component, LayerDims};
    reg.kv_family_names()
        .into_iter()
        .map(|name| {
            let bits = |head_dim: i32| -> serde_json::Value {
                let dims = LayerDims { kv_heads: 8, head_dim, dtype: mlx_rs::Dtype::Float16 };
                match reg.kv_codec(&name).and_then(|c| Ok(c.try_components(&dims)?)) {
                    Ok(cs) => {
                        let bytes: usize = cs.iter().map(Component::bytes_per_slot).sum();
                        serde_json::json!((bytes * 8) as f64 / (8 * head_dim) as f64)
                    }
                    Err(e) => serde_json::json!(format!("error: {e:#}")),
                }
            };
            serde_json::json!({"name": name, "bits_per_value_d128": bits(128), "bits_per_value_d64": bits(64)})
        })
        .collect()
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let dir = settings.plugins_dir();
    let reg = crate::plugins::Registry::load(&dir)?;
    if args.markdown {
        print!("{}", markdown_table(&reg));
        return Ok(());
    }
    if args.json {
        let refused: Vec<_> = reg
            .refused
            .iter()
            .map(|r| serde_json::json!({"path": r.path, "reason": r.reason}))
            .collect();
        let plugins: Vec<_> = reg
            .plugins
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(&p.info).unwrap_or_default();
                v["path"] = serde_json::json!(p.path);
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"dir": dir, "plugins": plugins, "kv_families": kv_families(&reg), "refused": refused})
        );
        return Ok(());
    }
    println!("plugins in {}", dir.display());
    println!("{:<16} {:<8} {:<14} {}", "ID", "VERSION", "CAPABILITY", "PROVIDES");
    for p in &reg.plugins {
        let i = &p.info;
        for (cap, keys) in [
            ("architecture", &i.architectures),
            ("weight-quant", &i.weight_quants),
            ("kv-cache", &i.kv_families),
            ("drafter", &i.drafters),
        ] {
            if !keys.is_empty() {
                println!("{:<16} {:<8} {:<14} {}", i.id, i.version, cap, keys.join(", "));
            }
        }
    }
    for r in &reg.refused {
        println!("refused {}: {}", r.path.display(), r.reason);
    }
    Ok(())
}
