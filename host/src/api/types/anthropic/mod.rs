//! Anthropic's Messages API shapes, field for field (requests also derive
//! `Deserialize`, for errors that name the failing field).
mod content;
mod errors;
mod request;
mod response;
mod stream;

pub use content::*;
pub use errors::*;
pub use request::*;
pub use response::*;
pub use stream::*;
