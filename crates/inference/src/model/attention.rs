//! Our CPU kernel for the fused graph's `com.microsoft:GroupQueryAttention` nodes, registered on
//! the session in place of ONNX Runtime's own (a custom-op registry is searched before the
//! built-in kernels, so the graph file does not change and stock ONNX Runtime still runs it).
//!
//! It implements exactly the subset the fused graph uses: packed q/k/v, rotary fused in
//! (`do_rotary=1`, interleaved pairs, full head), float32, and the past/present cache in one
//! buffer (`present.*` bound to the `past_key_values.*` buffers: the new positions are written in
//! place). Other attributes fail the session's creation, naming what differs, and the engine then
//! opens the graph on ONNX Runtime's kernels alone; separate key/value inputs or present outputs
//! in buffers of their own fail the run (the fused graph and the engine never have them).
//!
//! Why our own: ONNX Runtime's CPU kernel runs one small GEMM per *query* head, so each key/value
//! head's cache is read once for each of the query heads that share it, and its cost estimate uses
//! the whole buffer length rather than the cached one. Here one unit of work is one key/value
//! head of one sequence over a span of at most [`SPAN`] positions: it reads those keys and values
//! once for all of its query heads (scores, softmax and the weighted sum in one pass over the span,
//! flash-decoding style), and a long cache splits into several spans that run on different threads
//! and are merged by their softmax maxima. A prompt chunk's query positions are units of their
//! own, each over its causal length, taken [`QUERY_BLOCK`] at a time per span so that the span is
//! read from memory once for all of them.
//!
//! The span kernel comes in three builds, chosen at run time ([`Simd`]): AVX-512 (head size 64),
//! AVX2 with FMA, and portable code. The vector builds are safe code compiled for those CPU
//! features; calling them is the workspace's one `unsafe` (in `span_with`, after the CPU was
//! checked). Exact to ONNX Runtime's kernel within float rounding (`tests/attention.rs`).

// The kernels index rows, heads and lanes the way the arithmetic reads; iterators would hide it.
#![allow(clippy::needless_range_loop)]

use std::sync::{Arc, Mutex};

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::{DynTensorValueType, TensorElementType};

/// Positions one unit of work covers at most (its scores are a 16 KiB buffer per thread).
pub const SPAN: usize = 512;
/// A prompt chunk's queries that share one read of a span's keys and values.
const QUERY_BLOCK: usize = 16;
/// Query heads per key/value head this kernel handles at most.
const MAX_GROUP: usize = 8;

/// The `com.microsoft` domain with our `GroupQueryAttention` kernel, for
/// `SessionBuilder::with_operators`. The nodes of one session share one scratch (they run one
/// after another).
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new("com.microsoft")?.add(GroupQueryAttention::default())
}

/// The operator descriptor (inputs and outputs as in ONNX Runtime's contrib schema).
#[derive(Debug, Default)]
pub struct GroupQueryAttention {
    scratch: Arc<Mutex<Scratch>>,
}

impl Operator for GroupQueryAttention {
    type Kernel<'attr> = GqaKernel;

