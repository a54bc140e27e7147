//! `rmlx serve`'s drafters per model (docs/SPECULATIVE.md): each served
//! model may have several, at most one per kind; the first is its default
//! and a request picks another with `draft_kind`. They come from
//!
//! - rmlx.toml's `[[server.models]]`: the keys `draft_model`,
//!   `num_draft_tokens`, `draft_kind` (the first drafter), then the list
//!   `drafters = [{ kind, model, num_draft_tokens }, ...]`;
//! - the flags: `--draft-model [ID=]DIR` and `--draft-kind` (the first
//!   drafter; `--draft-kind mtp` alone applies to the one served model),
//!   then each `--drafter KIND[=DIR]` (the one served model).
//!   `--num-draft-tokens` is every flag drafter's K (and the file's where
//!   it gives none).
//!
//! Flags beat the file: a flag drafter of a kind the file gives the same
//! model takes its place; a kind given twice by one source stops the
//! server at start. Each drafter is checked against its model from the
//! config files now (the models load on demand).
use super::Args;
use crate::config::Settings;
use crate::engine::speculative::serve::{check_at_start, check_distinct, check_head_at_start, DraftSpec};
use crate::engine::speculative::DraftKind;
use crate::engine::worker::ModelCatalog;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// One drafter asked for, before it is matched to its model.
struct Wanted {
    /// The model: by id, by directory (a [[server.models]] entry without
    /// an id), or None for the one served model.
    id: Option<String>,
    dir: Option<PathBuf>,
    /// The drafter's directory (the model's own for `mtp`).
    draft: PathBuf,
    k: Option<usize>,
    kind: Option<String>,
    /// Given by a flag (else by rmlx.toml).
    flag: bool,
}

