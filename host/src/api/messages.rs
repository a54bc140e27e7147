//! POST /v1/messages and POST /v1/messages/count_tokens (Anthropic).
use super::errors::{AnthResult, AnthropicError, ApiError};
use super::generation::{self as g, Piece, Splitter};
use super::types::anthropic::*;
use super::types::openai::{ToolChoiceMode, KeepAliveSpec};
use super::types::{ApiJson, JsonOrStream, Sse};
use super::images::ImageRef;
use super::{State, Tag};
use crate::media::ImageSource;
use crate::engine::worker::{Finish, FinishReason, GenEvent};
use poem::web::sse::Event;
use poem_openapi::{payload::Json, types::ToJSON, OpenApi};
use serde_json::{json, Value};

pub struct MessagesApi(pub State);

#[OpenApi]
impl MessagesApi {
    /// Create a message
    ///
    /// Anthropic's Messages API. With `stream: true` the answer comes as
    /// server-sent events: `message_start`, then per content block
    /// `content_block_start`, `content_block_delta` (`text_delta`,
    /// `thinking_delta`, `input_json_delta`) and `content_block_stop`
    /// (`ping` after the first block starts), then `message_delta` (stop
    /// reason, usage) and `message_stop`.
    #[oai(path = "/v1/messages", method = "post", operation_id = "createMessage", tag = "Tag::Anthropic")]
    async fn create(&self, body: ApiJson<MessagesRequest>) -> AnthResult<JsonOrStream<Message, StreamEvent>> {
        create(self.0.clone(), body.0).await.map_err(AnthropicError::from)
    }

    /// Count tokens in a message
    ///
    /// The number of prompt tokens the same request to /v1/messages would use.
    #[oai(path = "/v1/messages/count_tokens", method = "post", operation_id = "countMessageTokens", tag = "Tag::Anthropic")]
    async fn count_tokens(&self, body: ApiJson<CountTokensRequest>) -> AnthResult<Json<CountTokensResponse>> {
        count(self.0.clone(), body.0).await.map(Json).map_err(AnthropicError::from)
    }
}

fn blocks_text(blocks: &[ContentBlockParam], field: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    for (i, b) in blocks.iter().enumerate() {
        match b {
            ContentBlockParam::Text(t) => out.push_str(&t.text),
            ContentBlockParam::Image(_) => {
                return Err(ApiError::bad_request(format!("{field}[{i}]"), "images are accepted in user turns' content only (not in tool results)"))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Anthropic messages (+ system) -> the JSON the chat template reads; image
/// blocks of user turns are collected into `images`, in order.
fn template_messages(system: &Option<SystemParam>, messages: &[MessageParam], images: &mut Vec<ImageRef>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    match system {
        Some(SystemParam::Text(s)) if !s.is_empty() => out.push(json!({"role": "system", "content": s})),
        Some(SystemParam::Blocks(b)) if !b.is_empty() => {
            let s: String = b.iter().map(|TextBlockParamTyped::Text(t)| t.text.as_str()).collect::<Vec<_>>().join("\n");
            out.push(json!({"role": "system", "content": s}));
        }
        _ => {}
    }
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}].content");
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let blocks = match &m.content {
            MessageContentParam::Text(s) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            MessageContentParam::Blocks(b) => b,
        };
        match m.role {
            Role::User => {
                // tool results become `tool` turns, in order; text and images become a user turn.
                let mut content = super::images::Content::default();
                let mut any = false;
                for (j, b) in blocks.iter().enumerate() {
                    match b {
                        ContentBlockParam::Text(t) => {
                            content.text(&t.text);
                            any |= !t.text.is_empty();
                        }
                        ContentBlockParam::ToolResult(r) => {
                            let content = match &r.content {
                                None => String::new(),
                                Some(ToolResultContent::Text(s)) => s.clone(),
                                Some(ToolResultContent::Blocks(bs)) => blocks_text(bs, &format!("{field}[{j}].content"))?,
                            };
                            out.push(json!({"role": "tool", "content": content, "tool_call_id": super::tools::template_call_id(&r.tool_use_id)}));
                        }
                        ContentBlockParam::Image(img) => {
                            let part = format!("{field}[{j}]");
                            content.image();
                            any = true;
                            images.push(ImageRef { source: ImageSource::from_anthropic(&part, &img.source), part });
                        }
                        _ => {}
                    }
                }
                // A turn with no text and no tool result (empty or thinking
                // blocks only) is an empty user turn, as `"content": ""` is.
                if any || !blocks.iter().any(|b| matches!(b, ContentBlockParam::ToolResult(_))) {
                    out.push(json!({"role": "user", "content": content.value()}));
                }
            }
            Role::Assistant => {
                let mut text = String::new();
                let mut thinking = String::new();
                let mut calls = Vec::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b {
                        ContentBlockParam::Text(t) => text.push_str(&t.text),
                        ContentBlockParam::Thinking(t) => thinking.push_str(&t.thinking),
                        ContentBlockParam::ToolUse(u) => calls.push(json!({
                            "id": super::tools::template_call_id(&u.id), "type": "function", "function": {"name": u.name, "arguments": u.input}
                        })),
                        ContentBlockParam::Image(_) => {
                            return Err(ApiError::bad_request(format!("{field}[{j}]"), "images are accepted in user turns only"))
                        }
                        _ => {}
                    }
                }
                let mut v = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    v["tool_calls"] = Value::Array(calls);
                }
                if !thinking.is_empty() {
                    v["reasoning_content"] = json!(thinking);
                }
                out.push(v);
            }
        }
    }
    Ok(out)
}

