//! The SSE load generator's parts: a minimal HTTP/1.1 streaming client (`client`), latency
//! statistics (`stats`), the SVG report (`report`) and exact-length prompts (`prompts`). The
//! binaries are `streamgate-bench`, `batching-bench` and `engine-bench`.

pub mod client;
pub mod prompts;
pub mod report;
pub mod stats;
