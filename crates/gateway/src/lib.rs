//! streamgate's HTTP gateway: actix-web routes that turn the inference crate's token streams into
//! server-sent events. It depends on inference only through the `Generator` trait.
//!
//! A request reads top to bottom: [`request_log`], [`cors`] and [`rate_limit`] middleware → [`routes`] (wire types,
//! validation) → [`sse`] (events, `[DONE]`, keep-alive) → `Generator::generate`.

pub mod app;
pub mod client_identity;
pub mod cors;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod model_registry;
pub mod rate_limit;
pub mod request_log;
pub mod routes;
pub mod server;
pub mod settings;
pub mod sse;

pub use app::{AppState, create_app};
pub use error::ApiError;
pub use settings::Settings;
