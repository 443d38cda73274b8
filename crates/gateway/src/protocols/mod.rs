//! The wire formats, one module each, every one owning its request parsing, its event encoding
//! and its error style: [`native`] (streamgate's own, for `EventSource` and fetch clients),
//! [`openai`] (chat completions), [`completions`] (OpenAI's text completions) and [`ai_sdk`] (the AI SDK's UI message stream, for `useChat`).
//! All of them hand a [`GenerationInput`](crate::generation::GenerationInput) to the generation
//! service; [`wire`] holds what they parse alike.

pub mod ai_sdk;
pub mod completions;
pub mod native;
pub mod openai;
pub mod wire;

use actix_web::web;

/// Register every protocol's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    native::configure(cfg);
    ai_sdk::configure(cfg);
    openai::configure(cfg);
    completions::configure(cfg);
}
