//! Placeholder entry point; the HTTP server arrives with the gateway issue.
fn main() {}
