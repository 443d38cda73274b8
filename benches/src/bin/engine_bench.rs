//! Single-stream engine benchmark: time to first token and decode tokens/s through the real
//! `OnnxEngine` (queue, worker, sampler, detokenizer), greedy, for a given model and prompt.
//! Prints one JSON object per run to stdout (make bench-engine tabulates them beside the Python loop).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use futures_util::StreamExt;
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
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let engine = OnnxEngine::start(&EngineConfig {
        model_dir: args.model.clone(),
        ort_dylib_path: args.ort.clone(),
        intra_threads: args.threads,
        max_active: 1,
        queue_capacity: 1,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut out = std::io::stdout().lock();
    // One warm-up run (ORT allocates its arenas on first use), then the measured ones.
    for run in 0..=args.runs {
        let request = GenerationRequest {
            prompt: args.prompt.clone(),
            max_tokens: args.tokens,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let (ttft, decode_s, tokens) = runtime.block_on(async {
            let started = Instant::now();
            let mut stream = engine.generate(request).await?;
            let (mut first, mut last, mut tokens) = (None, started, 0usize);
            while let Some(event) = stream.next().await {
                if let GenerationEvent::Token { .. } = event? {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    tokens += 1;
                }
            }
            let first = first.unwrap_or(last);
            Ok::<_, AnyError>((first - started, (last - first).as_secs_f64(), tokens))
        })?;
        if run == 0 {
            continue;
        }
        let record = serde_json::json!({
            "impl": "rust", "model": args.model.display().to_string(), "run": run,
            "ttft_ms": ttft.as_secs_f64() * 1e3, "tokens": tokens,
            "decode_tok_s": if decode_s > 0.0 { (tokens - 1) as f64 / decode_s } else { 0.0 },
        });
        writeln!(out, "{record}")?;
    }
    Ok(())
}
