//! Prints what this crate computes for a model and prompt, as JSON, for the reference tests in
//! tests/python/ to compare with ONNX Runtime's Python API, the `tokenizers` Python package and an
//! independent numpy forward pass.
//!
//! Input (stdin, JSON): `{"model": DIR, "ort": LIB, "prompt": TEXT, "steps": N, "texts": [..], "threads": N}`
//! Output (stdout, JSON): `{"prompt_ids", "first_logits", "greedy_ids", "finish_reason", "encodings"}`
//!
//! `first_logits` come from `DecoderModel::forward` on the prompt; `greedy_ids` from the full
//! engine (queue, worker, sampler at temperature 0), i.e. the path the gateway uses.

use std::io::{Read, Write};
use std::path::PathBuf;

use futures_util::StreamExt;
use serde::Deserialize;
use streamgate_inference::model::fused::PoolOptions;
use streamgate_inference::model::{DecoderModel, SessionOptions};
use streamgate_inference::model_files::ModelFiles;
use streamgate_inference::runtime::init_runtime;
use streamgate_inference::tokenizer::TextTokenizer;
use streamgate_inference::{
    EngineConfig, GenerationEvent, GenerationRequest, Generator, OnnxEngine, SamplingParams,
};

#[derive(Deserialize)]
struct Input {
    model: PathBuf,
    ort: PathBuf,
    prompt: String,
    steps: usize,
    #[serde(default)]
    texts: Vec<String>,
    #[serde(default = "one")]
    threads: usize,
}

fn one() -> usize {
    1
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), AnyError> {
    let mut raw = String::new();
    std::io::stdin().read_to_string(&mut raw)?;
    let input: Input = serde_json::from_str(&raw)?;

    let env = init_runtime(&input.ort)?;
    let files = ModelFiles::read(&input.model)?;
    let tokenizer = TextTokenizer::from_file(&files.tokenizer_path)?;
    let prompt_ids = tokenizer.encode(&input.prompt)?;
    let encodings = input.texts.iter().map(|t| tokenizer.encode(t)).collect::<Result<Vec<_>, _>>()?;

    let first_logits = {
        let pool = PoolOptions {
            slots: 1,
            slot_len: prompt_ids.len(),
            prefix_cache_bytes: 0,
            batch_invariant: false,
            mixed_steps: false,
        };
        let options = SessionOptions { intra_threads: input.threads, spinning: true, profile: None, pool };
        let mut model = DecoderModel::load(&env, &files, &options)?;
        let mut cache = model.new_cache()?.ok_or("no free KV slot")?;
        model.prefill(&prompt_ids, &mut cache)?.to_vec()
    };

    let engine = OnnxEngine::start(&EngineConfig {
        intra_threads: input.threads,
        ..EngineConfig::new(input.model.clone(), input.ort.clone())
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (greedy_ids, finish_reason) = runtime.block_on(async {
        let request =
            GenerationRequest::new(input.prompt.clone(), input.steps, SamplingParams::default(), vec![])?;
        let mut stream = engine.generate(request).await?;
        let mut ids = Vec::new();
        let mut reason = None;
        while let Some(event) = stream.next().await {
            match event? {
                GenerationEvent::Token { id, .. } => ids.push(id),
                GenerationEvent::Finished { reason: r, .. } => reason = Some(r.as_str()),
                GenerationEvent::Reasoning { .. } => {} // local models send none
            }
        }
        Ok::<_, AnyError>((ids, reason))
    })?;

    let out = serde_json::json!({
        "prompt_ids": prompt_ids,
        "first_logits": first_logits,
        "greedy_ids": greedy_ids,
        "finish_reason": finish_reason,
        "encodings": encodings,
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(())
}