    fn name(&self) -> &str {
        "GroupQueryAttention"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        use TensorElementType::{Float32, Int32};
        [
            OperatorInput::required(Float32), // query (packed q/k/v)
            OperatorInput::optional(Float32), // key
            OperatorInput::optional(Float32), // value
            OperatorInput::required(Float32), // past_key
            OperatorInput::required(Float32), // past_value
            OperatorInput::required(Int32),   // seqlens_k
            OperatorInput::required(Int32),   // total_sequence_length
            OperatorInput::required(Float32), // cos_cache
            OperatorInput::required(Float32), // sin_cache
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        use TensorElementType::Float32;
        [
            OperatorOutput::required(Float32),
            OperatorOutput::required(Float32),
            OperatorOutput::required(Float32),
        ]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<GqaKernel> {
        let int = |name: &str, default: i64| info.get::<i64>(name).unwrap_or(default);
        let heads = int("num_heads", 0);
        let kv_heads = int("kv_num_heads", 0);
        if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP as i64 {
            return Err(unsupported(format!("num_heads {heads} / kv_num_heads {kv_heads}")));
        }
        for (name, want) in [("do_rotary", 1), ("rotary_interleaved", 1), ("smooth_softmax", 0)] {
            let got = int(name, 0);
            if got != want {
                return Err(unsupported(format!("{name}={got} (this kernel needs {want})")));
            }
        }
        let window = int("local_window_size", -1);
        if window != -1 {
            return Err(unsupported(format!("local_window_size={window}")));
        }
        let softcap = info.get::<f32>("softcap").unwrap_or(0.0);
        if softcap != 0.0 {
            return Err(unsupported(format!("softcap={softcap}")));
        }
        Ok(GqaKernel {
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            scale: info.get::<f32>("scale").unwrap_or(0.0),
            scratch: Arc::clone(&self.scratch),
        })
    }
}

fn failed() -> ort::Error {
    ort::Error::new("a thread of a previous attention run failed")
}

fn unsupported(what: String) -> ort::Error {
    ort::Error::new(format!("streamgate's GroupQueryAttention kernel does not support {what}"))
}

/// One unit of work: key/value head `kv_head` of cache row `row`, query position `query` (of the
/// run's `seq`), over cached positions `start..end`.
#[derive(Debug, Clone, Copy)]
struct Unit {
    row: usize,
    query: usize,
    kv_head: usize,
    start: usize,
    end: usize,
}

/// A unit's result before merging: per query head of the group, the running softmax maximum,
/// the sum of exponentials, and the unnormalised weighted sum of values (`head_dim` floats).
#[derive(Debug, Default)]
struct Partial {
    max: [f32; MAX_GROUP],
    sum: [f32; MAX_GROUP],
    acc: Vec<f32>,
}

/// One node's kernel: its attributes and the session's scratch.
#[derive(Debug)]
pub struct GqaKernel {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    scratch: Arc<Mutex<Scratch>>,
}

/// Buffers reused from run to run, so that a step allocates nothing once they have grown.
#[derive(Debug, Default)]
struct Scratch {
    /// The run's rotated, scaled queries, `[rows, seq, heads, head_dim]`.
    query: Vec<f32>,
    /// Each cache row's length before this run.
    past: Vec<usize>,
    units: Vec<Unit>,
    first: Vec<usize>,
    work: Vec<Work>,
    partials: Vec<Mutex<Partial>>,
}

/// One work item: span `span` of key/value head `kv_head` of cache row `row`, for the run's
/// query positions `queries.0..queries.1`.
#[derive(Debug, Clone, Copy)]
struct Work {
    row: usize,
    kv_head: usize,
    span: usize,
    queries: (usize, usize),
}

impl Kernel for GqaKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| ctx.input(i)?.ok_or_else(|| ort::Error::new(format!("input {i} is missing")));
        if ctx.input(1)?.is_some() || ctx.input(2)?.is_some() {
            return Err(unsupported("separate key/value inputs (it takes q/k/v packed)".into()));
        }
        let packed = input(0)?;
        let (qshape, qkv) = packed.try_extract_tensor::<f32>()?;
        // Only the past buffers' shapes and addresses are read: the present outputs are the same
        // memory (checked below), written in place.
        let past_key = input(3)?.downcast::<DynTensorValueType>()?;
        let past_value = input(4)?.downcast::<DynTensorValueType>()?;
        let cache_shape: Vec<i64> = past_key.shape().to_vec();
        let past_ptrs = (past_key.data_ptr(), past_value.data_ptr());
        if past_value.shape().to_vec() != cache_shape {
            return Err(ort::Error::new("past_key and past_value shapes differ"));
        }
        let seqlens = input(5)?;
        let (_, seqlens) = seqlens.try_extract_tensor::<i32>()?;
        let total = input(6)?;
        let (_, total) = total.try_extract_tensor::<i32>()?;
        let cos = input(7)?;
        let (cos_shape, cos) = cos.try_extract_tensor::<f32>()?;
        let sin = input(8)?;
        let (_, sin) = sin.try_extract_tensor::<f32>()?;

        let dims = |s: &[i64]| s.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect::<Vec<_>>();
        let (q, c) = (dims(qshape), dims(&cache_shape));
        let [rows, seq, width] = q[..] else {
            return Err(ort::Error::new("query must be [batch, seq, width]"));
        };
        let [cache_rows, kv_heads, max_len, head_dim] = c[..] else {
            return Err(ort::Error::new("past_key must be [batch, kv_heads, max_len, head_dim]"));
        };
        let (heads, group) = (self.heads, self.heads / self.kv_heads);
        if cache_rows != rows || kv_heads != self.kv_heads || width != (heads + 2 * kv_heads) * head_dim {
            return Err(ort::Error::new(format!(
                "shapes do not match: query {q:?}, cache {c:?}, {heads} query heads"
            )));
        }
        if head_dim % 2 != 0 || dims(cos_shape).get(1) != Some(&(head_dim / 2)) || seqlens.len() != rows {
            return Err(unsupported("a rotary cache narrower than the head (partial rotary)".into()));
        }
        let positions = cos.len() / (head_dim / 2);
        let first_prompt = seq > 1 && total.first().and_then(|&t| usize::try_from(t).ok()) == Some(seq);

        let mut scratch = self.scratch.lock().map_err(|_| ort::Error::new("a previous run failed"))?;
        let Scratch { query, past, units, first, work, partials } = &mut *scratch;
        // Each row's cached length before this run.
        past.clear();
        for &s in seqlens {
            let after =
                usize::try_from(s).map_err(|_| ort::Error::new("seqlens_k must not be negative"))? + 1;
            let before = if first_prompt { 0 } else { after.checked_sub(seq).unwrap_or(usize::MAX) };
            if before == usize::MAX || before + seq > max_len || before + seq > positions {
                return Err(ort::Error::new(format!(
                    "seqlens_k {s} with {seq} new positions does not fit the cache ({max_len}) or the rotary cache ({positions})"
                )));
            }
            past.push(before);
        }

        let mut present_key = ctx
            .output(1, cache_shape.clone())?
            .ok_or_else(|| ort::Error::new("present_key output is missing"))?;
        let mut present_value = ctx
            .output(2, cache_shape.clone())?
            .ok_or_else(|| ort::Error::new("present_value output is missing"))?;
        let mut output = ctx
            .output(0, vec![rows as i64, seq as i64, (heads * head_dim) as i64])?
            .ok_or_else(|| ort::Error::new("output is missing"))?;
        let (_, kcache) = present_key.try_extract_tensor_mut::<f32>()?;
        let (_, vcache) = present_value.try_extract_tensor_mut::<f32>()?;
        let (_, out) = output.try_extract_tensor_mut::<f32>()?;
        if !std::ptr::eq(kcache.as_ptr().cast(), past_ptrs.0)
            || !std::ptr::eq(vcache.as_ptr().cast(), past_ptrs.1)
        {
            return Err(unsupported(
                "present outputs in buffers of their own (bind them to the past buffers)".into(),
            ));
        }

        // Rotate q and k, scale q, and write the new keys and values into the cache.
        let scale = if self.scale == 0.0 { 1.0 / (head_dim as f32).sqrt() } else { self.scale };
        let half = head_dim / 2;
        query.resize(rows * seq * heads * head_dim, 0.0);
        for row in 0..rows {
            for s in 0..seq {
                let pos = past[row] + s;
                let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let token = &qkv[(row * seq + s) * width..][..width];
                for h in 0..heads {
                    let dst = &mut query[((row * seq + s) * heads + h) * head_dim..][..head_dim];
                    rotate(&token[h * head_dim..][..head_dim], cos, sin, dst);
                    dst.iter_mut().for_each(|x| *x *= scale);
                }
                for h in 0..kv_heads {
                    let at = ((row * kv_heads + h) * max_len + pos) * head_dim;
                    let k = &token[(heads + h) * head_dim..][..head_dim];
                    rotate(k, cos, sin, &mut kcache[at..][..head_dim]);
                    let v = &token[(heads + kv_heads + h) * head_dim..][..head_dim];
                    vcache[at..][..head_dim].copy_from_slice(v);
                }
            }
        }

        // Units: (row, query position, kv head, span of positions), in that order (each query
        // head's spans side by side for the merge); `first` indexes each (row, query, kv head)'s
        // first span.
        units.clear();
        first.clear();
        for row in 0..rows {
            for s in 0..seq {
                let len = past[row] + s + 1;
                for kv_head in 0..kv_heads {
                    first.push(units.len());
                    let mut start = 0;
                    while start < len {
                        let end = (start + SPAN).min(len);
                        units.push(Unit { row, query: s, kv_head, start, end });
                        start = end;
                    }
                }
            }
        }
        while partials.len() < units.len() {
            partials.push(Mutex::new(Partial::default()));
        }
        // Work items: one span of one kv head for up to QUERY_BLOCK consecutive queries of a
        // prompt chunk, so that span's keys and values are read from memory once and then from
        // the core's cache for the others.
        work.clear();
        for row in 0..rows {
            let spans = (past[row] + seq).div_ceil(SPAN);
            for kv_head in 0..kv_heads {
                for span in 0..spans {
                    // Queries before this span's start do not see it.
                    let from = (span * SPAN).saturating_sub(past[row]);
                    let mut begin = from;
                    while begin < seq {
                        let end = (begin + QUERY_BLOCK).min(seq);
                        work.push(Work { row, kv_head, span, queries: (begin, end) });
                        begin = end;
                    }
                }
            }
        }
        let (unit_list, partial_slots, queries): (&[Unit], &[Mutex<Partial>], &[f32]) =
            (units, partials, query);
        let (first, work_list): (&[usize], &[Work]) = (first, work);
        let (keys_all, values_all): (&[f32], &[f32]) = (kcache, vcache);
        let run_unit = |i: usize| {
            let (Some(unit), Some(partial)) = (unit_list.get(i), partial_slots.get(i)) else { return };
            let Ok(mut partial) = partial.lock() else { return };
            let base = (unit.row * kv_heads + unit.kv_head) * max_len * head_dim;
            let qs = &queries[((unit.row * seq + unit.query) * heads + unit.kv_head * group) * head_dim..]
                [..group * head_dim];
            let keys = &keys_all[base + unit.start * head_dim..base + unit.end * head_dim];
            let values = &values_all[base + unit.start * head_dim..base + unit.end * head_dim];
            span(qs, keys, values, head_dim, group, &mut partial);
        };
        let run_work = |i: usize| {
            let Some(w) = work_list.get(i) else { return };
            for s in w.queries.0..w.queries.1 {
                if let Some(&f) = first.get((w.row * seq + s) * kv_heads + w.kv_head) {
                    run_unit(f + w.span);
                }
            }
        };
        if work_list.len() == 1 {
            run_work(0);
        } else {
            ctx.par_for(work_list.len(), 0, run_work)?;
        }

        // Merge each (row, query, kv head)'s spans into the output.
        let mut i = 0;
        while i < units.len() {
            let first = units[i];
            let mut j = i;
            while j < units.len()
                && (units[j].row, units[j].query, units[j].kv_head) == (first.row, first.query, first.kv_head)
            {
                j += 1;
            }
            let parts = &mut partials[i..j];
            for g in 0..group {
                let mut m = f32::NEG_INFINITY;
                for p in parts.iter_mut() {
                    m = m.max(p.get_mut().map_err(|_| failed())?.max[g]);
                }
                let h = first.kv_head * group + g;
                let dst = &mut out[((first.row * seq + first.query) * heads + h) * head_dim..][..head_dim];
                dst.fill(0.0);
                let mut total = 0.0;
                for p in parts.iter_mut() {
                    let p = p.get_mut().map_err(|_| failed())?;
                    let w = (p.max[g] - m).exp();
                    total += w * p.sum[g];
                    for (d, a) in dst.iter_mut().zip(&p.acc[g * head_dim..][..head_dim]) {
                        *d += w * a;
                    }
                }
                dst.iter_mut().for_each(|d| *d /= total);
            }
            i = j;
        }
        Ok(())
    }
}

