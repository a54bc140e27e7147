//! Grammars for each [`ConstraintSpec`]: JSON via llguidance's JSON-schema compiler, regex
//! and Lark as given, and tool calls as Lark grammars wrapping each format's markers around
//! `%json` schemas of the allowed tools' arguments.

use anyhow::{bail, Result};
use llguidance::api::TopLevelGrammar;
use serde_json::{json, Map, Value};

use super::ConstraintSpec;
use crate::api::tools::{tool_schemas, ToolFormat};
use crate::model::tokenizer::Tokenizer;

/// rmlx's JSON layout: `{"a": 1, "b": [2, 3]}`, one space after each `:` and `,` and no
/// other whitespace, so a weak model cannot spend its tokens on spaces and newlines
/// (llguidance's default allows any run). These override a caller's `x-guidance`.
fn layout() -> Map<String, Value> {
    let v = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    v.as_object().unwrap().clone()
}

/// `schema` with rmlx's JSON options under `x-guidance` (other options a caller set there
/// are kept).
fn with_options(schema: &Value, lenient: bool) -> Value {
    let mut s = match schema {
        Value::Object(m) => m.clone(),
        Value::Bool(true) => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("allOf".into(), json!([other]));
            m
        }
    };
    let mut opts = match s.remove("x-guidance") {
        Some(Value::Object(m)) => m,
        _ => {
            let mut m = Map::new();
            m.insert("lenient".into(), json!(lenient));
            m
        }
    };
    opts.remove("whitespace_pattern");
    opts.extend(layout());
    s.insert("x-guidance".into(), Value::Object(opts));
    Value::Object(s)
}

/// Every format's own terminators (see [`closers`]).
pub(super) const ALL_CLOSERS: [&str; 8] =
    ["\n</parameter>\n", "<escape>", "<|\"|>", "</function>", "\n</tool_call>", "\n```", "<tool_call|>", "<end_function_call>"];

/// Texts that end the free-text parts and the call of a tool-call format, for the closing
/// plan (tried before JSON punctuation).
pub(super) fn closers(format: ToolFormat) -> Vec<&'static str> {
    match format {
        ToolFormat::Qwen3Coder => vec!["\n</parameter>\n", "</function>", "\n</tool_call>"],
        ToolFormat::FunctionGemma => vec!["<escape>", "<end_function_call>"],
        ToolFormat::Gemma4 => vec!["<|\"|>", "<tool_call|>"],
        ToolFormat::GemmaToolCode => vec!["\n```"],
        ToolFormat::Hermes => vec!["\n</tool_call>"],
        _ => Vec::new(),
    }
}

pub(super) fn top_level(spec: &ConstraintSpec, tok: &Tokenizer) -> Result<TopLevelGrammar> {
    Ok(match spec {
        ConstraintSpec::JsonObject => {
            TopLevelGrammar::from_json_schema(with_options(&json!({"type": "object"}), false))
        }
        ConstraintSpec::JsonSchema { schema, strict } => {
            if !schema.is_object() && !schema.is_boolean() {
                bail!("a JSON schema must be an object");
            }
            TopLevelGrammar::from_json_schema(with_options(schema, !strict))
        }
        ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
        ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        ConstraintSpec::ToolCall {
            format,
            tools,
            name,
            parallel,
        } => TopLevelGrammar::from_lark(lark_for_tool_call(
            tok,
            *format,
            tools,
            name.as_deref(),
            *parallel,
        )?),
    })
}

/// A marker in Lark: a special token by id when the tokenizer has it as one (then it can
/// only be produced as that token), else a string literal.
fn marker(tok: &Tokenizer, s: &str) -> String {
    match tok.token_to_id(s) {
        Some(id) if tok.is_special(id) => format!("<[{id}]>"),
        _ => lit(s),
    }
}

fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn inline_json(schema: &Value) -> String {
    format!("%json {}", with_options(schema, true))
}

/// The properties of a parameters schema in order, with whether each is required.
fn properties(params: &Value) -> Vec<(String, Value, bool)> {
    let req: Vec<&str> = params
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    params
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone(), req.contains(&k.as_str())))
                .collect()
        })
        .unwrap_or_default()
}

