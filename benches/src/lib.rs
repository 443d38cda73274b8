//! The SSE load generator's parts: a minimal HTTP/1.1 streaming client (`client`), latency
//! statistics (`stats`) and the SVG report (`report`). The binary is `streamgate-bench`.

pub mod client;
pub mod report;
pub mod stats;
