//! OpenAI's request and response shapes (chat completions, completions,
//! models, errors), field for field. Requests derive both `Object` (the
//! schema) and `Deserialize` (parsing with the failing field's path); rmlx
//! extensions are marked as such.
mod chat;
mod completions;
mod errors;
mod messages;
mod models;
mod response_format;
mod shared;
mod tools;

pub use chat::*;
pub use completions::*;
pub use errors::*;
pub use messages::*;
pub use models::*;
pub use response_format::*;
pub use shared::*;
pub use tools::*;
