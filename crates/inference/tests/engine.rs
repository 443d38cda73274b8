//! The ONNX engine end to end on the tiny model: real ONNX Runtime, real tokenizer.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{FutureExt, StreamExt};
use streamgate_inference::model::fused::PoolOptions;
use streamgate_inference::model::{DecoderModel, Layout, SessionOptions};
use streamgate_inference::model_files::ModelFiles;
use streamgate_inference::runtime::init_runtime;
use streamgate_inference::tokenizer::TextTokenizer;
use streamgate_inference::{
    EngineConfig, FinishReason, GenerationEvent, Generator, InferenceError, OnnxEngine, SamplingParams,
};

/// A prompt SmolLM2 answers at length under greedy decoding (hundreds of tokens, no early EOS).
/// A raw prompt SmolLM2 continues without end under greedy decoding, in any batch (checked: 600
/// tokens, no EOS): "still running" never depends on how fast the machine decodes. (The chat
/// prompt "Count from 1 to 300" ends after 20 to 120 tokens depending on the batch it ran in.)
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

const PROMPT: &str = "<|im_start|>user\nStreaming tokens to the browser<|im_end|>\n<|im_start|>assistant\n";

fn finished(events: &[GenerationEvent]) -> (FinishReason, usize, usize) {
    match events.last() {
        Some(GenerationEvent::Finished { reason, usage }) => {
            (*reason, usage.prompt_tokens, usage.completion_tokens)
        }
        other => panic!("last event must be Finished, got {other:?}"),
    }
}

