//! streamgate's HTTP gateway: actix-web routes that turn the inference crate's token streams into
//! server-sent events. It depends on inference only through the `Generator` trait.
//!
//! Layers, each importing only the ones below it (`make lint` checks there is no import cycle):
//! - [`app`] builds the application; [`server`] runs it;
//! - [`protocols`] (native, OpenAI, AI SDK wire formats) and [`routes`] (page, docs, metrics,
//!   models, health) are the handlers;
//! - [`generation`] validates a request once and streams or collects it; [`state`] is what
//!   handlers share;
//! - [`replicas`] shares quotas and streams between replicas through Redis (optional);
//! - [`streams`] keeps this replica's resumable streams; [`sse`] turns a token stream into a
//!   replayable log of events in any format; [`http`] is the middleware and
//!   the one path table; [`metrics`], [`model_registry`], [`settings`], [`logging`];
//! - [`error`], the leaf.
//!
//! A request reads top to bottom: [`http::request_log`], [`http::cors`] and [`http::rate_limit`]
//! middleware → a protocol handler (wire types) → [`generation`] (validation, stream slot) →
//! `Generator::generate` → [`sse`] (events, `[DONE]`, keep-alive).

pub mod app;
pub mod error;
pub mod generation;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model_registry;
pub mod protocols;
pub mod replicas;
pub mod routes;
pub mod server;
pub mod settings;
pub mod sse;
pub mod state;
pub mod streams;

pub use app::create_app;
pub use error::ApiError;
pub use settings::Settings;
pub use state::AppState;
