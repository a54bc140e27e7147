//! POST /v1/chat/completions (OpenAI).
use super::errors::{ApiError, OaiResult, OpenAIError};
use super::generation::{self as g, Piece, Splitter};
use super::types::openai::*;
use super::types::{ApiJson, JsonOrStream, Sse};
use super::{State, Tag};
use crate::engine::worker::{FinishReason, ModelEntry, TokenLogprob as EngineLogprob};
use super::images::ImageRef;
use crate::media::ImageSource;
use crate::model::chat_template::RenderOptions;
use poem::web::sse::Event;
use poem_openapi::{types::ToJSON, OpenApi};
use serde_json::{json, Value};
use std::sync::Arc;

pub struct ChatApi(pub State);

#[OpenApi]
impl ChatApi {
    /// Create a chat completion
    ///
    /// OpenAI's chat completions: the conversation goes through the model's
    /// chat template; the answer comes back as one object or, with
    /// `stream: true`, as `chat.completion.chunk` events ending with
    /// `data: [DONE]`. Thinking comes back as `reasoning_content`, tool calls
    /// as `tool_calls`.
    #[oai(path = "/v1/chat/completions", method = "post", operation_id = "createChatCompletion", tag = "Tag::OpenAI")]
    async fn create(&self, body: ApiJson<ChatCompletionRequest>) -> OaiResult<JsonOrStream<ChatCompletion, ChatCompletionChunk>> {
        create(self.0.clone(), body.0).await.map_err(OpenAIError::from)
    }
}

/// What a chat request becomes before it reaches the engine.
pub struct Prepared {
    pub entry: Arc<ModelEntry>,
    pub prompt: Vec<u32>,
    pub splitter: Splitter,
    pub params: crate::engine::worker::GenParams,
    pub hook: Option<Box<dyn crate::engine::worker::LogitsHook>>,
    pub keep_alive: Option<crate::engine::worker::KeepAlive>,
    pub has_tools: bool,
}

/// A message's content for the template: its text, or with images (user
/// turns only; each collected into `images`) the list of parts.
fn content(c: &MessageContent, field: &str, images: Option<&mut Vec<ImageRef>>) -> Result<Value, ApiError> {
    match c {
        MessageContent::Text(s) => Ok(Value::String(s.clone())),
        MessageContent::Parts(parts) => {
            let mut out = super::images::Content::default();
            let mut images = images;
            for (i, p) in parts.iter().enumerate() {
                match p {
                    ContentPart::Text(t) => out.text(&t.text),
                    ContentPart::ImageUrl(img) => {
                        let Some(list) = images.as_deref_mut() else {
                            return Err(ApiError::bad_request(format!("{field}[{i}]"), "images are accepted in user messages only"));
                        };
                        out.image();
                        list.push(ImageRef { part: format!("{field}[{i}]"), source: Ok(ImageSource::from_url(img.image_url.url.clone())) });
                    }
                }
            }
            Ok(out.value())
        }
    }
}

fn content_text(c: &MessageContent, field: &str) -> Result<Value, ApiError> {
    content(c, field, None)
}

/// OpenAI messages -> the JSON the chat template reads; image parts of user
/// messages are collected into `images`, in order.
pub fn template_messages(messages: &[ChatMessage], images: &mut Vec<ImageRef>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let f = format!("messages[{i}].content");
        out.push(match m {
            ChatMessage::System(s) | ChatMessage::Developer(s) => json!({"role": "system", "content": content_text(&s.content, &f)?}),
            ChatMessage::User(u) => json!({"role": "user", "content": content(&u.content, &f, Some(&mut *images))?}),
            ChatMessage::Assistant(a) => {
                let mut v = json!({"role": "assistant", "content": match &a.content { Some(c) => content_text(c, &f)?, None => json!("") }});
                if let Some(calls) = &a.tool_calls {
                    v["tool_calls"] = Value::Array(
                        calls
                            .iter()
                            .map(|c| {
                                let args: Value = serde_json::from_str(&c.function.arguments)
                                    .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
                                json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
                            })
                            .collect(),
                    );
                }
                if let Some(r) = &a.reasoning_content {
                    v["reasoning_content"] = json!(r);
                }
                v
            }
            ChatMessage::Tool(t) => json!({"role": "tool", "content": content_text(&t.content, &f)?, "tool_call_id": t.tool_call_id}),
        });
    }
    Ok(out)
}

/// Renders and tokenizes; returns the prompt ids.
pub fn render_prompt(
    entry: &ModelEntry,
    messages: Vec<Value>,
    tools: Option<Value>,
    kwargs: serde_json::Map<String, Value>,
) -> Result<(Vec<u32>, String), ApiError> {
    let rendered = render_text(entry, messages, tools, kwargs)?;
    tokenize(entry, rendered)
}