fn tools_json(tools: &Option<Vec<Tool>>, choice: &Option<ToolChoice>) -> Option<Value> {
    let t = tools.as_ref().filter(|t| !t.is_empty())?;
    if choice.as_ref().is_some_and(|c| c.r#type == ToolChoiceType::None) {
        return None;
    }
    Some(Value::Array(
        t.iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
            .collect(),
    ))
}

fn kwargs(thinking: &Option<ThinkingConfig>) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    if let Some(t) = thinking {
        m.insert("enable_thinking".into(), json!(t.r#type == ThinkingType::Enabled));
    }
    m
}

async fn count(state: State, req: CountTokensRequest) -> Result<CountTokensResponse, ApiError> {
    let entry = state.generator(&req.model)?;
    let mut images = Vec::new();
    let messages = template_messages(&req.system, &req.messages, &mut images)?;
    let tools = tools_json(&req.tools, &req.tool_choice);
    let kw = kwargs(&req.thinking);
    check_bytes(&entry, &messages, &tools)?;
    // Images count as their placeholder tokens: with a fixed count none is
    // loaded (their sources must parse), else each is loaded to size it.
    let spec = match images.is_empty() {
        true => None,
        false => {
            let spec = super::images::vision(&entry).await?;
            let counts = super::images::counts(&state, &entry, &spec, images).await?;
            Some((spec, counts))
        }
    };
    let n = g::blocking(move || {
        let rendered = super::chat::render_text(&entry, messages, tools, kw)?;
        match &spec {
            Some((spec, counts)) => super::images::count(&entry, &rendered, spec, counts),
            None => Ok(super::chat::tokenize(&entry, rendered)?.0.len()),
        }
    })
    .await?;
    Ok(CountTokensResponse { input_tokens: n as u32 })
}

/// A prompt far over the context is refused before it is rendered.
fn check_bytes(entry: &crate::engine::worker::ModelEntry, messages: &[Value], tools: &Option<Value>) -> Result<(), ApiError> {
    let bytes = messages.iter().chain(tools.as_ref()).map(super::limits::text_bytes).fold(0usize, usize::saturating_add);
    super::limits::check_prompt_bytes(entry, bytes, "messages")
}

fn stop_reason(f: &Finish, tool_calls: bool) -> StopReason {
    match f.reason {
        FinishReason::Length => StopReason::MaxTokens,
        _ if tool_calls => StopReason::ToolUse,
        FinishReason::StopString => StopReason::StopSequence,
        _ => StopReason::EndTurn,
    }
}

fn parse_input(args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(args).unwrap_or_else(|_| json!({}))
}

async fn create(state: State, req: MessagesRequest) -> Result<JsonOrStream<Message, StreamEvent>, ApiError> {
    if req.max_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens", "`max_tokens` must be at least 1"));
    }
    let entry = state.generator(&req.model)?;
    let model_id = entry.id.clone();
    let mut images = Vec::new();
    let messages = template_messages(&req.system, &req.messages, &mut images)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages", "`messages` must not be empty"));
    }
    let tools = tools_json(&req.tools, &req.tool_choice);
    let mode = match req.tool_choice.as_ref().map(|c| c.r#type) {
        Some(ToolChoiceType::Any) | Some(ToolChoiceType::Tool) => Some(ToolChoiceMode::Required),
        Some(ToolChoiceType::None) => Some(ToolChoiceMode::None),
        Some(ToolChoiceType::Auto) => Some(ToolChoiceMode::Auto),
        None => None,
    };
    if let Some(c) = &req.tool_choice {
        if c.r#type == ToolChoiceType::Tool {
            let Some(name) = &c.name else {
                return Err(ApiError::bad_request("tool_choice.name", "`tool_choice` of type `tool` needs `name`"));
            };
            if !req.tools.as_ref().is_some_and(|t| t.iter().any(|t| &t.name == name)) {
                return Err(ApiError::bad_request("tool_choice.name", format!("`tool_choice` names `{name}`, which is not in `tools`")));
            }
        }
    }
    if mode == Some(ToolChoiceMode::Required) && tools.is_none() {
        return Err(ApiError::bad_request("tool_choice", "`tool_choice` requires a tool but `tools` is empty"));
    }
    let kw = kwargs(&req.thinking);
    // Every field is checked before the prompt is rendered and tokenized.
    let stop = super::limits::stops(req.stop_sequences.clone().unwrap_or_default(), super::limits::MAX_STOP_SEQUENCES, "stop_sequences")?;
    let sampling = g::sampling(
        &state,
        &g::SamplingFields { temperature: req.temperature, top_p: req.top_p, top_k: req.top_k, seed: req.seed, max_temperature: 1.0, ..Default::default() },
        entry.vocab_size,
    )?;
    let ka: Option<KeepAliveSpec> = req.keep_alive.clone();
    let keep_alive = g::keep_alive(&ka)?;
    let kv = g::kv_choice(&state, &req.kv_cache)?;
    let num_draft_tokens = g::num_draft_tokens(req.num_draft_tokens)?;
    let draft_kind = g::draft_kind(&entry, req.draft_kind.as_deref())?;
    check_bytes(&entry, &messages, &tools)?;
    // Images: fetched, decoded and preprocessed (400 naming a bad block).
    let loaded = super::images::load(&state, &entry, images).await?;
    let (e2, t2) = (entry.clone(), tools.clone());
    // Templating, tokenizing and reading the template's source (files) block.
    let (prompt, rendered, media, source) = g::blocking(move || {
        let (ids, rendered, media) = super::images::render(&e2, messages, t2, kw, loaded)?;
        Ok((ids, rendered, media, g::template_source(&e2.path)))
    })
    .await?;
    let max_tokens = g::budget(&entry, prompt.len(), Some(req.max_tokens as usize), req.max_tokens as usize, "messages", "max_tokens")?;
    let mut params = g::gen_params(&state, sampling, max_tokens, stop);
    params.kv = kv;
    params.num_draft_tokens = num_draft_tokens;
    params.draft_kind = draft_kind;
    params.media = media;
    let tool_parser = tools.as_ref().map(|t| {
        super::tools::report_unrendered_tools(&source, &entry.id);
        let mut p = super::tools::with_anthropic_ids(super::tools::parser_for_template(&source));
        p.set_tools(t);
        p
    });
    let reasoning = super::reasoning_adapter::splitter(&source, &rendered);
    if tool_parser.is_some() || reasoning.is_some() {
        params.skip_special = false;
    }
    let named = req.tool_choice.as_ref().and_then(|c| c.name.clone());
    let budget = req.thinking.as_ref().filter(|t| t.r#type == ThinkingType::Enabled).and_then(|t| t.budget_tokens);
    let hook = super::constraint_adapter::hook(
        &entry,
        super::constraint_adapter::HookSpec {
            tools: tools.as_ref(),
            mode,
            named: named.as_deref(),
            format: None,
            thinking_budget: budget,
            template_source: &source,
            rendered_prompt: &rendered,
            parallel_tool_calls: req.tool_choice.as_ref().and_then(|c| c.disable_parallel_tool_use).map(|d| !d),
            max_tokens: params.max_tokens,
        },
    )
    .await?;
    let prompt_len = prompt.len();
    let run = g::start(&state, entry, prompt, params, hook, keep_alive)?;
    let splitter = Splitter::new(reasoning, tool_parser);
    let id = g::new_id("msg_");
    if req.stream == Some(true) {
        return Ok(JsonOrStream::Stream(stream(run, splitter, id, model_id, prompt_len)));
    }
    let mut splitter = splitter;
    let c = g::collect(run).await?;
    let mut a = g::Assembled::default();
    for p in splitter.feed(&c.text).into_iter().chain(splitter.finish()) {
        a.push(p);
    }
    let f = c.finish();
    let mut content = Vec::new();
    if !a.reasoning.is_empty() {
        content.push(ContentBlock::Thinking(ThinkingBlock { thinking: a.reasoning, signature: String::new() }));
    }
    if !a.content.trim().is_empty() || a.tool_calls.is_empty() {
        let text = if a.tool_calls.is_empty() { a.content } else { a.content.trim().to_string() };
        content.push(ContentBlock::Text(TextBlock { text }));
    }
    let has_calls = !a.tool_calls.is_empty();
    for t in a.tool_calls {
        content.push(ContentBlock::ToolUse(ToolUseBlock { id: t.id, name: t.name, input: parse_input(&t.arguments) }));
    }
    Ok(JsonOrStream::Json(Message {
        id,
        r#type: MessageType::Message,
        role: AssistantRole::Assistant,
        content,
        model: model_id,
        stop_reason: Some(stop_reason(f, has_calls)),
        stop_sequence: f.stop.clone(),
        usage: MessageUsage {
            input_tokens: f.prompt_tokens as u32,
            output_tokens: f.completion_tokens as u32,
            cache_creation_input_tokens: None,
            cache_read_input_tokens: None,
            drafted_tokens: f.speculation.map(|s| s.0 as u32),
            accepted_tokens: f.speculation.map(|s| s.1 as u32),
        },
    }))
}