/// Rotary embedding on interleaved pairs: `(x0, x1)` at pair `i` turns by the angle of `cos[i]`,
/// `sin[i]`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    for (((o, x), c), s) in out.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(cos).zip(sin) {
        o[0] = x[0] * c - x[1] * s;
        o[1] = x[0] * s + x[1] * c;
    }
}

/// How a multiply-add is computed: fused (one rounding, the CPU's FMA instruction) where the
/// code is compiled for it, else a multiply then an add (`mul_add` without FMA is a slow call).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

struct Separate;
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One unit: `group` query heads (`qs`, rotated and scaled) against the keys and values of one
/// span of at most [`SPAN`] positions, written to `partial`.
fn span(qs: &[f32], keys: &[f32], values: &[f32], head_dim: usize, group: usize, partial: &mut Partial) {
    span_with(Simd::detected(), qs, keys, values, head_dim, group, partial);
}

/// The vector instructions a span kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Whatever the compiler makes of plain code for the build's baseline CPU.
    Portable,
    /// AVX2 and FMA: 8 lanes.
    Avx2,
    /// AVX-512 (for head size 64; others use the AVX2 kernel): 16 lanes.
    Avx512,
}

impl Simd {
    /// The best this CPU has.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                return if has!("avx512f") { Self::Avx512 } else { Self::Avx2 };
            }
        }
        Self::Portable
    }

    /// How `DecoderModel::attention` names this kernel.
    pub fn label(self) -> &'static str {
        match self {
            Self::Portable => "streamgate-portable",
            Self::Avx2 => "streamgate-avx2",
            Self::Avx512 => "streamgate-avx512",
        }
    }
}