/// The chat template's text for `messages`.
pub fn render_text(
    entry: &ModelEntry,
    messages: Vec<Value>,
    tools: Option<Value>,
    kwargs: serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    if text.tokenizer.is_none() {
        return Err(ApiError::bad_request("model", format!("model `{}` has no tokenizer: use /v1/completions with token ids", entry.id)));
    }
    if text.template.is_none() {
        return Err(ApiError::bad_request("model", format!("model `{}` has no chat template: use /v1/completions", entry.id)));
    }
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages", "`messages` must not be empty"));
    }
    let mut opts = RenderOptions::new(true);
    if let Some(t) = tools {
        opts = opts.with_tools(t);
    }
    for (k, v) in kwargs {
        opts = opts.with_kwarg(k, v);
    }
    text.render(&messages, &opts).map_err(|e| ApiError::bad_request("messages", format!("{e:#}")))
}

/// The ids of a rendered prompt (and the text back).
pub fn tokenize(entry: &ModelEntry, rendered: String) -> Result<(Vec<u32>, String), ApiError> {
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref().ok_or_else(|| {
        ApiError::bad_request("model", format!("model `{}` has no tokenizer: use /v1/completions with token ids", entry.id))
    })?;
    let ids = tok.encode(&rendered, false).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok((ids, rendered))
}

fn validate(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n", "only `n: 1` is supported"));
    }
    if let Some(n) = req.top_logprobs {
        if n > 20 {
            return Err(ApiError::bad_request("top_logprobs", "`top_logprobs` must be between 0 and 20"));
        }
        if req.logprobs != Some(true) {
            return Err(ApiError::bad_request("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
        }
    }
    for (name, v) in [("max_tokens", req.max_tokens), ("max_completion_tokens", req.max_completion_tokens)] {
        if v == Some(0) {
            return Err(ApiError::bad_request(name, format!("`{name}` must be at least 1")));
        }
    }
    Ok(())
}

pub async fn prepare(state: &State, req: ChatCompletionRequest) -> Result<(Prepared, ChatCompletionRequest), ApiError> {
    validate(&req)?;
    let stop = super::limits::stops(req.stop.clone().map(StopSpec::into_vec).unwrap_or_default(), super::limits::MAX_STOP, "stop")?;
    let entry = state.generator(&req.model)?;
    let mut images = Vec::new();
    let messages = template_messages(&req.messages, &mut images)?;
    let mode = match &req.tool_choice {
        Some(ToolChoice::Mode(m)) => Some(*m),
        Some(ToolChoice::Named(_)) => Some(ToolChoiceMode::Required),
        None => None,
    };
    let tools_json = match (&req.tools, mode) {
        (Some(t), m) if !t.is_empty() && m != Some(ToolChoiceMode::None) => t.to_json(),
        _ => None,
    };
    if let Some(ToolChoice::Named(n)) = &req.tool_choice {
        let known = req.tools.as_ref().is_some_and(|t| t.iter().any(|t| t.function.name == n.function.name));
        if !known {
            return Err(ApiError::bad_request("tool_choice", format!("`tool_choice` names `{}`, which is not in `tools`", n.function.name)));
        }
    }
    if mode == Some(ToolChoiceMode::Required) && tools_json.is_none() {
        return Err(ApiError::bad_request("tool_choice", "`tool_choice` requires a tool but `tools` is empty"));
    }
    let mut kwargs = serde_json::Map::new();
    if let Some(extra) = &req.chat_template_kwargs {
        for (k, v) in extra {
            kwargs.insert(k.clone(), v.clone());
        }
    }
    if let Some(t) = req.enable_thinking {
        kwargs.insert("enable_thinking".into(), json!(t));
    }
    // Every field is checked before the prompt is rendered and tokenized.
    let sampling = g::sampling(
        state,
        &g::SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            logit_bias: req.logit_bias.clone(),
            seed: req.seed,
            max_temperature: 2.0,
        },
        entry.vocab_size,
    )?;
    let keep_alive = g::keep_alive(&req.keep_alive)?;
    let kv = g::kv_choice(state, &req.kv_cache)?;
    let num_draft_tokens = g::num_draft_tokens(req.num_draft_tokens)?;
    let draft_kind = g::draft_kind(&entry, req.draft_kind.as_deref())?;
    let bytes = messages
        .iter()
        .chain(tools_json.as_ref())
        .chain(kwargs.values())
        .map(super::limits::text_bytes)
        .fold(0usize, usize::saturating_add);
    super::limits::check_prompt_bytes(&entry, bytes, "messages")?;
    // Images: fetched, decoded and preprocessed (400 naming a bad part).
    let loaded = super::images::load(state, &entry, images).await?;
    let e2 = entry.clone();
    let tj = tools_json.clone();
    // Templating, tokenizing and reading the template's source (files) block.
    let (prompt, rendered, media, source) = g::blocking(move || {
        let (ids, rendered, media) = super::images::render(&e2, messages, tj, kwargs, loaded)?;
        Ok((ids, rendered, media, g::template_source(&e2.path)))
    })
    .await?;
    let (max, max_field) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m as usize), "max_completion_tokens"),
        (None, m) => (m.map(|m| m as usize), "max_tokens"),
    };
    let max_tokens = g::budget(&entry, prompt.len(), max, state.opts.default_max_tokens, "messages", max_field)?;
    let mut params = g::gen_params(state, sampling, max_tokens, stop);
    params.kv = kv;
    params.num_draft_tokens = num_draft_tokens;
    params.draft_kind = draft_kind;
    params.media = media;
    if req.logprobs == Some(true) {
        params.logprobs = Some(req.top_logprobs.unwrap_or(0) as usize);
    }
    let has_tools = tools_json.is_some();
    let tool_parser = tools_json.as_ref().map(|t| {
        super::tools::report_unrendered_tools(&source, &entry.id);
        let mut p = super::tools::parser_for_template(&source);
        p.set_tools(t);
        p
    });
    let reasoning = super::reasoning_adapter::splitter(&source, &rendered);
    if has_tools || reasoning.is_some() {
        params.skip_special = false;
    }
    let named = match &req.tool_choice {
        Some(ToolChoice::Named(n)) => Some(n.function.name.clone()),
        _ => None,
    };
    let hook = super::constraint_adapter::hook(
        &entry,
        super::constraint_adapter::HookSpec {
            tools: tools_json.as_ref(),
            mode,
            named: named.as_deref(),
            format: req.response_format.as_ref(),
            thinking_budget: req.thinking_budget,
            template_source: &source,
            rendered_prompt: &rendered,
            parallel_tool_calls: req.parallel_tool_calls,
            max_tokens: params.max_tokens,
        },
    )
    .await?;
    Ok((Prepared { entry, prompt, splitter: Splitter::new(reasoning, tool_parser), params, hook, keep_alive, has_tools }, req))
}