fn event(e: StreamEvent) -> Event {
    Event::message(e.to_json_string()).event_type(e.name())
}

#[derive(PartialEq, Clone, Copy)]
enum Open {
    None,
    Thinking,
    Text,
    Tool,
}

/// Turns pieces into Anthropic block events.
struct Blocks {
    open: Open,
    index: u32,
    started: bool,
    pinged: bool,
    pending_ws: String,
    tool_calls: bool,
}

impl Blocks {
    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if self.open != Open::None {
            out.push(StreamEvent::ContentBlockStop(ContentBlockStopEvent { index: self.index }));
            self.index += 1;
            self.open = Open::None;
        }
    }
    fn start(&mut self, kind: Open, block: ContentBlock, out: &mut Vec<StreamEvent>) {
        self.close(out);
        out.push(StreamEvent::ContentBlockStart(ContentBlockStartEvent { index: self.index, content_block: block }));
        self.open = kind;
        if !self.pinged {
            out.push(StreamEvent::Ping(PingEvent {}));
            self.pinged = true;
        }
        self.started = true;
    }
    fn delta(&self, d: BlockDelta, out: &mut Vec<StreamEvent>) {
        out.push(StreamEvent::ContentBlockDelta(ContentBlockDeltaEvent { index: self.index, delta: d }));
    }
    fn push(&mut self, p: Piece, out: &mut Vec<StreamEvent>) {
        match p {
            Piece::Reasoning(t) => {
                if self.open != Open::Thinking {
                    self.start(Open::Thinking, ContentBlock::Thinking(ThinkingBlock { thinking: String::new(), signature: String::new() }), out);
                }
                self.delta(BlockDelta::Thinking(ThinkingDelta { thinking: t }), out);
            }
            Piece::Content(t) => {
                if self.open != Open::Text {
                    if t.trim().is_empty() {
                        self.pending_ws.push_str(&t);
                        return;
                    }
                    self.start(Open::Text, ContentBlock::Text(TextBlock { text: String::new() }), out);
                }
                let text = std::mem::take(&mut self.pending_ws) + &t;
                self.delta(BlockDelta::Text(TextDelta { text }), out);
            }
            Piece::ToolStart { id, name, .. } => {
                self.pending_ws.clear();
                self.tool_calls = true;
                self.start(Open::Tool, ContentBlock::ToolUse(ToolUseBlock { id, name, input: json!({}) }), out);
            }
            Piece::ToolArgs { delta, .. } => {
                if self.open == Open::Tool {
                    self.delta(BlockDelta::InputJson(InputJsonDelta { partial_json: delta }), out);
                }
            }
            Piece::ToolEnd { .. } => self.close(out),
        }
    }
}