/// [`span`] with at most the instructions of `simd` (never more than the CPU has).
///
/// The one place in the workspace that opts out of `unsafe_code = "deny"`: calling a function
/// compiled for CPU features the baseline build does not assume is `unsafe`, and sound exactly
/// when the CPU has them, which `Simd::detected` has just checked.
#[allow(unsafe_code)]
fn span_with(
    simd: Simd,
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    group: usize,
    partial: &mut Partial,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let simd = simd.min(Simd::detected());
        if simd != Simd::Portable {
            avx2::SCORES.with_borrow_mut(|scores| {
                if simd == Simd::Avx512 && head_dim == 64 {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (`Simd::detected`); the function
                    // is otherwise safe code (no pointers, every access bounds-checked).
                    unsafe { avx512::span64(scores, qs, keys, values, group, partial) }
                } else {
                    // SAFETY: the CPU has AVX2 and FMA (`Simd::detected`); as above otherwise.
                    unsafe { span_avx2(scores, qs, keys, values, head_dim, group, partial) }
                }
            });
            return;
        }
    }
    let _ = simd;
    span_body::<Separate>(qs, keys, values, head_dim, group, partial);
}

/// [`span_body`] compiled for AVX2 and FMA (8-lane vectors, fused multiply-adds); the common
/// head size 64 gets [`avx2::span64`], written with the vector instructions themselves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn span_avx2(
    scores: &mut Option<avx2::Scores>,
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    group: usize,
    partial: &mut Partial,
) {
    if head_dim == 64 {
        avx2::span64(scores, qs, keys, values, group, partial);
    } else {
        span_body::<Fused>(qs, keys, values, head_dim, group, partial);
    }
}

