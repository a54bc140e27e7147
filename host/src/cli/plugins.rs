//! `rmlx plugins`: a table of loaded plugins and what each provides.
use crate::config::Settings;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let dir = settings.plugins_dir();
    let reg = crate::plugins::Registry::load(&dir)?;
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
        println!("{}", serde_json::json!({"dir": dir, "plugins": plugins, "refused": refused}));
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