fn stream(mut run: g::Running, mut splitter: Splitter, id: String, model: String, prompt_len: usize) -> Sse<StreamEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let start = Message {
            id,
            r#type: MessageType::Message,
            role: AssistantRole::Assistant,
            content: vec![],
            model,
            stop_reason: None,
            stop_sequence: None,
            usage: MessageUsage { input_tokens: prompt_len as u32, output_tokens: 0, cache_creation_input_tokens: None, cache_read_input_tokens: None, drafted_tokens: None, accepted_tokens: None },
        };
        if tx.send(event(StreamEvent::MessageStart(MessageStartEvent { message: start }))).await.is_err() {
            return;
        }
        let mut b = Blocks { open: Open::None, index: 0, started: false, pinged: false, pending_ws: String::new(), tool_calls: false };
        let finish = loop {
            let Some(ev) = run.rx.recv().await else { break Err(ApiError::internal("the engine dropped the request")) };
            let text = match ev {
                GenEvent::Started => continue,
                GenEvent::Token { text, .. } => text,
                GenEvent::Text(t) => t,
                GenEvent::Done(f) => break Ok(f),
                GenEvent::Error(e) => break Err(g::worker_error(e)),
            };
            let mut out = Vec::new();
            for p in splitter.feed(&text) {
                b.push(p, &mut out);
            }
            for e in out {
                if tx.send(event(e)).await.is_err() {
                    return;
                }
            }
        };
        let mut out = Vec::new();
        match finish {
            Ok(f) => {
                for p in splitter.finish() {
                    b.push(p, &mut out);
                }
                if !b.started {
                    // An empty answer is still one (empty) text block.
                    b.start(Open::Text, ContentBlock::Text(TextBlock { text: String::new() }), &mut out);
                }
                b.close(&mut out);
                out.push(StreamEvent::MessageDelta(MessageDeltaEvent {
                    delta: MessageDeltaBody { stop_reason: Some(stop_reason(&f, b.tool_calls)), stop_sequence: f.stop.clone() },
                    usage: MessageDeltaUsage {
                        output_tokens: f.completion_tokens as u32,
                        input_tokens: None,
                        drafted_tokens: f.speculation.map(|s| s.0 as u32),
                        accepted_tokens: f.speculation.map(|s| s.1 as u32),
                    },
                }));
                out.push(StreamEvent::MessageStop(MessageStopEvent {}));
            }
            Err(e) => {
                let body = e.flavor(super::types::Flavor::Anthropic).anthropic_body();
                out.push(StreamEvent::Error(ErrorEvent { error: body.error }));
            }
        }
        for e in out {
            if tx.send(event(e)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