/// The span kernel for head size 64 in AVX2 intrinsics. Every function here is compiled for
/// AVX2 and FMA, so the (value-only) intrinsics are safe to call; vectors are built from and
/// read back into arrays, with no pointers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    // `crate::` paths, not `super::`: scripts/check_import_cycles.py reads `super` as the file's parent.
    use crate::model::attention::{EXP_TAYLOR, LN2_HI, LN2_LO, MAX_GROUP, Partial, SPAN};

    const HD: usize = 64;
    const CHUNKS: usize = HD / 8;
    /// Positions whose values stay in L1 while every query head of the group adds them up.
    const BLOCK: usize = 32;

    #[target_feature(enable = "avx2,fma")]
    fn load(x: &[f32; 8]) -> __m256 {
        _mm256_setr_ps(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7])
    }

    #[target_feature(enable = "avx2,fma")]
    fn lane(v: __m256, i: i32) -> f32 {
        _mm256_cvtss_f32(_mm256_permutevar8x32_ps(v, _mm256_set1_epi32(i)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn lanes(v: __m256) -> [f32; 8] {
        [lane(v, 0), lane(v, 1), lane(v, 2), lane(v, 3), lane(v, 4), lane(v, 5), lane(v, 6), lane(v, 7)]
    }

    /// A head's 64 floats as 8 vectors.
    #[target_feature(enable = "avx2,fma")]
    fn row(x: &[f32]) -> [__m256; CHUNKS] {
        let mut out = [_mm256_setzero_ps(); CHUNKS];
        for (o, c) in out.iter_mut().zip(x.as_chunks::<8>().0) {
            *o = load(c);
        }
        out
    }

    /// Eight dot-product accumulators reduced to one vector: lane `p` is the sum of `a[p]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn reduce8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        lanes(v).into_iter().fold(f32::NEG_INFINITY, f32::max)
    }

    /// [`crate::model::attention::exp_le0`] on 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn exp_le0(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_TAYLOR[6]);
        for c in EXP_TAYLOR[..6].iter().rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// Scores (8 positions to a vector, `len` of them valid) to `e^(score - max)` in place, with
    /// each query head's maximum and sum in `partial`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax(scores: &mut Scores, len: usize, group: usize, partial: &mut Partial) {
        let blocks = len.div_ceil(8);
        let valid = len - (blocks - 1) * 8; // lanes of the last block that are positions
        let tail_mask = _mm256_cmp_ps::<_CMP_LT_OQ>(
            _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
            _mm256_set1_ps(valid as f32),
        );
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        for g in 0..group {
            let last = &mut scores[g][blocks - 1];
            *last = _mm256_blendv_ps(neg_inf, *last, tail_mask);
            let mut m = neg_inf;
            for v in &scores[g][..blocks] {
                m = _mm256_max_ps(m, *v);
            }
            let max = hmax(m);
            let mv = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            for (b, v) in scores[g][..blocks].iter_mut().enumerate() {
                *v = exp_le0(_mm256_sub_ps(*v, mv));
                if b == blocks - 1 {
                    *v = _mm256_and_ps(*v, tail_mask);
                }
                sum = _mm256_add_ps(sum, *v);
            }
            partial.max[g] = max;
            partial.sum[g] = lanes(sum).iter().sum();
        }
    }

    /// Query heads' scores, 8 positions to a vector.
    pub(super) type Scores = [[__m256; SPAN / 8]; MAX_GROUP];

    thread_local! {
        /// Each thread's scores buffer (16 KiB: not zeroed on the stack for every span).
        pub(super) static SCORES: std::cell::RefCell<Option<Scores>> = const { std::cell::RefCell::new(None) };
    }

    /// Lane `t % 8` of score vector `t / 8`, in all 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weight(scores: &[__m256; SPAN / 8], t: usize) -> __m256 {
        _mm256_permutevar8x32_ps(scores[t / 8], _mm256_set1_epi32((t % 8) as i32))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn span64(
        scores: &mut Option<Scores>,
        qs: &[f32],
        keys: &[f32],
        values: &[f32],
        group: usize,
        partial: &mut Partial,
    ) {
        let len = (keys.len() / HD).min(SPAN);
        let group = group.min(MAX_GROUP);
        if len == 0 {
            *partial = Partial { acc: vec![0.0; group * HD], ..Partial::default() };
            return;
        }
        let mut q = [[_mm256_setzero_ps(); CHUNKS]; MAX_GROUP];
        for (qg, x) in q.iter_mut().zip(qs.chunks_exact(HD)).take(group) {
            *qg = row(x);
        }
        // Scores, 8 positions to a vector; positions past `len` get -inf.
        let blocks = len.div_ceil(8);
        if scores.is_none() {
            *scores = Some([[_mm256_setzero_ps(); SPAN / 8]; MAX_GROUP]);
        }
        let Some(scores) = scores.as_mut() else { return };
        let zero_row = [0f32; HD];
        for b in 0..blocks {
            let mut k = [[_mm256_setzero_ps(); CHUNKS]; 8];
            for (p, kp) in k.iter_mut().enumerate() {
                let t = b * 8 + p;
                *kp = row(if t < len { &keys[t * HD..][..HD] } else { &zero_row });
            }
            for g in 0..group {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (a, kp) in acc.iter_mut().zip(&k) {
                    let mut s = _mm256_mul_ps(q[g][0], kp[0]);
                    for c in 1..CHUNKS {
                        s = _mm256_fmadd_ps(q[g][c], kp[c], s);
                    }
                    *a = s;
                }
                scores[g][b] = reduce8(&acc);
            }
        }
        softmax(scores, len, group, partial);
        // The weighted sum of values, BLOCK positions at a time.
        let mut acc = [[_mm256_setzero_ps(); CHUNKS]; MAX_GROUP];
        let mut start = 0;
        while start < len {
            let end = (start + BLOCK).min(len);
            for g in 0..group {
                let mut a = acc[g];
                for t in start..end {
                    let p = weight(&scores[g], t);
                    let v = row(&values[t * HD..][..HD]);
                    for c in 0..CHUNKS {
                        a[c] = _mm256_fmadd_ps(p, v[c], a[c]);
                    }
                }
                acc[g] = a;
            }
            start = end;
        }
        partial.acc.clear();
        for a in &acc[..group] {
            for v in a {
                partial.acc.extend_from_slice(&lanes(*v));
            }
        }
    }
}

