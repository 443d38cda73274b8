//! `batching-bench`: what continuous batching does for users of a running gateway on a real model,
//! measured on the wire (native SSE route), in one run, as ratios:
//!
//! 1. aggregate tokens/s of 16 concurrent streams over one stream's tokens/s;
//! 2. p99 inter-token gap at 16 streams over one stream's p99;
//! 3. a running stream's p99 gap while a 2,000-token prompt is admitted over its p99 without it,
//!    and a short request's time to first token when it arrives while that prompt is processed
//!    over its time to first token alone;
//! 4. a conversation's second-turn time to first token over the first turn's (1,000-token prompt).
//!
//! Prints one JSON object (make bench tabulates it in docs/benchmarks.md). Bounded: every stream
//! has a token cap and a deadline; it talks only to the URL it is given.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use streamgate_benches::client::{Route, StreamResult, run_stream};
use streamgate_benches::prompts::{AnyError, long_prompt};
use streamgate_benches::report::{Series, cdf, rate_over_time, render};
use streamgate_benches::stats::Percentiles;

#[derive(Parser)]
struct Args {
    /// Base URL of the gateway, e.g. http://127.0.0.1:18250.
    #[arg(long)]
    url: String,
    /// The served model's folder (its tokenizer cuts the long prompts to length).
    #[arg(long)]
    model: PathBuf,
    /// Text the long prompts are cut from.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value = "v1")]
    version: String,
    /// Concurrent streams in the batched run.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 96)]
    tokens: usize,
    /// Also draw the run: TTFT and gap CDFs, and the running stream's tokens/s while the long
    /// prompt is admitted.
    #[arg(long)]
    svg: Option<PathBuf>,
}

const USER: &str = "<|im_start|>user\n";
const TURN_END: &str = "<|im_end|>\n";
const ASSISTANT: &str = "<|im_start|>assistant\n";

/// How many times the lone stream runs (its tokens/s is their median).
const SOLO_RUNS: usize = 3;

const TOPICS: [&str; 16] = [
    "the sea",
    "a lighthouse keeper",
    "a robot who learns to paint",
    "a city under the ice",
    "the first train to the mountains",
    "a dragon and a baker",
    "a library that never closes",
    "two rivers that meet",
    "a clockmaker's apprentice",
    "the last bookshop in town",
    "a garden on the moon",
    "a ship made of glass",
    "an old map",
    "a violin in the attic",
    "the winter market",
    "a fox who counts stars",
];

fn chat(user: &str) -> String {
    format!("{USER}{user}{TURN_END}{ASSISTANT}")
}

/// Token arrival times (seconds from the run's start) rebuilt from TTFT and the gaps.
fn arrivals(r: &StreamResult) -> Vec<f64> {
    let Some(ttft) = r.ttft_ms else { return Vec::new() };
    let mut t = r.started_s + ttft / 1e3;
    let mut out = vec![t];
    for gap in &r.gaps_ms {
        t += f64::from(*gap) / 1e3;
        out.push(t);
    }
    out
}

struct Client {
    addr: String,
    host: String,
    version: String,
    start: Instant,
}

impl Client {
    async fn stream(&self, prompt: &str, max_tokens: usize) -> StreamResult {
        // Greedy: every stream runs to its token cap instead of stopping at a sampled end of
        // sequence, so tokens/s and gaps compare equal work.
        let request = Route::Native.request(&self.host, &self.version, prompt, max_tokens, Some(0.0), false);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut conn = None;
        // Failed streams are counted in the report's `errors`.
        run_stream(&mut conn, &self.addr, &request, Route::Native, self.start, deadline).await
    }
}