/// Gives the catalog's models their drafters (module doc); a drafter that
/// does not open, whose vocabulary differs, or that repeats a kind stops
/// the server at start.
pub(super) fn attach(args: &Args, settings: &Settings, catalog: &mut ModelCatalog, reg: &crate::plugins::Registry) -> Result<()> {
    let mut wanted: Vec<Wanted> = Vec::new();
    // Whether a file drafter took `--draft-kind` as its kind.
    let mut kind_used = false;
    for m in &settings.server.models {
        let at = |draft: PathBuf, k: Option<usize>, kind: Option<String>| Wanted { id: m.id.clone(), dir: Some(m.path.clone()), draft, k, kind, flag: false };
        if let Some(d) = &m.draft_model {
            kind_used |= m.draft_kind.is_none() && args.draft_kind.is_some();
            wanted.push(at(d.clone(), m.num_draft_tokens.or(args.num_draft_tokens), m.draft_kind.clone().or(args.draft_kind.clone())));
        } else if let Some(kind) = m.draft_kind.as_ref().filter(|k| *k != "draft") {
            // A drafter head read from the model's own checkpoint (`mtp`).
            wanted.push(at(m.path.clone(), m.num_draft_tokens.or(args.num_draft_tokens), Some(kind.clone())));
        }
        for d in &m.drafters {
            let name = m.id.clone().unwrap_or_else(|| m.path.display().to_string());
            let draft = drafter_dir(&d.kind, d.model.clone(), &m.path, || format!("[[server.models]] `{name}`: a `{}` entry of `drafters` needs `model = \"DIR\"`", d.kind))?;
            wanted.push(at(draft, d.num_draft_tokens.or(args.num_draft_tokens), Some(d.kind.clone())));
        }
    }
    if args.draft_model.is_empty() && !kind_used && args.draft_kind.as_deref().is_some_and(|k| k != "draft") {
        // `--draft-kind mtp` alone: the one served model drafts with its own head.
        match catalog.entries.as_slice() {
            [e] => wanted.push(Wanted { id: Some(e.id.clone()), dir: None, draft: e.path.clone(), k: args.num_draft_tokens, kind: args.draft_kind.clone(), flag: true }),
            _ => bail!("--draft-kind {} without --draft-model: several models are served; set draft_kind per model in rmlx.toml ([[server.models]])", args.draft_kind.as_deref().unwrap_or_default()),
        }
    }
    for d in &args.draft_model {
        let (id, dir) = match d.split_once('=') {
            Some((id, dir)) if !id.is_empty() && !id.contains('/') => (Some(id.to_string()), dir),
            _ => (None, d.as_str()),
        };
        wanted.push(Wanted { id, dir: None, draft: PathBuf::from(dir), k: args.num_draft_tokens, kind: args.draft_kind.clone(), flag: true });
    }
    for d in &args.drafter {
        let (kind, dir) = match d.split_once('=') {
            Some((k, dir)) => (k, Some(PathBuf::from(dir))),
            None => (d.as_str(), None),
        };
        let e = match catalog.entries.as_slice() {
            [e] => e,
            _ => bail!("--drafter {d}: several models are served; list each model's drafters in rmlx.toml ([[server.models]] drafters)"),
        };
        let draft = drafter_dir(kind, dir, &e.path, || format!("--drafter {kind} needs a directory: --drafter {kind}=DIR"))?;
        wanted.push(Wanted { id: Some(e.id.clone()), dir: None, draft, k: args.num_draft_tokens, kind: Some(kind.to_string()), flag: true });
    }
    if wanted.is_empty() {
        if args.num_draft_tokens.is_some() || args.draft_kind.is_some() {
            bail!("--num-draft-tokens and --draft-kind need a drafter: --draft-model DIR, --draft-kind mtp (the model's own head) or --drafter KIND[=DIR]");
        }
        return Ok(());
    }
    // Per catalog entry: (spec, from a flag), in the order given.
    let mut lists: Vec<Vec<(DraftSpec, bool)>> = vec![Vec::new(); catalog.entries.len()];
    for w in wanted {
        let i = match (&w.id, &w.dir) {
            (Some(id), _) => catalog.entries.iter().position(|e| e.id == *id),
            (None, Some(dir)) => catalog.entries.iter().position(|e| same_dir(&e.path, dir)),
            (None, None) if catalog.entries.len() == 1 => Some(0),
            (None, None) => bail!("--draft-model {}: several models are served; name one with --draft-model ID=DIR", w.draft.display()),
        };
        let Some(i) = i else {
            bail!("--draft-model {}: no served model `{}`", w.draft.display(), w.id.unwrap_or_default());
        };
        let draft = match w.draft.to_str() {
            Some(s) => crate::hub::resolve(s)?.path,
            None => w.draft,
        };
        let spec = DraftSpec::new(draft, w.k, w.kind.as_deref())?;
        let entry = &catalog.entries[i];
        check_at_start(&entry.id, &entry.path, &spec)?;
        check_head_at_start(&entry.id, &spec, reg)?;
        let list = &mut lists[i];
        // Flags beat the file: a flag drafter replaces the file's of its kind.
        match list.iter().position(|(s, flag)| s.kind == spec.kind && !flag) {
            Some(j) if w.flag => list[j] = (spec, true),
            _ => list.push((spec, w.flag)),
        }
    }
    for (entry, list) in catalog.entries.iter_mut().zip(lists) {
        if list.is_empty() {
            continue;
        }
        let mut specs: Vec<DraftSpec> = list.into_iter().map(|(s, _)| s).collect();
        check_distinct(&entry.id, &specs)?;
        let id = entry.id.clone();
        let Some(e) = std::sync::Arc::get_mut(entry) else {
            bail!("internal error: the catalog entry of `{id}` is shared before the server starts");
        };
        e.draft = Some(specs.remove(0));
        e.extra_drafters = specs;
    }
    Ok(())
}

/// A drafter's directory: `dir` when given, else the model's own for a
/// head read from the model's checkpoint (`mtp`); the kinds that need one
/// of their own are refused with `missing`'s message (an unknown kind with
/// `DraftKind::parse`'s).
fn drafter_dir(kind: &str, dir: Option<PathBuf>, model: &Path, missing: impl FnOnce() -> String) -> Result<PathBuf> {
    match (DraftKind::parse(kind)?, dir) {
        (_, Some(d)) => Ok(d),
        (DraftKind::Mtp, None) => Ok(model.to_path_buf()),
        (_, None) => bail!("{}", missing()),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
}