/// Decoding from the cache gives the logits of recomputing the whole sequence, for both layouts:
/// the fused one writes each new position into its pool row in place.
fn check_kv_cache_matches_full_recomputation(model_dir: &std::path::Path, layout: Layout) {
    let env = init_runtime(&ort_dylib()).expect("runtime");
    let files = ModelFiles::read(model_dir).expect("files");
    let tok = TextTokenizer::from_file(&files.tokenizer_path).expect("tokenizer");
    let mut ids = tok.encode(PROMPT).expect("encode");
    let pool = PoolOptions {
        slots: 2,
        slot_len: ids.len() + 12,
        prefix_cache_bytes: 0,
        batch_invariant: false,
        mixed_steps: true,
    };
    let options =
        SessionOptions { intra_threads: 1, spinning: false, profile: None, pool, own_attention: true };
    let mut model = DecoderModel::load(&env, &files, &options).expect("model");
    assert_eq!(model.layout(), layout);
    let new_cache = |model: &mut DecoderModel| model.new_cache().expect("cache").expect("a free slot");

    // A prompt run in two chunks leaves the cache and logits of running it at once.
    let mut cache = new_cache(&mut model);
    let whole = model.prefill(&ids, &mut cache).expect("prefill").to_vec();
    model.release(cache, None);
    let mut cache = new_cache(&mut model);
    let half = ids.len() / 2;
    model.prefill(&ids[..half], &mut cache).expect("first chunk");
    let mut logits = model.prefill(&ids[half..], &mut cache).expect("second chunk").to_vec();
    let chunk_diff = whole.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(chunk_diff < 1e-4, "chunked and one-shot prefill differ by {chunk_diff}");
    assert_eq!(cache.len(), ids.len());

    // Incremental: one token per step from the cache.
    for _ in 0..12 {
        let next = streamgate_inference::sampling::argmax(&logits);
        ids.push(next);
        logits = model.decode(&mut [&mut cache], &[next]).expect("decode").to_vec();
        assert_eq!(cache.len(), ids.len());
        // Reference: the whole sequence from scratch, no cache, in the other slot.
        let mut fresh = new_cache(&mut model);
        let full = model.prefill(&ids, &mut fresh).expect("full").to_vec();
        model.release(fresh, None);
        let max_diff = logits.iter().zip(full.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "cached and recomputed logits differ by {max_diff}");
    }
    // A slot never grows past its length: a clear error, not a reallocation.
    if layout == Layout::Fused {
        let err = model.decode(&mut [&mut cache], &[0]).err();
        assert!(err.is_some_and(|e| e.to_string().contains("do not fit")), "a full slot must refuse");
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// A prompt takes staging from another whose prompt is under way (the scheduler runs the shortest
/// first), and one whose prompt has just run is set aside the same way; each gets its positions
/// back and ends with the logits it has alone, across a pool step that writes every idle row.
#[test]
fn prompts_set_aside_for_another_resume_exactly() {
    let env = init_runtime(&ort_dylib()).expect("runtime");
    let files = ModelFiles::read(&tiny_fused_model_dir()).expect("files");
    let tok = TextTokenizer::from_file(&files.tokenizer_path).expect("tokenizer");
    let long = tok.encode(&PROMPT.repeat(4)).expect("encode");
    let short = tok.encode("A short question about streams?").expect("encode");
    // Longer than the long prompt's first half: it overwrites every position set aside.
    let mut other = tok.encode(&"Another request, about something else. ".repeat(8)).expect("encode");
    let half = long.len() / 2;
    other.truncate(half + 4);
    assert!(other.len() > half, "the other prompt must cover the first half");
    let pool = PoolOptions {
        slots: 4,
        slot_len: long.len() + 4,
        prefix_cache_bytes: 0,
        batch_invariant: false,
        mixed_steps: true,
    };
    let options =
        SessionOptions { intra_threads: 1, spinning: false, profile: None, pool, own_attention: true };
    let new_cache = |model: &mut DecoderModel| model.new_cache().expect("cache").expect("a free slot");

    // Alone, in a model of its own (so that nothing it leaves in its buffers can stand in for
    // positions the other one fails to restore): the long prompt in two chunks; the other one; the
    // short one, then one decode step.
    let mut alone = DecoderModel::load(&env, &files, &options).expect("model");
    let mut c = new_cache(&mut alone);
    alone.prefill(&long[..half], &mut c).expect("first half");
    let long_alone = alone.prefill(&long[half..], &mut c).expect("second half").to_vec();
    alone.release(c, None);
    let mut c = new_cache(&mut alone);
    let other_alone = alone.prefill(&other, &mut c).expect("other").to_vec();
    alone.release(c, None);
    let mut c = new_cache(&mut alone);
    let short_alone = alone.prefill(&short, &mut c).expect("short").to_vec();
    let next = streamgate_inference::sampling::argmax(&short_alone);
    let step_alone = alone.decode(&mut [&mut c], &[next]).expect("decode").to_vec();
    drop(alone);
    let mut model = DecoderModel::load(&env, &files, &options).expect("model");

    // Interleaved: the long prompt starts; the other one runs its prompt whole, then two short
    // ones (the first is set aside with its prompt done when the second takes staging); both
    // decode in one pool step; the long prompt resumes.
    let mut a = new_cache(&mut model);
    model.prefill(&long[..half], &mut a).expect("long, first half");
    let mut o = new_cache(&mut model);
    let o_logits = model.prefill(&other, &mut o).expect("other").to_vec();
    assert!(max_diff(&o_logits, &other_alone) < 1e-4);
    model.release(o, None);
    let mut b = new_cache(&mut model);
    let b_logits = model.prefill(&short, &mut b).expect("b's prompt").to_vec();
    let mut c = new_cache(&mut model);
    let c_logits = model.prefill(&short, &mut c).expect("c's prompt").to_vec();
    assert!(max_diff(&b_logits, &short_alone) < 1e-4);
    assert!(max_diff(&c_logits, &short_alone) < 1e-4);
    let both = model.decode(&mut [&mut b, &mut c], &[next, next]).expect("pool step").to_vec();
    let (b_step, c_step) = both.split_at(both.len() / 2);
    assert!(max_diff(b_step, &step_alone) < 1e-4, "b after being set aside");
    assert!(max_diff(c_step, &step_alone) < 1e-4, "c");
    let resumed = model.prefill(&long[half..], &mut a).expect("long, second half").to_vec();
    let diff = max_diff(&resumed, &long_alone);
    assert!(diff < 1e-4, "the resumed prompt's logits differ by {diff}");
    assert_eq!(a.len(), long.len());
}

/// A mixed step (decode rows and a prompt chunk in one pass of model_mixed.onnx) gives every
/// decode row and the chunk the logits they get in passes of their own, with the positions in the
/// right rows: a sequence decoding alone in staging moves to its pool row first, the prompt's two
/// chunks build on each other, and afterwards all of them decode together from the pool.
#[test]
fn a_mixed_step_gives_each_row_and_the_chunk_their_own_logits() {
    let env = init_runtime(&ort_dylib()).expect("runtime");
    let files = ModelFiles::read(&tiny_fused_model_dir()).expect("files");
    assert!(files.mixed_onnx_path.is_some(), "the tiny fused model has its mixed-step graph");
    let tok = TextTokenizer::from_file(&files.tokenizer_path).expect("tokenizer");
    let long = tok.encode(&PROMPT.repeat(3)).expect("encode");
    let short = tok.encode("A short question about streams?").expect("encode");
    let other = tok.encode("Another request, about something else.").expect("encode");
    let half = long.len() / 2;
    let pool = PoolOptions {
        slots: 4,
        slot_len: long.len() + 8,
        prefix_cache_bytes: 0,
        batch_invariant: false,
        mixed_steps: true,
    };
    let options =
        SessionOptions { intra_threads: 1, spinning: false, profile: None, pool, own_attention: true };
    let new_cache = |model: &mut DecoderModel| model.new_cache().expect("cache").expect("a free slot");
    let argmax = streamgate_inference::sampling::argmax;

    // Apart, in a model of its own: b decodes alone for four steps, c runs its prompt and one
    // step, the long prompt runs in two chunks, then the long one and b decode together.
    let mut apart = DecoderModel::load(&env, &files, &options).expect("model");
    let mut b = new_cache(&mut apart);
    let mut tb = vec![argmax(apart.prefill(&short, &mut b).expect("b's prompt"))];
    let mut b_steps = Vec::new();
    for _ in 0..4 {
        let logits = apart.decode(&mut [&mut b], &[*tb.last().unwrap()]).expect("b alone").to_vec();
        tb.push(argmax(&logits));
        b_steps.push(logits);
    }
    let mut c = new_cache(&mut apart);
    let c_prompt = apart.prefill(&other, &mut c).expect("c's prompt").to_vec();
    let tc = argmax(&c_prompt);
    let c_step = apart.decode(&mut [&mut c], &[tc]).expect("c alone").to_vec();
    apart.release(c, None);
    let mut a = new_cache(&mut apart);
    let a_first = apart.prefill(&long[..half], &mut a).expect("first half").to_vec();
    let a_whole = apart.prefill(&long[half..], &mut a).expect("second half").to_vec();
    let ta = argmax(&a_whole);
    let together_apart = apart.decode(&mut [&mut a, &mut b], &[ta, tb[4]]).expect("together").to_vec();
    drop(apart);

    // Mixed (every decoding sequence is in every step, as the scheduler runs them: a pool row
    // left out of a step has its first position overwritten, like any idle row).
    let mut model = DecoderModel::load(&env, &files, &options).expect("model");
    assert!(model.has_mixed_steps());
    let mut b = new_cache(&mut model);
    model.prefill(&short, &mut b).expect("b's prompt");
    let logits = model.decode(&mut [&mut b], &[tb[0]]).expect("b alone, in staging").to_vec();
    assert!(max_diff(&logits, &b_steps[0]) < 1e-4, "b's first step");
    // b leaves staging for its pool row; c's whole prompt runs beside it.
    let mut c = new_cache(&mut model);
    let both = model.mixed_step(&mut [&mut b], &[tb[1]], &other, &mut c).expect("mixed 1").to_vec();
    let (row, chunk) = both.split_at(both.len() / 2);
    assert!(max_diff(row, &b_steps[1]) < 1e-4, "b's row in the first mixed step");
    assert!(max_diff(chunk, &c_prompt) < 1e-4, "c's prompt in the first mixed step");
    // c's prompt has just run in staging: it decodes in the pool beside the long prompt's first chunk.
    let mut a = new_cache(&mut model);
    let three = model
        .mixed_step(&mut [&mut b, &mut c], &[tb[2], tc], &long[..half], &mut a)
        .expect("mixed 2")
        .to_vec();
    let v = three.len() / 3;
    assert!(max_diff(&three[..v], &b_steps[2]) < 1e-4, "b's row in the second mixed step");
    assert!(max_diff(&three[v..2 * v], &c_step) < 1e-4, "c's row in the second mixed step");
    assert!(max_diff(&three[2 * v..], &a_first) < 1e-4, "the long prompt's first chunk");
    // The second chunk builds on the first.
    let tc2 = argmax(&three[v..2 * v]);
    let three = model
        .mixed_step(&mut [&mut b, &mut c], &[tb[3], tc2], &long[half..], &mut a)
        .expect("mixed 3")
        .to_vec();
    assert!(max_diff(&three[..v], &b_steps[3]) < 1e-4, "b's row in the third mixed step");
    assert!(max_diff(&three[2 * v..], &a_whole) < 1e-4, "the long prompt's second chunk");
    assert_eq!((a.len(), b.len(), c.len()), (long.len(), short.len() + 4, other.len() + 2));
    model.release(c, None);
    // The long one leaves staging; both decode from their pool rows.
    let together = model.decode(&mut [&mut a, &mut b], &[ta, tb[4]]).expect("a and b").to_vec();
    assert!(max_diff(&together, &together_apart) < 1e-4, "a and b from their pool rows");
    let err = model.mixed_step(&mut [&mut a], &[0], &[], &mut b).err();
    assert!(err.is_some_and(|e| e.to_string().contains("prompt chunk")), "an empty chunk is refused");
}

/// A short request that arrives while a long prompt is being processed is answered first: its
/// prompt runs ahead of the long one's remaining chunks. On the real model, whose 2,000-token
/// prompt takes seconds (the short one is sent a little after it, so it finds that prompt under
/// way; the order holds however fast the machine is, since the long one needs many chunks).
#[tokio::test]
async fn a_short_request_is_answered_before_a_long_prompt_ahead_of_it() {
    let engine = engine_with(&smollm2_dir(), 2, 4, 64);
    let long = "tokens stream to the browser as they are made ".repeat(200);
    let mut first = engine.generate(request(&long, 4)).await.expect("long");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = engine.generate(request(PROMPT, 4)).await.expect("short");
    let order = tokio::select! {
        biased;
        event = second.next() => { assert!(matches!(event, Some(Ok(GenerationEvent::Token { .. }))), "{event:?}"); "short" }
        event = first.next() => { assert!(matches!(event, Some(Ok(GenerationEvent::Token { .. }))), "{event:?}"); "long" }
    };
    assert_eq!(order, "short", "the short request waited for the long prompt");
    assert!(first.next().now_or_never().is_none(), "the long prompt is still being processed");
    drop((first, second));
}

/// The scheduler's chunked prefill (a chunk per step) generates what one pass over the prompt does.
#[tokio::test]
async fn chunked_prefill_generates_the_same_tokens() {
    for dir in [tiny_model_dir(), tiny_fused_model_dir()] {
        let whole = engine_with(&dir, 1, 4, 512);
        let chunked = engine_with(&dir, 1, 4, 3);
        let a = text_and_ids(&generate(&whole, request(PROMPT, 16)).await);
        let b = text_and_ids(&generate(&chunked, request(PROMPT, 16)).await);
        assert!(!a.1.is_empty());
        assert_eq!(a, b, "{}", dir.display());
    }
}

#[test]
fn kv_cache_matches_full_recomputation_optimum() {
    check_kv_cache_matches_full_recomputation(&tiny_model_dir(), Layout::Optimum);
}

#[test]
fn kv_cache_matches_full_recomputation_fused() {
    check_kv_cache_matches_full_recomputation(&tiny_fused_model_dir(), Layout::Fused);
}

#[tokio::test]
async fn greedy_generation_is_deterministic_and_counts_usage() {
    let engine = tiny_engine(2, 8);
    let a = generate(&engine, request(PROMPT, 24)).await;
    let b = generate(&engine, request(PROMPT, 24)).await;
    assert_eq!(a, b);
    let (reason, prompt_tokens, completion) = finished(&a);
    let token_events = a.iter().filter(|e| matches!(e, GenerationEvent::Token { .. })).count();
    assert!((1..=24).contains(&completion));
    assert_eq!(token_events, completion, "one event per sampled token");
    assert_eq!(
        prompt_tokens,
        TextTokenizer::from_file(&tiny_model_dir().join("tokenizer.json"))
            .unwrap()
            .encode(PROMPT)
            .unwrap()
            .len()
    );
    if reason == FinishReason::Length {
        assert_eq!(completion, 24);
    }
    // Event indices count up from zero.
    for (i, e) in a.iter().filter(|e| matches!(e, GenerationEvent::Token { .. })).enumerate() {
        assert!(matches!(e, GenerationEvent::Token { index, .. } if *index == i));
    }
}

#[tokio::test]
async fn streamed_text_equals_decoding_all_tokens() {
    let engine = tiny_engine(1, 4);
    let tok = TextTokenizer::from_file(&tiny_model_dir().join("tokenizer.json")).unwrap();
    let sampling = SamplingParams { temperature: 1.0, seed: Some(5), ..SamplingParams::default() };
    let events = generate(&engine, request_with("Café 中文 🚀", 60, sampling, vec![])).await;
    let (text, ids) = text_and_ids(&events);
    assert_eq!(ids.len(), finished(&events).2, "one Token event per sampled token");
    assert_eq!(text, tok.decode(&ids).unwrap());
}

#[tokio::test]
async fn seeds_reproduce_sampled_text() {
    let engine = tiny_engine(2, 8);
    let seeded = |seed| {
        let sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 40,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        request_with(PROMPT, 20, sampling, vec![])
    };
    let a = text_and_ids(&generate(&engine, seeded(1)).await).1;
    let b = text_and_ids(&generate(&engine, seeded(1)).await).1;
    let c = text_and_ids(&generate(&engine, seeded(2)).await).1;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let engine = tiny_engine(1, 4);
    let events = generate(&engine, request(PROMPT, 3)).await;
    let (reason, _, completion) = finished(&events);
    assert!(completion <= 3);
    assert!(reason == FinishReason::Length && completion == 3 || reason == FinishReason::Stop);
}

#[tokio::test]
async fn stop_sequence_cuts_the_text_before_it() {
    let engine = tiny_engine(1, 4);
    let full = text_and_ids(&generate(&engine, request(PROMPT, 40)).await).0;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "need some text to pick a stop from: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let req = request_with(PROMPT, 40, SamplingParams::default(), vec![stop.clone()]);
    let events = generate(&engine, req).await;
    assert_eq!(text_and_ids(&events).0, expected);
    assert_eq!(finished(&events).0, FinishReason::Stop);
}

#[tokio::test]
async fn prompt_longer_than_context_is_a_typed_error() {
    let engine = tiny_engine(1, 4);
    let long = "token ".repeat(400);
    match engine.generate(request(&long, 4)).await {
        Err(InferenceError::PromptTooLong { prompt_tokens, context_length }) => {
            assert!(prompt_tokens >= context_length);
            assert_eq!(context_length, 256);
        }
        Err(other) => panic!("expected PromptTooLong, got {other}"),
        Ok(_) => panic!("expected PromptTooLong, got a stream"),
    }
    // The engine keeps working after a rejected request.
    assert!(matches!(
        finished(&generate(&engine, request(PROMPT, 2)).await).0,
        FinishReason::Stop | FinishReason::Length
    ));
}

#[tokio::test]
async fn dropping_the_stream_cancels_generation() {
    // Three other generations share each step (this layout runs them one after another), so the
    // one under test gets a token only every fourth forward pass: dropping it after its first
    // token always lands mid-generation.
    let engine = tiny_engine(4, 8);
    let mut ballast = Vec::new();
    for _ in 0..3 {
        ballast.push(engine.generate(request(PROMPT, 250)).await.expect("ballast admitted"));
    }
    let mut stream = engine.generate(request("The quick brown fox", 250)).await.expect("admitted");
    let first = stream.next().await;
    assert!(matches!(first, Some(Ok(GenerationEvent::Token { .. }))));
    drop(stream);
    // Wait (bounded) until the worker has noticed and the ballast has run to its end.
    for _ in 0..500 {
        if engine.stats().active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = engine.stats();
    assert_eq!(stats.active, 0, "{stats:?}");
    assert_eq!(stats.cancelled, 1, "the dropped stream was cancelled: {stats:?}");
    assert_eq!(stats.completed, 3, "only the ballast ran to a finish reason: {stats:?}");
    let tokens = stats.tokens_generated;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(engine.stats().tokens_generated, tokens, "no work continues after cancellation");
    // The ballast streams still hold every event, ending with Finished.
    for stream in ballast {
        assert!(matches!(collect(stream).await.last(), Some(GenerationEvent::Finished { .. })));
    }
}

#[tokio::test]
async fn a_full_queue_fails_fast_with_overloaded() {
    let engine = tiny_engine(1, 2);
    // Submit many requests without awaiting: admission into the bounded queue happens at call time.
    let futures: Vec<_> = (0..12).map(|_| engine.generate(request(PROMPT, 200))).collect();
    let mut overloaded = 0;
    let mut streams = Vec::new();
    for f in futures {
        match f.await {
            Ok(stream) => streams.push(stream),
            Err(InferenceError::Overloaded { capacity }) => {
                assert_eq!(capacity, 2);
                overloaded += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(overloaded >= 1, "a 1-slot engine with a 2-deep queue must refuse some of 12 requests");
    assert!(!streams.is_empty());
    // Everything admitted still completes.
    for stream in streams {
        let events = collect(stream).await;
        assert!(matches!(events.last(), Some(GenerationEvent::Finished { .. })));
    }
}

#[tokio::test]
async fn concurrent_streams_interleave_round_robin() {
    // With two slots, B's first token is produced while A is still generating; a FIFO worker
    // would only start B after A's last token. Streams are drained alternately, in one task.
    let engine = tiny_engine(2, 8);
    let mut a = engine.generate(request(PROMPT, 120)).await.expect("a");
    let mut b = engine.generate(request(PROMPT, 120)).await.expect("b");
    let mut order = Vec::new();
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            biased;
            Some(e) = a.next(), if !a_done => {
                a_done = matches!(e, Ok(GenerationEvent::Finished { .. }));
                order.push(('a', a_done, engine.stats().completed));
            }
            Some(e) = b.next(), if !b_done => {
                b_done = matches!(e, Ok(GenerationEvent::Finished { .. }));
                order.push(('b', b_done, engine.stats().completed));
            }
        }
    }
    let (_, _, completed_when_b_started) = order.iter().find(|(s, ..)| *s == 'b').copied().unwrap();
    assert_eq!(completed_when_b_started, 0, "B's first token came only after A finished: not interleaved");
}

/// Eight different prompts decoded together (one forward pass per step for all of them) give each
/// exactly the tokens it gets alone, in both layouts, and with prompt chunks in mixed steps.
#[tokio::test]
async fn concurrent_prompts_get_exactly_their_solo_tokens() {
    let prompts: Vec<String> = [
        "The quick brown fox",
        "Streaming tokens to the browser",
        "A",
        "Once upon a time, in a land far away, there lived",
        "1 2 3 4 5",
        "<|im_start|>user\nWhat is rust?<|im_end|>\n<|im_start|>assistant\n",
        "server-sent events",
        "Hello hello hello hello",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // The fused layout twice: prompt chunks in passes of their own, and in mixed steps.
    for (dir, mixed) in
        [(tiny_fused_model_dir(), false), (tiny_fused_model_dir(), true), (tiny_model_dir(), false)]
    {
        let solo = engine_with(&dir, 1, 8, 512);
        let mut alone = Vec::new();
        for p in &prompts {
            alone.push(text_and_ids(&generate(&solo, request(p, 24)).await).1);
        }
        let batched = OnnxEngine::start(&EngineConfig { mixed_steps: mixed, ..config_for(&dir, 8, 8, 512) })
            .expect("engine");
        let mut streams = Vec::new();
        for p in &prompts {
            streams.push(batched.generate(request(p, 24)).await.expect("admitted"));
        }
        let together: Vec<_> = futures_util::future::join_all(streams.into_iter().map(collect)).await;
        for (i, events) in together.iter().enumerate() {
            assert_eq!(text_and_ids(events).1, alone[i], "prompt {i} in {}", dir.display());
        }
        let stats = batched.stats();
        if dir == tiny_fused_model_dir() {
            // Batched, not round-robin: round-robin takes one forward pass per token after each
            // prompt's first (sampled from its prefill); batching takes far fewer.
            let round_robin = stats.tokens_generated - prompts.len() as u64;
            assert!(stats.peak_batch_size >= 2, "not batched: {stats:?}");
            assert!(stats.decode_steps * 4 < round_robin * 3, "not batched: {stats:?}");
            assert_eq!(stats.slots, 8);
            // Prompts wait while the first ones decode: with mixed steps they share those passes.
            assert_eq!(stats.mixed_steps > 0, mixed, "mixed steps: {stats:?}");
        }
    }
}

/// A lone stream decodes in the one-row staging buffers; when a second prompt arrives its positions
/// move to its pool row mid-generation, and back to staging when the second one has finished (it
/// asks for fewer tokens). Both still get exactly the tokens they get alone. On the real model with
/// a prompt it continues without end: the first stream still runs when the second arrives however
/// fast the machine is (the tiny model finished its 40 tokens first on a fast CI machine).
#[tokio::test]
async fn a_lone_stream_joined_mid_generation_keeps_its_solo_tokens() {
    let dir = smollm2_dir();
    let (first, second) = (COUNTING, "The quick brown fox");
    let solo = engine_with(&dir, 1, 8, 512);
    let first_alone = text_and_ids(&generate(&solo, request(first, 60)).await).1;
    let second_alone = text_and_ids(&generate(&solo, request(second, 20)).await).1;
    assert_eq!(first_alone.len(), 60, "the first prompt runs to its cap");

    let engine = engine_with(&dir, 4, 8, 512);
    let mut a = engine.generate(request(first, 60)).await.expect("a");
    let mut head = Vec::new();
    for _ in 0..5 {
        head.push(a.next().await.expect("a token").expect("no error"));
    }
    let b = engine.generate(request(second, 20)).await.expect("b");
    let (rest, b_events) = futures_util::future::join(collect(a), collect(b)).await;
    head.extend(rest);
    assert_eq!(text_and_ids(&head).1, first_alone, "the stream that was joined");
    assert_eq!(text_and_ids(&b_events).1, second_alone, "the stream that joined");
    assert!(engine.stats().peak_batch_size >= 2, "they never decoded together: {:?}", engine.stats());
}

/// A client that leaves gives its KV slot to the next queued request at the next step. On the real
/// model (seconds per long generation), so that "A still runs" does not depend on timing.
#[tokio::test]
async fn a_cancelled_sequence_frees_its_slot_for_the_queue() {
    let engine = engine_with(&smollm2_dir(), 2, 8, 512);
    let mut a = engine.generate(request(COUNTING, 250)).await.expect("a");
    let mut b = engine.generate(request(COUNTING, 250)).await.expect("b");
    assert!(matches!(a.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    assert!(matches!(b.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    // Both slots are taken: C waits in the queue.
    let mut c = engine.generate(request("server-sent events", 4)).await.expect("c queued");
    drop(b);
    // C's first token comes while A still runs: B's slot went to C, not to A's end.
    assert!(matches!(c.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    let stats = engine.stats();
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    assert_eq!(stats.completed, 0, "A still runs: {stats:?}");
    drop(a);
    assert!(matches!(collect(c).await.last(), Some(GenerationEvent::Finished { .. })));
}

/// The second turn of a conversation starts from the first turn's cached positions and generates
/// exactly what recomputing the whole prompt generates.
#[tokio::test]
async fn a_conversations_next_turn_reuses_its_prefix_exactly() {
    let dir = tiny_fused_model_dir();
    let cached = engine_with(&dir, 2, 4, 512);
    let first = text_and_ids(&generate(&cached, request(PROMPT, 20)).await).0;
    let second_turn =
        format!("{PROMPT}{first}<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n");
    let reused = text_and_ids(&generate(&cached, request(&second_turn, 20)).await);
    let stats = cached.stats();
    assert_eq!(stats.prefix_hits, 1, "{stats:?}");
    assert!(stats.prefix_tokens_reused >= 16, "{stats:?}");

    let uncached = OnnxEngine::start(&EngineConfig { prefix_cache_mb: 0, ..config_for(&dir, 2, 4, 512) })
        .expect("engine");
    let recomputed = text_and_ids(&generate(&uncached, request(&second_turn, 20)).await);
    assert_eq!(uncached.stats().prefix_hits, 0);
    assert!(!reused.1.is_empty());
    assert_eq!(reused, recomputed, "reusing the prefix changed the output");
}

/// While a long prompt is processed, a running stream keeps getting tokens: the prompt runs in
/// chunks paced to the decode step, not in one pass. On the real model, counted by the engine, so
/// the running stream is certainly decoding while the prompt is admitted.
#[tokio::test]
async fn a_long_prompt_does_not_stall_running_streams() {
    let engine = engine_with(&smollm2_dir(), 2, 4, 512);
    let mut running = engine.generate(request(COUNTING, 1000)).await.expect("running");
    assert!(matches!(running.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    let long = "tokens stream to the browser as they are made ".repeat(20);
    let before = engine.stats().tokens_generated;
    // Long enough that the newcomer cannot finish either before the stats are read (with 2
    // tokens it sometimes did, on a fast machine).
    let mut newcomer = engine.generate(request(&long, 200)).await.expect("newcomer");
    assert!(matches!(newcomer.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    let stats = engine.stats();
    // All but the newcomer's own first token came from the running stream while the prompt ran
    // (in one pass it would have been at most one).
    let during = stats.tokens_generated - before - 1;
    assert!(
        during >= 4,
        "the running stream got {during} tokens while a 200-token prompt was processed: {stats:?}"
    );
    assert_eq!(stats.completed, 0, "the running stream was still running: {stats:?}");
    drop((running, newcomer));
}

/// A prompt's positions are reusable as soon as it has run: a request that arrives with the same
/// long start while the first still generates copies it, and generates what it would alone.
#[tokio::test]
async fn concurrent_requests_share_a_long_common_prefix() {
    let dir = tiny_fused_model_dir();
    let shared = "You are a careful assistant for a streaming gateway. ".repeat(6);
    let first = format!("{shared}Tell me about tokens.");
    let second = format!("{shared}Tell me about browsers.");
    let engine = engine_with(&dir, 2, 4, 512);
    let mut a = engine.generate(request(&first, 200)).await.expect("a");
    let b = engine.generate(request(&second, 12)).await.expect("b");
    assert!(matches!(a.next().await, Some(Ok(GenerationEvent::Token { .. }))));
    let with_reuse = text_and_ids(&collect(b).await);
    let stats = engine.stats();
    assert_eq!(stats.prefix_hits, 1, "{stats:?}");
    assert!(stats.prefix_tokens_reused >= 40, "{stats:?}");
    drop(a);

    let uncached = OnnxEngine::start(&EngineConfig { prefix_cache_mb: 0, ..config_for(&dir, 2, 4, 512) })
        .expect("engine");
    let alone = text_and_ids(&generate(&uncached, request(&second, 12)).await);
    assert!(!alone.1.is_empty());
    assert_eq!(with_reuse, alone, "the shared prefix changed the output");
}

#[tokio::test]
async fn shutdown_waits_for_the_sessions_to_close_and_the_ort_profile_is_written() {
    let dir = std::env::temp_dir().join(format!("streamgate-ort-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let engine = OnnxEngine::start(&EngineConfig {
        ort_profile: Some(dir.join("tiny")),
        ..config_for(&tiny_fused_model_dir(), 1, 1, streamgate_inference::DEFAULT_PREFILL_CHUNK)
    })
    .unwrap();
    let (_, ids) = text_and_ids(&generate(&engine, request(PROMPT, 3)).await);
    assert!(!ids.is_empty());
    engine.shutdown();
    // ONNX Runtime writes the trace's closing bracket when the session closes: a profile read
    // before that is not JSON.
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let nodes = trace.as_array().unwrap().iter().filter(|e| e["cat"] == "Node").count();
    assert!(nodes > 0, "no node events in {}", files[0].display());
    std::fs::remove_dir_all(&dir).unwrap();
}