/// The span kernel for head size 64 in AVX-512: a head is 4 vectors of 16, twice the work per
/// instruction of [`avx2::span64`]; the softmax over the scores is the AVX2 one.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::model::attention::avx2::{Scores, lanes, reduce8, softmax, weight};
    use crate::model::attention::{MAX_GROUP, Partial, SPAN};

    const HD: usize = 64;
    const CHUNKS: usize = HD / 16;

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn load(x: &[f32; 16]) -> __m512 {
        _mm512_setr_ps(
            x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11], x[12], x[13], x[14],
            x[15],
        )
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn row(x: &[f32]) -> [__m512; CHUNKS] {
        let mut out = [_mm512_setzero_ps(); CHUNKS];
        for (o, c) in out.iter_mut().zip(x.as_chunks::<16>().0) {
            *o = load(c);
        }
        out
    }

    /// The two 8-lane halves of `v`, added.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn fold(v: __m512) -> __m256 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), hi)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn span64(
        scores: &mut Option<Scores>,
        qs: &[f32],
        keys: &[f32],
        values: &[f32],
        group: usize,
        partial: &mut Partial,
    ) {
        if scores.is_none() {
            *scores = Some([[_mm256_setzero_ps(); SPAN / 8]; MAX_GROUP]);
        }
        let Some(scores) = scores.as_mut() else { return };
        // A copy per group size, so that a query head's accumulators are registers.
        match group {
            1 => group_span::<1>(scores, qs, keys, values, partial),
            2 => group_span::<2>(scores, qs, keys, values, partial),
            3 => group_span::<3>(scores, qs, keys, values, partial),
            4 => group_span::<4>(scores, qs, keys, values, partial),
            5 => group_span::<5>(scores, qs, keys, values, partial),
            6 => group_span::<6>(scores, qs, keys, values, partial),
            7 => group_span::<7>(scores, qs, keys, values, partial),
            _ => group_span::<MAX_GROUP>(scores, qs, keys, values, partial),
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn group_span<const G: usize>(
        scores: &mut Scores,
        qs: &[f32],
        keys: &[f32],
        values: &[f32],
        partial: &mut Partial,
    ) {
        let len = (keys.len() / HD).min(SPAN);
        if len == 0 {
            *partial = Partial { acc: vec![0.0; G * HD], ..Partial::default() };
            return;
        }
        let mut q = [[_mm512_setzero_ps(); CHUNKS]; G];
        for (qg, x) in q.iter_mut().zip(qs.chunks_exact(HD)) {
            *qg = row(x);
        }
        let blocks = len.div_ceil(8);
        let zero_row = [0f32; HD];
        for b in 0..blocks {
            let mut acc = [[_mm256_setzero_ps(); 8]; G];
            for p in 0..8 {
                let t = b * 8 + p;
                let k = row(if t < len { &keys[t * HD..][..HD] } else { &zero_row });
                for g in 0..G {
                    let mut s = _mm512_mul_ps(q[g][0], k[0]);
                    for c in 1..CHUNKS {
                        s = _mm512_fmadd_ps(q[g][c], k[c], s);
                    }
                    acc[g][p] = fold(s);
                }
            }
            for g in 0..G {
                scores[g][b] = reduce8(&acc[g]);
            }
        }
        softmax(scores, len, G, partial);
        // Each value row is read once for every query head: G x 4 independent accumulators.
        let mut acc = [[_mm512_setzero_ps(); CHUNKS]; G];
        for t in 0..len {
            let v = row(&values[t * HD..][..HD]);
            for g in 0..G {
                let p = _mm512_broadcastss_ps(_mm256_castps256_ps128(weight(&scores[g], t)));
                for c in 0..CHUNKS {
                    acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
                }
            }
        }
        partial.acc.clear();
        for a in &acc {
            for v in a {
                partial.acc.extend_from_slice(&lanes(_mm512_castps512_ps256(*v)));
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v)));
                partial.acc.extend_from_slice(&lanes(hi));
            }
        }
    }
}

