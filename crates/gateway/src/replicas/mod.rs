//! State shared between replicas through Redis (`--state redis://…`): one per-client quota
//! for every replica ([`quota`]), and every stream's events, so a resume that lands on another
//! replica continues the stream ([`streams`]).
//!
//! Redis is an optional backend: the default (`--state memory`) keeps everything in-process.
//! When Redis does not answer, this replica carries on with its own state — its own quotas, and
//! resume only of the streams it runs — with a warning in the log (once per outage), the gauge
//! `streamgate_state_backend_up` at 0 and `streamgate_state_errors_total` counting; a probe
//! every second notices when Redis is back. Nothing here fails a request.
//!
//! One multiplexed connection (redis' `ConnectionManager`, which reconnects by itself) carries
//! every short command; a reader following a stream on another replica has its own connection
//! for its blocking `XREAD`.

pub mod backend;
pub mod quota;
pub mod streams;

pub use backend::{Replicas, SharedStateConfig, StateBackend};