fn is_string_schema(s: &Value) -> bool {
    match s.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(_) => false,
        None => s.get("enum").is_none() && s.get("const").is_none(),
    }
}

/// Rules for a separated list of properties in schema order, where optional ones may be
/// left out: returns the name of the rule matching the whole list (possibly empty).
/// `items[i]` is the rule body of item i.
fn separated(
    rules: &mut Vec<String>,
    prefix: &str,
    items: &[(String, bool)],
    sep: &str,
) -> String {
    let n = items.len();
    if n == 0 {
        return String::new();
    }
    // tail_i: items i.. each preceded by the separator.
    for i in (1..n).rev() {
        let (body, req) = &items[i];
        let next = if i + 1 < n {
            format!(" {prefix}_t{}", i + 1)
        } else {
            String::new()
        };
        let piece = format!("{sep} {body}");
        let rule = if *req {
            format!("{prefix}_t{i}: {piece}{next}")
        } else if next.is_empty() {
            format!("{prefix}_t{i}: ({piece})?")
        } else {
            format!("{prefix}_t{i}: ({piece})?{next}")
        };
        rules.push(rule);
    }
    // head_i: the first item present among i.., then the tail.
    for i in (0..n).rev() {
        let (body, req) = &items[i];
        let tail = if i + 1 < n {
            format!(" {prefix}_t{}", i + 1)
        } else {
            String::new()
        };
        let rule = if *req || i + 1 == n {
            format!("{prefix}_h{i}: {body}{tail}")
        } else {
            format!("{prefix}_h{i}: {body}{tail} | {prefix}_h{}", i + 1)
        };
        rules.push(rule);
    }
    let any_req = items.iter().any(|(_, r)| *r);
    if any_req {
        format!("{prefix}_h0")
    } else {
        format!("{prefix}_h0?")
    }
}

