//! Engine benchmark: time to first token and decode tokens/s through the real
//! `OnnxEngine` (queue, worker, sampler, detokenizer), greedy, for a given model and prompt; with
//! `--long-prompt-file`, also prompt-processing tokens/s and decode tokens/s at that prompt's
//! position (about 2,000 tokens by default), and the process's resident memory; with
//! `--streams N`, also N identical greedy streams at once against a lone one (the engine's
//! batching measured without HTTP or a load generator on the same cores).
//! Prints one JSON object per run to stdout (make bench-engine tabulates them beside llama.cpp
//! and the Python loop).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use futures_util::StreamExt;
use streamgate_benches::prompts::{AnyError, long_prompt};
use streamgate_inference::{
    EngineConfig, GenerationEvent, GenerationRequest, Generator, OnnxEngine, SamplingParams,
};

#[derive(Parser)]
struct Args {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// ONNX Runtime library.
    #[arg(long)]
    ort: PathBuf,
    /// Prompt text (already in the model's prompt format).
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A text whose first `--long-prompt-tokens` tokens (repeated if short) make a long prompt.
    #[arg(long)]
    long_prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    long_prompt_tokens: usize,
    /// KV slots (the gateway's --max-active-sequences); one stream runs either way.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Also run this many identical greedy streams at once (slots grow to match) and report their
    /// aggregate tokens/s beside the run's lone stream, both from submit to last token: the engine's
    /// batching without HTTP or a load generator on the same cores.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// The gateway's --batch-invariant (a lone stream decodes with a padding row).
    #[arg(long)]
    batch_invariant: bool,
    /// Run attention on ONNX Runtime's `GroupQueryAttention` kernel (the gateway's
    /// `--attention-kernel onnxruntime`) instead of streamgate's.
    #[arg(long)]
    ort_attention: bool,
    /// Write ONNX Runtime's per-node profile (Chrome trace JSON) to files named from this prefix
    /// (`benches/python/ort_profile.py` sums it per operator).
    #[arg(long)]
    ort_profile: Option<PathBuf>,
    /// ONNX Runtime's intra-op threads sleep between runs instead of spinning (the gateway's
    /// `--ort-spinning off`).
    #[arg(long)]
    no_spinning: bool,
}

/// The arrival time of each token of one greedy generation of `prompt`.
async fn token_times(engine: &OnnxEngine, prompt: &str, max_tokens: usize) -> Result<Vec<Instant>, AnyError> {
    let request = GenerationRequest::new(prompt, max_tokens, SamplingParams::default(), vec![])?;
    let mut stream = engine.generate(request).await?;
    let mut times = Vec::with_capacity(max_tokens);
    while let Some(event) = stream.next().await {
        if let GenerationEvent::Token { .. } = event? {
            times.push(Instant::now());
        }
    }
    Ok(times)
}

/// `count` events between `from` and `to`, per second (0 for an empty span).
fn rate(count: usize, from: Instant, to: Instant) -> f64 {
    let s = to.saturating_duration_since(from).as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// One greedy generation: (time to first token, decode tokens/s after it, tokens, tokens/s from
/// submit to the last token).
async fn measure(
    engine: &OnnxEngine,
    prompt: &str,
    max_tokens: usize,
) -> Result<(f64, f64, usize, f64), AnyError> {
    let started = Instant::now();
    let times = token_times(engine, prompt, max_tokens).await?;
    let (first, last) = (times.first().copied().unwrap_or(started), times.last().copied().unwrap_or(started));
    let decode = rate(times.len().saturating_sub(1), first, last);
    Ok(((first - started).as_secs_f64(), decode, times.len(), rate(times.len(), started, last)))
}

/// `n` greedy generations of `prompt` at once: (aggregate tokens/s from submit to the last token,
/// aggregate decode tokens/s once every stream has its first token, tokens).
async fn measure_many(
    engine: &OnnxEngine,
    prompt: &str,
    max_tokens: usize,
    n: usize,
) -> Result<(f64, f64, usize), AnyError> {
    let started = Instant::now();
    let all =
        futures_util::future::try_join_all((0..n).map(|_| token_times(engine, prompt, max_tokens))).await?;
    let tokens: usize = all.iter().map(Vec::len).sum();
    let end = all.iter().filter_map(|t| t.last().copied()).max().unwrap_or(started);
    let all_started = all.iter().filter_map(|t| t.first().copied()).max().unwrap_or(end);
    let after = all.iter().flatten().filter(|&&t| t > all_started).count();
    Ok((rate(tokens, started, end), rate(after, all_started, end), tokens))
}

/// Resident and peak resident memory of this process, in MiB (Linux; zeros elsewhere).
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let engine = OnnxEngine::start(&EngineConfig {
        intra_threads: args.threads,
        spinning: !args.no_spinning,
        max_active: args.slots.max(args.streams),
        queue_capacity: args.streams.max(1),
        // Every run repeats the prompt: reuse would measure a copy, not prompt processing.
        prefix_cache_mb: 0,
        batch_invariant: args.batch_invariant,
        ort_profile: args.ort_profile.clone(),
        own_attention: !args.ort_attention,
        ..EngineConfig::new(args.model.clone(), args.ort.clone())
    })?;
    let (loaded_rss, _) = memory_mib();
    let long = match &args.long_prompt_file {
        Some(file) => Some(long_prompt(&args.model, file, args.long_prompt_tokens)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut out = std::io::stdout().lock();
    // One warm-up run (ORT allocates its arenas on first use), then the measured ones.
    runtime.block_on(measure(&engine, &args.prompt, 4))?;
    for run in 1..=args.runs {
        let (ttft, decode, tokens, solo) = runtime.block_on(measure(&engine, &args.prompt, args.tokens))?;
        let mut record = serde_json::json!({
            "impl": "rust", "model": args.model.display().to_string(), "run": run,
            "ttft_ms": ttft * 1e3, "tokens": tokens, "decode_tok_s": decode,
            "slots": args.slots.max(args.streams), "batch_invariant": args.batch_invariant, "spinning": !args.no_spinning,
            "attention": engine.info().attention,
        });
        if args.streams > 1 {
            let (batched, batched_decode, batched_tokens) =
                runtime.block_on(measure_many(&engine, &args.prompt, args.tokens, args.streams))?;
            record["streams"] = args.streams.into();
            record["solo_tok_s"] = solo.into();
            record["batched_tok_s"] = batched.into();
            record["batched_decode_tok_s"] = batched_decode.into();
            record["batched_tokens"] = batched_tokens.into();
            record["aggregate_ratio"] = (if solo > 0.0 { batched / solo } else { 0.0 }).into();
        }
        if let Some((prompt, count)) = &long {
            let (long_ttft, long_decode, _, _) = runtime.block_on(measure(&engine, prompt, 64))?;
            let (rss, peak) = memory_mib();
            record["long_prompt_tokens"] = (*count).into();
            record["prefill_tok_s"] = (*count as f64 / long_ttft).into();
            record["long_decode_tok_s"] = long_decode.into();
            record["rss_loaded_mib"] = loaded_rss.into();
            record["rss_mib"] = rss.into();
            record["rss_peak_mib"] = peak.into();
        }
        writeln!(out, "{record}")?;
    }
    // Waits for the sessions to close, which writes an --ort-profile.
    engine.shutdown();
    Ok(())
}
