//! Adapts `api::reasoning` (thinking vs answer) to the splitter the routes use.
use super::generation::ReasoningSplit;

/// A thinking splitter when the chat template thinks (`<think>`), unless
/// thinking is turned off.
pub fn splitter(_template_source: &str, _enable_thinking: Option<bool>) -> Option<Box<dyn ReasoningSplit>> {
    None
}
