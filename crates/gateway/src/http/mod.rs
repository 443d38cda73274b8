//! The HTTP layer under every route: who the client is ([`client_identity`]), what it may ask
//! ([`rate_limit`]), which browser origins may call ([`cors`]), one log line per request
//! ([`request_log`]), and the one path table they all read ([`paths`]).
//!
//! Each middleware reads its own `Data<…>` (installed by `create_app`); nothing here imports the
//! application state, a protocol or a route.

pub mod client_identity;
pub mod cors;
pub mod paths;
pub mod rate_limit;
pub mod request_log;