fn logprob_entry(l: &EngineLogprob) -> TokenLogprob {
    TokenLogprob {
        token: l.text.clone(),
        logprob: l.logprob,
        bytes: Some(l.text.as_bytes().to_vec()),
        top_logprobs: l
            .top
            .iter()
            .map(|(_, t, lp)| TopLogprob { token: t.clone(), logprob: *lp, bytes: Some(t.as_bytes().to_vec()) })
            .collect(),
    }
}

pub fn finish_reason(r: FinishReason, tool_calls: bool) -> FinishReasonOai {
    // Cut off by max_tokens: the calls' arguments may be incomplete, so `length`.
    match r {
        FinishReason::Length => FinishReasonOai::Length,
        _ if tool_calls => FinishReasonOai::ToolCalls,
        _ => FinishReasonOai::Stop,
    }
}

fn usage(f: &crate::engine::worker::Finish) -> Usage {
    Usage::new(f.prompt_tokens as u32, f.completion_tokens as u32, f.speculation)
}

async fn create(state: State, req: ChatCompletionRequest) -> Result<JsonOrStream<ChatCompletion, ChatCompletionChunk>, ApiError> {
    let (p, req) = prepare(&state, req).await?;
    let Prepared { entry, prompt, mut splitter, params, hook, keep_alive, .. } = p;
    let want_logprobs = params.logprobs.is_some();
    let run = g::start(&state, entry.clone(), prompt, params, hook, keep_alive)?;
    let id = g::new_id("chatcmpl-");
    let created = g::now();
    let model = entry.id.clone();
    if req.stream == Some(true) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(JsonOrStream::Stream(stream(run, splitter, id, created, model, include_usage, want_logprobs)));
    }
    let c = g::collect(run).await?;
    let mut a = g::Assembled::default();
    for p in splitter.feed(&c.text).into_iter().chain(splitter.finish()) {
        a.push(p);
    }
    let f = c.finish();
    let has_calls = !a.tool_calls.is_empty();
    let message = ResponseMessage {
        role: AssistantRole::Assistant,
        content: if has_calls && a.content.trim().is_empty() { None } else { Some(a.content) },
        reasoning_content: (!a.reasoning.is_empty()).then_some(a.reasoning),
        tool_calls: has_calls.then(|| {
            a.tool_calls
                .into_iter()
                .map(|t| ResponseToolCall {
                    id: t.id,
                    r#type: FunctionType::Function,
                    function: ResponseFunctionCall { name: t.name, arguments: if t.arguments.is_empty() { "{}".into() } else { t.arguments } },
                })
                .collect()
        }),
        refusal: None,
    };
    Ok(JsonOrStream::Json(ChatCompletion {
        id,
        object: ChatCompletionObject::ChatCompletion,
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message,
            logprobs: want_logprobs
                .then(|| ChoiceLogprobs { content: Some(c.logprobs.iter().map(logprob_entry).collect()), refusal: None }),
            finish_reason: finish_reason(f.reason, has_calls),
        }],
        usage: usage(f),
        system_fingerprint: None,
    }))
}