fn gaps(results: &[&StreamResult]) -> Percentiles {
    Percentiles::of(results.iter().flat_map(|r| r.gaps_ms.iter().map(|g| f64::from(*g))).collect())
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let addr = args.url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let client = Client { host: addr.clone(), addr, version: args.version.clone(), start: Instant::now() };
    // Prompts the bundled model answers at length at temperature 0 (each runs to its token cap
    // rather than to an end of sequence, so 1 and 16 streams do equal work per stream; the
    // report's token counts show it).
    let prompts: Vec<String> = (0..args.streams)
        .map(|i| chat(&format!("Write a long story about {}.", TOPICS[i % TOPICS.len()])))
        .collect();
    let (long2000, long2000_tokens) = long_prompt(&args.model, &args.text, 2000)?;
    let (doc1000, doc_tokens) = long_prompt(&args.model, &args.text, 980)?;

    let report = runtime.block_on(async {
        // Warm-up: the first run allocates ONNX Runtime's buffers.
        client.stream(&prompts[0], 8).await;

        // 1-2. One stream alone, then all of them at once.
        // The lone stream runs SOLO_RUNS times, one after another (different prompts, so none
        // starts from the prefix cache): its tokens/s is their median and its gaps are pooled, as
        // one 96-token run swings by a third on a shared machine.
        let mut solos = Vec::new();
        for prompt in prompts.iter().cycle().take(SOLO_RUNS) {
            solos.push(client.stream(prompt, args.tokens).await);
        }
        let mut solo_rates: Vec<f64> = solos.iter().map(|r| r.tokens as f64 / (r.duration_ms / 1e3)).collect();
        solo_rates.sort_by(f64::total_cmp);
        let solo_tok_s = solo_rates[solo_rates.len() / 2];
        let solo_tokens = solos.iter().map(|r| r.tokens).min().unwrap_or(0);
        let solo: Vec<&StreamResult> = solos.iter().collect();
        let began = Instant::now();
        let together = futures_util::future::join_all(prompts.iter().map(|p| client.stream(p, args.tokens))).await;
        let wall = began.elapsed().as_secs_f64();
        let batched_tokens: usize = together.iter().map(|r| r.tokens).sum();
        let batched_tok_s = batched_tokens as f64 / wall;
        let solo_gaps = gaps(&solo);
        let batched_gaps = gaps(&together.iter().collect::<Vec<_>>());

        // 3. A stream running while a 2,000-token prompt is admitted.
        // One stream at a time keeps running (a new one as soon as one ends) until the long
        // prompt's first token; gaps are taken within each stream, never across two.
        let counting = chat("Write a long story about a lighthouse keeper.");
        let admitted = std::sync::atomic::AtomicBool::new(false);
        let running = async {
            let mut runs = Vec::new();
            while !admitted.load(std::sync::atomic::Ordering::SeqCst) {
                runs.push(client.stream(&counting, 1000).await);
            }
            runs
        };
        let newcomer = async {
            tokio::time::sleep(Duration::from_millis(5000)).await;
            let r = client.stream(&long2000, 1).await;
            admitted.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        };
        let (running, newcomer) = tokio::join!(running, newcomer);
        let window = (newcomer.started_s, newcomer.started_s + newcomer.ttft_ms.unwrap_or(0.0) / 1e3);
        let per_stream: Vec<Vec<f64>> = running.iter().map(arrivals).collect();
        let gaps_where = |keep: &dyn Fn(f64) -> bool| -> Vec<f64> {
            per_stream
                .iter()
                .flat_map(|times| times.windows(2).filter(|w| keep(w[1])).map(|w| (w[1] - w[0]) * 1e3))
                .collect()
        };
        let during = gaps_where(&|t| t > window.0 && t <= window.1);
        let before = gaps_where(&|t| t <= window.0);
        let times: Vec<f64> = per_stream.concat();
        let running_tokens: usize = running.iter().map(|r| r.tokens).sum();
        if let Some(path) = &args.svg {
            let ttfts = |rs: &[&StreamResult]| cdf(rs.iter().filter_map(|r| r.ttft_ms).collect());
            let gap_values = |rs: &[&StreamResult]| {
                cdf(rs.iter().flat_map(|r| r.gaps_ms.iter().map(|g| f64::from(*g))).collect())
            };
            let all: Vec<&StreamResult> = together.iter().collect();
            let ttft = [
                Series { label: "1 stream", color: "#1f5fa8", points: ttfts(&solo) },
                Series { label: "16 streams", color: "#b8452b", points: ttfts(&all) },
            ];
            let gap_series = [
                Series { label: "1 stream", color: "#1f5fa8", points: gap_values(&solo) },
                Series { label: "16 streams", color: "#b8452b", points: gap_values(&all) },
                Series { label: "1 stream, 2,000-token prompt admitted", color: "#1f7a3d", points: cdf(during.clone()) },
            ];
            let tput = [Series {
                label: "running stream tokens/s (2,000-token prompt sent at 5 s)",
                color: "#1f7a3d",
                points: rate_over_time(&times.iter().map(|t| t - window.0 + 5.0).collect::<Vec<_>>(), 0.5),
            }];
            let title = "batching-bench: SmolLM2-135M on the gateway";
            std::fs::write(path, render(title, &ttft, &gap_series, &tput))?;
        }
        let during = Percentiles::of(during);
        let before = Percentiles::of(before);

        // 3b. A short request sent 1 s after a 2,000-token prompt (nothing else running): its
        // prompt runs next, not after the long one's remaining chunks. Prompts not seen before
        // (none of them is in the prefix cache): the long one, and two short ones of one shape.
        let short_alone = client.stream(&chat("Name three colors."), 8).await;
        let other_long = format!("Answer in one word.\n\n{long2000}");
        let long_then_short = async {
            let long = client.stream(&other_long, 1);
            let short = async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                client.stream(&chat("Name three animals."), 8).await
            };
            tokio::join!(long, short)
        };
        let (long_alone, short_behind) = long_then_short.await;

        // 4. A conversation: a 1,000-token first turn, then the second turn resends it.
        let turn1 = chat(&format!("Read this and answer briefly.\n\n{doc1000}"));
        let first = client.stream(&turn1, 24).await;
        let turn2 = format!("{turn1}It is about a text.{TURN_END}{}", chat("Say it in five words."));
        let second = client.stream(&turn2, 24).await;
        let ttft1 = first.ttft_ms.unwrap_or(f64::NAN);
        let ttft2 = second.ttft_ms.unwrap_or(f64::NAN);

        Ok::<_, std::io::Error>(json!({
            "streams": args.streams, "tokens_per_stream": args.tokens,
            "solo_runs": SOLO_RUNS, "solo_tokens": solo_tokens, "batched_tokens": batched_tokens,
            "solo_tok_s": solo_tok_s, "batched_tok_s": batched_tok_s,
            "aggregate_ratio": batched_tok_s / solo_tok_s,
            "solo_gap_ms": solo_gaps, "batched_gap_ms": batched_gaps,
            "gap_p99_ratio": batched_gaps.p99 / solo_gaps.p99,
            "admission": {
                "prompt_tokens": long2000_tokens, "newcomer_ttft_ms": newcomer.ttft_ms,
                "gap_before_ms": before, "gap_during_ms": during,
                "running_stream_tokens": running_tokens, "running_streams": running.len(),
                "gap_p99_ratio": during.p99 / before.p99,
            },
            "short_behind_long": {
                "long_ttft_ms": long_alone.ttft_ms, "short_ttft_ms": short_behind.ttft_ms,
                "short_alone_ttft_ms": short_alone.ttft_ms,
                "ratio": short_behind.ttft_ms.unwrap_or(f64::NAN) / short_alone.ttft_ms.unwrap_or(f64::NAN),
            },
            "conversation": {
                "first_turn_doc_tokens": doc_tokens, "ttft_first_ms": ttft1, "ttft_second_ms": ttft2,
                "ratio": ttft2 / ttft1,
            },
            "errors": together.iter().chain(running.iter()).chain(solos.iter()).chain([&newcomer, &long_alone, &short_behind, &short_alone, &first, &second]).filter(|r| r.error.is_some() || !r.done).count(),
        }))
    })?;
    writeln!(std::io::stdout().lock(), "{report}")?;
    Ok(())
}
