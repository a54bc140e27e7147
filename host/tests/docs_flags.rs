//! Every flag `rmlx serve --help` lists is documented in docs/CLI.md or
//! docs/SERVER.md (written as `--flag`), so the docs cannot fall behind
//! the command line.
mod common;

use std::collections::BTreeSet;
use std::process::Command;

/// The `--long` flags a `--help` text lists (at the start of a line).
fn help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            // `-p, --prompt-tokens <N>` or `--model <MODEL>`
            let l = l.strip_prefix("-").filter(|r| !r.starts_with('-')).map(|r| r.split_once(", ").map(|x| x.1).unwrap_or(r)).unwrap_or(l);
            let rest = l.strip_prefix("--")?;
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

/// Whether `doc` names `flag` (not as the prefix of a longer flag).
fn documents(doc: &str, flag: &str) -> bool {
    doc.match_indices(flag).any(|(i, _)| {
        !doc[i + flag.len()..].chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[test]
fn every_serve_flag_is_documented() {
    let out = Command::new(common::rmlx_bin()).args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8(out.stdout).unwrap();
    let flags = help_flags(&help);
    // The parse found the flags (guards the test itself).
    for f in ["--model", "--port", "--kv-budget", "--max-running", "--log-format", "--shutdown-timeout"] {
        assert!(flags.contains(f), "{f} not found in serve --help:\n{help}");
    }
    let docs: String = ["docs/CLI.md", "docs/SERVER.md"]
        .iter()
        .map(|p| std::fs::read_to_string(common::repo().join(p)).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<&String> = flags.iter().filter(|f| *f != "--help" && *f != "--version" && !documents(&docs, f)).collect();
    assert!(missing.is_empty(), "`rmlx serve` flags missing from docs/CLI.md and docs/SERVER.md: {missing:?}");
}

#[test]
fn the_flag_parser_reads_help_lines() {
    let help = "Options:\n      --model <MODEL>\n          Model\n  -p, --prompt-tokens <N>\n      --no-prefix-cache\n  -h, --help\n";
    let f = help_flags(help);
    assert_eq!(f.into_iter().collect::<Vec<_>>(), ["--help", "--model", "--no-prefix-cache", "--prompt-tokens"]);
    assert!(documents("use `--kv-budget 4GB`", "--kv-budget"));
    assert!(!documents("use `--kv-budget-x`", "--kv-budget"));
}
