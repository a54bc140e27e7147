//! The server-sent events of a streamed message.
use super::{ContentBlock, ErrorBody, Message, StopReason};
use poem_openapi::{Object, Union};

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageStartEvent")]
pub struct MessageStartEvent {
    pub message: Message,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockStartEvent")]
pub struct ContentBlockStartEvent {
    pub index: u32,
    pub content_block: ContentBlock,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicPingEvent")]
pub struct PingEvent {}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicTextDelta")]
pub struct TextDelta {
    pub text: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicThinkingDelta")]
pub struct ThinkingDelta {
    pub thinking: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicSignatureDelta")]
pub struct SignatureDelta {
    pub signature: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicInputJsonDelta")]
pub struct InputJsonDelta {
    pub partial_json: String,
}

#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
#[oai(rename = "AnthropicBlockDelta")]
pub enum BlockDelta {
    #[oai(mapping = "text_delta")]
    Text(TextDelta),
    #[oai(mapping = "thinking_delta")]
    Thinking(ThinkingDelta),
    #[oai(mapping = "signature_delta")]
    Signature(SignatureDelta),
    #[oai(mapping = "input_json_delta")]
    InputJson(InputJsonDelta),
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockDeltaEvent")]
pub struct ContentBlockDeltaEvent {
    pub index: u32,
    pub delta: BlockDelta,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockStopEvent")]
pub struct ContentBlockStopEvent {
    pub index: u32,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaBody")]
pub struct MessageDeltaBody {
    #[oai(nullable)]
    pub stop_reason: Option<StopReason>,
    #[oai(nullable)]
    pub stop_sequence: Option<String>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaUsage")]
pub struct MessageDeltaUsage {
    pub output_tokens: u32,
    #[oai(nullable)]
    pub input_tokens: Option<u32>,
    /// rmlx extension: draft tokens speculative decoding proposed (only
    /// when the model has a draft model and the request did not turn it off).
    #[oai(skip_serializing_if_is_none)]
    pub drafted_tokens: Option<u32>,
    /// rmlx extension: draft tokens the model kept (at most `drafted_tokens`).
    #[oai(skip_serializing_if_is_none)]
    pub accepted_tokens: Option<u32>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaEvent")]
pub struct MessageDeltaEvent {
    pub delta: MessageDeltaBody,
    pub usage: MessageDeltaUsage,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageStopEvent")]
pub struct MessageStopEvent {}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorEvent")]
pub struct ErrorEvent {
    pub error: ErrorBody,
}

/// One server-sent event of a streamed message: `event: <type>` then
/// `data: {"type": <type>, ...}`. Order: message_start, then per block
/// content_block_start, content_block_delta..., content_block_stop (a ping
/// after the first start), message_delta, message_stop.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
#[oai(rename = "AnthropicStreamEvent")]
pub enum StreamEvent {
    #[oai(mapping = "message_start")]
    MessageStart(MessageStartEvent),
    #[oai(mapping = "content_block_start")]
    ContentBlockStart(ContentBlockStartEvent),
    #[oai(mapping = "ping")]
    Ping(PingEvent),
    #[oai(mapping = "content_block_delta")]
    ContentBlockDelta(ContentBlockDeltaEvent),
    #[oai(mapping = "content_block_stop")]
    ContentBlockStop(ContentBlockStopEvent),
    #[oai(mapping = "message_delta")]
    MessageDelta(MessageDeltaEvent),
    #[oai(mapping = "message_stop")]
    MessageStop(MessageStopEvent),
    #[oai(mapping = "error")]
    Error(ErrorEvent),
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart(_) => "message_start",
            StreamEvent::ContentBlockStart(_) => "content_block_start",
            StreamEvent::Ping(_) => "ping",
            StreamEvent::ContentBlockDelta(_) => "content_block_delta",
            StreamEvent::ContentBlockStop(_) => "content_block_stop",
            StreamEvent::MessageDelta(_) => "message_delta",
            StreamEvent::MessageStop(_) => "message_stop",
            StreamEvent::Error(_) => "error",
        }
    }
}
