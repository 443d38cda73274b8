//! streamgate's attention kernel (`model::attention`) against ONNX Runtime's `GroupQueryAttention`:
//! one node (models/fixtures/attention, the fused graph's attributes) run by both on the same
//! inputs, and which kernel each kind of model folder ends up on. The model's quality with our
//! kernel is the quality gate's business (tests/python/test_quality.py runs it through the engine).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;
use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::{Tensor, TensorRefMut};
use streamgate_inference::model::fused::PoolOptions;
use streamgate_inference::model::{DecoderModel, SessionOptions, attention};
use streamgate_inference::model_files::ModelFiles;
use streamgate_inference::runtime::init_runtime;

const HEADS: usize = 6;
const KV_HEADS: usize = 2;
const HD: usize = 64;
const MAX_LEN: usize = 1100;

/// Deterministic values in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// One run of the node: `past` rows' cached lengths before it, `seq` new positions each.
struct Case {
    past: Vec<usize>,
    seq: usize,
}

/// (output, present key, present value) of one run, the caches bound as both past and present.
fn run(own: bool, case: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let env = init_runtime(&ort_dylib()).expect("runtime");
    let mut builder = Session::builder(&env).unwrap();
    if own {
        builder = builder.with_operators(attention::domain().unwrap()).unwrap();
    }
    let mut session =
        builder.commit_from_file(repo_root().join("models/fixtures/attention/model.onnx")).unwrap();
    let rows = case.past.len();
    let width = (HEADS + 2 * KV_HEADS) * HD;
    // Rotary tables as the model builder writes them (base 10000).
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..MAX_LEN {
        for i in 0..HD / 2 {
            let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / HD as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let query = Tensor::from_array(([rows, case.seq, width], noise(1, rows * case.seq * width))).unwrap();
    let cache_shape = [rows, KV_HEADS, MAX_LEN, HD];
    let cache_len = rows * KV_HEADS * MAX_LEN * HD;
    // The cache holds arbitrary values past each row's length: neither kernel may read them.
    let mut keys = Tensor::from_array((cache_shape, noise(2, cache_len))).unwrap();
    let mut values = Tensor::from_array((cache_shape, noise(3, cache_len))).unwrap();
    let seqlens: Vec<i32> = case.past.iter().map(|&p| (p + case.seq - 1) as i32).collect();
    let total = case.past.iter().max().unwrap() + case.seq;
    let mut binding = session.create_binding().unwrap();
    binding.bind_input("query", &query).unwrap();
    binding.bind_input("past_key", &keys).unwrap();
    binding.bind_input("past_value", &values).unwrap();
    binding.bind_input("seqlens_k", &Tensor::from_array(([rows], seqlens)).unwrap()).unwrap();
    binding
        .bind_input("total_sequence_length", &Tensor::from_array(((), vec![total as i32])).unwrap())
        .unwrap();
    binding.bind_input("cos_cache", &Tensor::from_array(([MAX_LEN, HD / 2], cos)).unwrap()).unwrap();
    binding.bind_input("sin_cache", &Tensor::from_array(([MAX_LEN, HD / 2], sin)).unwrap()).unwrap();
    let key_view = TensorRefMut::from_array_view_mut((cache_shape, keys.extract_tensor_mut().1)).unwrap();
    binding.bind_output("present_key", key_view).unwrap();
    let value_view = TensorRefMut::from_array_view_mut((cache_shape, values.extract_tensor_mut().1)).unwrap();
    binding.bind_output("present_value", value_view).unwrap();
    binding.bind_output_to_device("output", &MemoryInfo::default()).unwrap();
    let mut outputs = session.run_binding(&binding).unwrap();
    let output = outputs.remove("output").unwrap();
    let output = output.try_extract_tensor::<f32>().unwrap().1.to_vec();
    drop(outputs);
    drop(binding);
    // Only the rows' valid positions: the rest of the buffer is each kernel's own business.
    let valid = |cache: &Tensor<f32>| {
        let data = cache.extract_tensor().1;
        let mut out = Vec::new();
        for (row, past) in case.past.iter().enumerate() {
            for head in 0..KV_HEADS {
                let base = (row * KV_HEADS + head) * MAX_LEN * HD;
                out.extend_from_slice(&data[base..base + (past + case.seq) * HD]);
            }
        }
        out
    };
    (output, valid(&keys), valid(&values))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn our_kernel_computes_onnx_runtimes_attention() {
    let cases = [
        // A decode step of three rows: one position (an idle pool row), a short one, and one past
        // the kernel's 512-position span (split between threads, merged by softmax maxima).
        Case { past: vec![0, 37, 1050], seq: 1 },
        // A first prompt chunk, then a later one after 700 cached positions (causal within).
        Case { past: vec![0], seq: 45 },
        Case { past: vec![700], seq: 33 },
    ];
    for case in &cases {
        let (ours, our_keys, our_values) = run(true, case);
        let (theirs, their_keys, their_values) = run(false, case);
        let what = format!("rows {:?}, {} new positions", case.past, case.seq);
        let (out, keys, values) = (
            max_diff(&ours, &theirs),
            max_diff(&our_keys, &their_keys),
            max_diff(&our_values, &their_values),
        );
        assert!(out < 2e-5, "{what}: outputs differ by {out}");
        assert!(keys < 1e-6, "{what}: rotated keys differ by {keys}");
        assert_eq!(values, 0.0, "{what}: values are copied as they are");
        assert!(ours.iter().any(|&x| x.abs() > 0.01), "{what}: a zero output compares equal to anything");
    }
}

fn load(dir: &std::path::Path, own_attention: bool) -> DecoderModel {
    let env = init_runtime(&ort_dylib()).expect("runtime");
    let files = ModelFiles::read(dir).expect("files");
    let pool = PoolOptions {
        slots: 1,
        slot_len: 64,
        prefix_cache_bytes: 0,
        batch_invariant: false,
        mixed_steps: false,
    };
    let options = SessionOptions { intra_threads: 1, spinning: false, profile: None, pool, own_attention };
    DecoderModel::load(&env, &files, &options).expect("model")
}

#[test]
fn fused_models_run_on_our_kernel_and_others_on_onnx_runtimes() {
    let fused = load(&tiny_fused_model_dir(), true);
    assert_eq!(fused.attention(), attention::Simd::detected().label());
    assert_eq!(load(&tiny_fused_model_dir(), false).attention(), "onnxruntime");
    // An Optimum export has no GroupQueryAttention, and our domain would hide the com.microsoft
    // ops ONNX Runtime's optimizer adds to it: it loads on ONNX Runtime's kernels alone.
    assert_eq!(load(&tiny_model_dir(), true).attention(), "onnxruntime");
}
