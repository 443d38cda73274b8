//! Placeholder; the load generator arrives with the benchmarks issue.
fn main() {}