/// The Lark grammar that forces a tool call in `format` to one of `tools` (or to `name`).
pub fn lark_for_tool_call(
    tok: &Tokenizer,
    format: ToolFormat,
    tools: &Value,
    name: Option<&str>,
    parallel: bool,
) -> Result<String> {
    let mut tools = tool_schemas(tools);
    if let Some(n) = name {
        tools.retain(|(t, _)| t == n);
        if tools.is_empty() {
            bail!("tool_choice names `{n}`, which is not among the tools");
        }
    }
    if tools.is_empty() {
        bail!("no tools to call");
    }
    let mut rules: Vec<String> = Vec::new();
    // One alternative per tool: `c{i}`.
    let mut alts = Vec::new();
    let call_obj = |name: &str, params: &Value, args_key: &str| {
        json!({
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": false
        })
    };
    let (start, sep) = match format {
        ToolFormat::Hermes => {
            for (i, (n, p)) in tools.iter().enumerate() {
                rules.push(format!("c{i}: {}", inline_json(&call_obj(n, p, "arguments"))));
                alts.push(format!("c{i}"));
            }
            rules.push(format!(
                "call: {} \"\\n\" ({}) \"\\n\" {}",
                marker(tok, "<tool_call>"),
                alts.join(" | "),
                marker(tok, "</tool_call>")
            ));
            ("call", "\"\\n\"")
        }
        ToolFormat::Qwen3Coder => {
            for (i, (n, p)) in tools.iter().enumerate() {
                let mut items = Vec::new();
                for (j, (k, s, req)) in properties(p).into_iter().enumerate() {
                    let open = lit(&format!("<parameter={k}>\n"));
                    let body = if is_string_schema(&s) {
                        rules.push(format!(
                            "s{i}_{j}[lazy]: /(.|\\n)*\\n<\\/parameter>\\n/"
                        ));
                        format!("{open} s{i}_{j}")
                    } else {
                        format!("{open} {} \"\\n</parameter>\\n\"", inline_json(&s))
                    };
                    items.push((format!("({body})"), req));
                }
                // No separator: each parameter block ends with a newline.
                let args = if items.is_empty() {
                    String::new()
                } else {
                    items
                        .iter()
                        .map(|(b, req)| if *req { b.clone() } else { format!("{b}?") })
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                rules.push(format!(
                    "c{i}: {} {args} \"</function>\"",
                    lit(&format!("<function={n}>\n"))
                ));
                alts.push(format!("c{i}"));
            }
            rules.push(format!(
                "call: {} \"\\n\" ({}) \"\\n\" {}",
                marker(tok, "<tool_call>"),
                alts.join(" | "),
                marker(tok, "</tool_call>")
            ));
            ("call", "\"\\n\"")
        }
        ToolFormat::Llama3Json => {
            let any: Vec<Value> = tools
                .iter()
                .map(|(n, p)| call_obj(n, p, "parameters"))
                .collect();
            rules.push(format!("call: {}", inline_json(&json!({"anyOf": any}))));
            // Llama 3.1 templates allow one call per message.
            return Ok(format!("start: call\n{}\n", rules.join("\n")));
        }
        ToolFormat::MistralV3 => {
            let any: Vec<Value> = tools
                .iter()
                .map(|(n, p)| call_obj(n, p, "arguments"))
                .collect();
            let mut arr = json!({"type": "array", "items": {"anyOf": any}, "minItems": 1});
            if !parallel {
                arr["maxItems"] = json!(1);
            }
            rules.push(format!(
                "call: {} {}",
                marker(tok, "[TOOL_CALLS]"),
                inline_json(&arr)
            ));
            return Ok(format!("start: call\n{}\n", rules.join("\n")));
        }
        ToolFormat::Mistral => {
            for (i, (n, p)) in tools.iter().enumerate() {
                rules.push(format!(
                    "c{i}: {} {} {}",
                    lit(n),
                    marker(tok, "[ARGS]"),
                    inline_json(p)
                ));
                alts.push(format!("c{i}"));
            }
            rules.push(format!(
                "call: {} ({})",
                marker(tok, "[TOOL_CALLS]"),
                alts.join(" | ")
            ));
            ("call", "")
        }
        ToolFormat::GemmaToolCode | ToolFormat::FunctionGemma | ToolFormat::Gemma4 => {
            let (open, close, kv, str_delim) = match format {
                ToolFormat::GemmaToolCode => ("```tool_code\n", "\n```", "=", None),
                ToolFormat::FunctionGemma => (
                    "<start_function_call>",
                    "<end_function_call>",
                    ":",
                    Some("<escape>"),
                ),
                _ => ("<|tool_call>", "<tool_call|>", ":", Some("<|\"|>")),
            };
            for (i, (n, p)) in tools.iter().enumerate() {
                let mut items = Vec::new();
                for (k, s, req) in properties(p) {
                    let value = match str_delim {
                        Some(d) if is_string_schema(&s) => {
                            let d = marker(tok, d);
                            format!("{d} /[^<]*/ {d}")
                        }
                        _ => inline_json(&s),
                    };
                    items.push((format!("({} {value})", lit(&format!("{k}{kv}"))), req));
                }
                let (sep, lp, rp) = if str_delim.is_none() {
                    ("\", \"", "(", ")")
                } else {
                    ("\",\"", "{", "}")
                };
                let args = separated(&mut rules, &format!("a{i}"), &items, sep);
                let head = if str_delim.is_none() {
                    lit(&format!("{n}{lp}"))
                } else {
                    lit(&format!("call:{n}{lp}"))
                };
                rules.push(format!("c{i}: {head} {args} {}", lit(rp)));
                alts.push(format!("c{i}"));
            }
            let sep = if str_delim.is_none() { "\"\\n\"" } else { "" };
            if str_delim.is_none() {
                // Several calls go on separate lines of one block.
                let calls = if parallel {
                    format!("({}) (\"\\n\" ({}))*", alts.join(" | "), alts.join(" | "))
                } else {
                    format!("({})", alts.join(" | "))
                };
                rules.push(format!("call: {} {calls} {}", lit(open), lit(close)));
                return Ok(format!("start: call\n{}\n", rules.join("\n")));
            }
            rules.push(format!(
                "call: {} ({}) {}",
                marker(tok, open),
                alts.join(" | "),
                marker(tok, close)
            ));
            ("call", sep)
        }
    };
    let start = if parallel {
        format!("start: {start} ({sep} {start})*")
    } else {
        format!("start: {start}")
    };
    Ok(format!("{start}\n{}\n", rules.join("\n")))
}