#[inline(always)]
fn span_body<A: MulAdd>(
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    group: usize,
    partial: &mut Partial,
) {
    let mut scores = [[0f32; SPAN]; MAX_GROUP];
    let len = (keys.len() / head_dim).min(SPAN);
    for (t, k) in keys.chunks_exact(head_dim).take(len).enumerate() {
        for (g, q) in qs.chunks_exact(head_dim).take(group).enumerate() {
            scores[g][t] = dot::<A>(q, k);
        }
    }
    for g in 0..group {
        let s = &mut scores[g][..len];
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sums = [0f32; 8];
        let (blocks, tail) = s.as_chunks_mut::<8>();
        for block in blocks {
            for (x, sum) in block.iter_mut().zip(&mut sums) {
                *x = exp_le0::<A>(*x - m);
                *sum += *x;
            }
        }
        for x in tail.iter_mut() {
            *x = exp_le0::<A>(*x - m);
            sums[0] += *x;
        }
        partial.max[g] = m;
        partial.sum[g] = sums.iter().sum();
    }
    partial.acc.clear();
    partial.acc.resize(group * head_dim, 0.0);
    for (t, v) in values.chunks_exact(head_dim).take(len).enumerate() {
        for (g, acc) in partial.acc.chunks_exact_mut(head_dim).enumerate() {
            let p = scores[g][t];
            for (a, x) in acc.iter_mut().zip(v) {
                *a = A::mul_add(p, *x, *a);
            }
        }
    }
}

