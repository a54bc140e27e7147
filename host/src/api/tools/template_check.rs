//! Whether a chat template can show the request's tools to the model: it
//! must read the `tools` variable. Many small models' templates (SmolLM2,
//! Gemma 3) never do; their tools are then reported, not silently dropped.

/// Whether `source` (a chat template) references the `tools` variable.
/// Parsed with minijinja where it parses; otherwise (several templates
/// joined, tags minijinja lacks) `tools` as a whole word anywhere counts.
pub fn template_renders_tools(source: &str) -> bool {
    let env = minijinja::Environment::new();
    match env.template_from_str(source) {
        Ok(t) => t.undeclared_variables(false).contains("tools"),
        Err(_) => mentions_word(source, "tools"),
    }
}

fn mentions_word(s: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    s.match_indices(word).any(|(i, _)| !ident(s[..i].chars().next_back()) && !ident(s[i + word.len()..].chars().next()))
}

/// When the template of `model` cannot render tools: a warning in the log,
/// on the request's log line, and in the response's `x-rmlx-warning` header
/// (api/access_log.rs). Tool calls the model makes anyway are still parsed.
pub fn report_unrendered_tools(template_source: &str, model: &str) -> bool {
    if template_renders_tools(template_source) {
        return false;
    }
    crate::api::access_log::warn(format!(
        "tools not shown to the model: the chat template of `{model}` does not render `tools`"
    ));
    true
}
