//! Prints what this crate computes for a model and prompt, as JSON, for the reference tests in
//! tests/python/ to compare with ONNX Runtime's Python API, the `tokenizers` Python package and an
//! independent numpy forward pass.
//!
//! Input (stdin, JSON): `{"model": DIR, "ort": LIB, "prompt": TEXT, "steps": N, "texts": [..], "threads": N,
//! "teacher_forced": {"ids": [..], "out": FILE}, "ort_attention": BOOL}` (the last two optional)
//! Output (stdout, JSON): `{"prompt_ids", "first_logits", "greedy_ids", "finish_reason", "encodings",
//! "attention"}`
//!
//! `first_logits` come from `DecoderModel::forward` on the prompt; `greedy_ids` from the full
//! engine (queue, worker, sampler at temperature 0), i.e. the path the gateway uses; an empty
//! prompt skips both. `teacher_forced` feeds `ids` one at a time (the first as a prompt) and writes
//! the logits after each but the last to `out`, `[ids.len() - 1, vocab]` little-endian f32, with the
//! gateway's default attention kernel (`attention` names it). `ort_attention` runs everything on
//! ONNX Runtime's `GroupQueryAttention` kernel instead (`--attention-kernel onnxruntime`): the
//! same arithmetic as ONNX Runtime's Python API, for the tests that compare the two exactly.

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
    teacher_forced: Option<TeacherForced>,
    #[serde(default)]
    ort_attention: bool,
}

#[derive(Deserialize)]
struct TeacherForced {
    ids: Vec<u32>,
    out: PathBuf,
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

    // One sequence's model on its own, `slot_len` positions.
    let load_model = |slot_len: usize| {
        let pool = PoolOptions {
            slots: 1,
            slot_len,
            prefix_cache_bytes: 0,
            batch_invariant: false,
            mixed_steps: false,
        };
        let own_attention = !input.ort_attention;
        let options = SessionOptions {
            intra_threads: input.threads,
            spinning: true,
            profile: None,
            pool,
            own_attention,
        };
        DecoderModel::load(&env, &files, &options)
    };
    let mut attention = None;
    if let Some(tf) = &input.teacher_forced {
        let mut model = load_model(tf.ids.len().max(1))?;
        attention = Some(model.attention());
        let mut cache = model.new_cache()?.ok_or("no free KV slot")?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tf.out)?);
        let rows = tf.ids.len().saturating_sub(1);
        for (i, &id) in tf.ids[..rows].iter().enumerate() {
            let logits = if i == 0 {
                model.prefill(&[id], &mut cache)?
            } else {
                model.decode(&mut [&mut cache], &[id])?
            };
            for x in logits.iter() {
                file.write_all(&x.to_le_bytes())?;
            }
        }
        file.flush()?;
    }
    if prompt_ids.is_empty() {
        let out =
            serde_json::json!({ "prompt_ids": prompt_ids, "encodings": encodings, "attention": attention });
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
        return Ok(());
    }

    let first_logits = {
        let mut model = load_model(prompt_ids.len())?;
        let mut cache = model.new_cache()?.ok_or("no free KV slot")?;
        model.prefill(&prompt_ids, &mut cache)?.to_vec()
    };

    let engine = OnnxEngine::start(&EngineConfig {
        intra_threads: input.threads,
        own_attention: !input.ort_attention,
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
        "attention": attention,
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(())
}