/// Dot product in 8 lanes (the vector width the compiler maps them to), summed at the end.
#[inline(always)]
fn dot<A: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
    let (a8, a_tail) = a.as_chunks::<8>();
    let (b8, b_tail) = b.as_chunks::<8>();
    let mut lanes = [0f32; 8];
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..8 {
            lanes[l] = A::mul_add(x[l], y[l], lanes[l]);
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

/// `ln 2` in two parts: `LN2_HI` has few mantissa bits, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// `1 / k!` for `k` in 0..=6.
const EXP_TAYLOR: [f32; 7] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0];

/// `e^x` for `x <= 0` (a score minus its row's maximum), to ~2e-7 relative, in arithmetic and
/// bit operations only, so that a loop over it vectorises: `e^x = 2^n e^r` with `n` the integer
/// nearest `x log2 e`, `r = x - n ln 2` (in two parts, so `r` is exact) and `e^r`, `|r| <= 0.35`,
/// by its degree-6 Taylor polynomial.
#[inline(always)]
fn exp_le0<A: MulAdd>(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const C: [f32; 7] = EXP_TAYLOR;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = A::mul_add(-n, LN2_LO, A::mul_add(-n, LN2_HI, x));
    let mut p = C[6];
    for c in C[..6].iter().rev() {
        p = A::mul_add(p, r, *c);
    }
    // n is in -126..=0 here, so 2^n is a normal float.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_scores_range() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let want = x.exp();
            worst = worst.max(((exp_le0::<Separate>(x) - want) / want).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_le0::<Separate>(0.0), 1.0);
        assert!(exp_le0::<Separate>(-1e9) >= 0.0);
    }

    /// Each kernel this CPU can run (portable, AVX2 for head size 64 or another, AVX-512)
    /// against softmax attention in f64, at lengths that are and are not multiples of 8.
    #[test]
    fn a_span_matches_softmax_attention_in_f64() {
        for (hd, group) in [(64, 3), (64, 1), (64, 8), (48, 4)] {
            for len in [1, 7, 8, 300, SPAN] {
                for simd in
                    [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|s| *s <= Simd::detected())
                {
                    check_span(simd, hd, group, len);
                }
            }
        }
    }

    fn check_span(simd: Simd, hd: usize, group: usize, len: usize) {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let qs: Vec<f32> = (0..group * hd).map(|i| value(i + 13) * 0.3).collect();
        let keys: Vec<f32> = (0..len * hd).map(|i| value(i * 3 + 1)).collect();
        let values: Vec<f32> = (0..len * hd).map(|i| value(i * 5 + 2)).collect();
        let mut partial = Partial::default();
        span_with(simd, &qs, &keys, &values, hd, group, &mut partial);
        for g in 0..group {
            let scores: Vec<f64> = (0..len)
                .map(|t| (0..hd).map(|d| f64::from(qs[g * hd + d]) * f64::from(keys[t * hd + d])).sum())
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = p.iter().sum();
            let at = format!("{simd:?}: head size {hd}, group {group}, {len} positions, head {g}");
            assert!((f64::from(partial.max[g]) - m).abs() < 1e-4, "{at}: max");
            assert!(
                (f64::from(partial.sum[g]) - sum).abs() / sum < 1e-5,
                "{at}: sum {} vs {sum}",
                partial.sum[g]
            );
            for d in 0..hd {
                let want: f64 = (0..len).map(|t| p[t] * f64::from(values[t * hd + d])).sum();
                let got = f64::from(partial.acc[g * hd + d]);
                assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{at}, dim {d}: {got} vs {want}");
            }
        }
    }
}