pub fn data(v: &impl ToJSON) -> Event {
    Event::message(v.to_json_string())
}

fn stream(
    mut run: g::Running,
    mut splitter: Splitter,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    want_logprobs: bool,
) -> Sse<ChatCompletionChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: ChatCompletionChunkObject::ChatCompletionChunk,
            created,
            model: model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        let choice = |delta: ChunkDelta, logprobs: Option<ChoiceLogprobs>, finish: Option<FinishReasonOai>| ChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish,
        };
        let first = ChunkDelta { role: Some(AssistantRole::Assistant), content: Some(String::new()), ..Default::default() };
        if tx.send(data(&chunk(vec![choice(first, None, None)], None))).await.is_err() {
            return;
        }
        let mut tool_calls = false;
        let send_pieces = |pieces: Vec<Piece>, logprobs: Option<ChoiceLogprobs>, tool_calls: &mut bool| -> Vec<Event> {
            let mut out = Vec::new();
            let mut lp = logprobs;
            for p in pieces {
                let delta = match p {
                    Piece::Content(t) => ChunkDelta { content: Some(t), ..Default::default() },
                    Piece::Reasoning(t) => ChunkDelta { reasoning_content: Some(t), ..Default::default() },
                    Piece::ToolStart { index, id, name } => {
                        *tool_calls = true;
                        ChunkDelta {
                            tool_calls: Some(vec![DeltaToolCall {
                                index: index as u32,
                                id: Some(id),
                                r#type: Some(FunctionType::Function),
                                function: DeltaFunctionCall { name: Some(name), arguments: Some(String::new()) },
                            }]),
                            ..Default::default()
                        }
                    }
                    Piece::ToolArgs { index, delta } => ChunkDelta {
                        tool_calls: Some(vec![DeltaToolCall {
                            index: index as u32,
                            id: None,
                            r#type: None,
                            function: DeltaFunctionCall { name: None, arguments: Some(delta) },
                        }]),
                        ..Default::default()
                    },
                    Piece::ToolEnd { .. } => continue,
                };
                out.push(data(&chunk(vec![choice(delta, lp.take(), None)], None)));
            }
            if let Some(lp) = lp {
                out.push(data(&chunk(vec![choice(ChunkDelta { content: Some(String::new()), ..Default::default() }, Some(lp), None)], None)));
            }
            out
        };
        let finish = loop {
            let Some(ev) = run.rx.recv().await else {
                break Err(ApiError::internal("the engine dropped the request"));
            };
            let (text, lp) = match ev {
                crate::engine::worker::GenEvent::Started => continue,
                crate::engine::worker::GenEvent::Token { text, logprob, .. } => (text, logprob),
                crate::engine::worker::GenEvent::Text(t) => (t, None),
                crate::engine::worker::GenEvent::Done(f) => break Ok(f),
                crate::engine::worker::GenEvent::Error(e) => break Err(g::worker_error(e)),
            };
            let lp = if want_logprobs { lp.map(|l| ChoiceLogprobs { content: Some(vec![logprob_entry(&l)]), refusal: None }) } else { None };
            let pieces = splitter.feed(&text);
            for e in send_pieces(pieces, lp, &mut tool_calls) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        };
        match finish {
            Ok(f) => {
                for e in send_pieces(splitter.finish(), None, &mut tool_calls) {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                let last = choice(ChunkDelta::default(), None, Some(finish_reason(f.reason, tool_calls)));
                let _ = tx.send(data(&chunk(vec![last], None))).await;
                if include_usage {
                    let _ = tx.send(data(&chunk(vec![], Some(usage(&f))))).await;
                }
            }
            Err(e) => {
                let _ = tx.send(Event::message(e.json().to_string())).await;
            }
        }
        let _ = tx.send(Event::message("[DONE]")).await;
    });
    Sse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
