"""Build a LLaMA-family decoder as one fused, quantized ONNX graph for ONNX Runtime's CPU provider.

The shape is the one ONNX Runtime's generative-AI model builder emits for Llama on CPU, built from
the GGUF's own quantized blocks (no re-quantization):

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   (residual adds fused)
    MatMulNBits                                                       (every projection, lm_head too)
    GroupQueryAttention(do_rotary=1, rotary_interleaved=1)            (rotary fused, KV in one buffer)
    GatherBlockQuantized                                              (the 8-bit embedding lookup)

Inputs and outputs (the "shared-buffer" layout the Rust engine recognizes by `seqlens_k`):

    input_ids               int64 [batch, seq]
    slots                   int64 [batch]        the cache row each input row reads and extends
    seqlens_k               int32 [rows]         (positions cached after this run) - 1, per cache row
    total_sequence_length   int32 []             max over cache rows of seqlens_k + 1
    past_key_values.{i}.key / .value   float32 [rows, kv_heads, max_len, head_dim]
    -> logits               float32 [batch, 1, vocab]       (last position of each input row only)
    -> present.{i}.key / .value        float32 [rows, kv_heads, max_len, head_dim]

`present.*` are meant to be bound to the very buffers passed as `past_key_values.*`
(GroupQueryAttention then writes the new positions in place: nothing is copied per token).

The cache has its own row count: a pool of slots, of which a decode step feeds only the active
ones (`slots`). Each layer scatters the active rows' packed q/k/v into a zero tensor of all cache
rows, runs GroupQueryAttention over the pool (an idle row has a zero query and `seqlens_k` 0: one
position of attention, written into its own free slot), and gathers the active rows back, so the
projections, which are most of the cost, run on active rows only and no sequence moves when
another joins or leaves. A prompt chunk (seq > 1 with a past) must run with one cache row: that is
ONNX Runtime's GroupQueryAttention rule.

The mixed step (`mixed=True`, written as model_mixed.onnx beside model.onnx) runs both at once:
the decode rows as above plus one prompt chunk on a one-row cache of its own, in one pass, so the
projections read their weights once for both (a chunk in a pass of its own costs about a whole
decode step before its first token). Its extra inputs and outputs:

    chunk_ids                          int64 [1, chunk]      (at least one token)
    chunk_seqlens_k                    int32 [1]
    chunk_total_sequence_length        int32 []
    chunk_past_key_values.{i}.key / .value   float32 [1, kv_heads, max_len, head_dim]
    -> logits                          float32 [batch + 1, 1, vocab]   (the decode rows, then the chunk's last position)
    -> chunk_present.{i}.key / .value  bound to the chunk's past buffers

The decode rows' and the chunk's tokens run as one sequence of `batch + chunk` tokens through
every projection and norm; each layer splits them for the two GroupQueryAttention nodes and joins
the results. The weights keep their names, so the engine's two sessions share their prepacked
copies. It needs at least one decode row and one chunk token (GroupQueryAttention refuses an empty
one); the engine uses model.onnx for steps that have only one kind.

Weights. A GGUF Q4_1 block of 32 weights along K is `w = d*q + m` (q in 0..15). MatMulNBits with
bits=4 computes `d*(q - z)` with an integer zero point z; choosing z = round(-m/d) leaves a per-block
residual `r = m + d*z` (|r| <= d/2 when the block straddles 0), whose contribution to `x @ W^T` is
`blocksum(x) @ R` with `blocksum` summing x over each block of 32. `--q4-residual exact` adds that
term (a small fp32 MatMul per projection input), which makes the graph equal to the dequantized GGUF
up to rounding; `--q4-residual none` drops it (faster, less faithful); `--q4-residual folded` puts
it inside the projection's own MatMulNBits: the input extended by its block sums, the weight by the
residuals as two 4-bit digits (fewer nodes and bytes, ~9 % more multiply-adds, int8 sums). Q8_0
blocks (`w = d*q`, q int8) are exactly MatMulNBits bits=8 with zero point 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_onnx import LlamaConfig, _Graph

OPSET = 17
MS = "com.microsoft"
BLOCK = 32


@dataclass
class QuantWeight:
    """A [N, K] matrix as MatMulNBits blocks along K: `w[n, b*32 + j] = scale[n, b] * (q - zp[n, b]) + resid[n, b]`."""

    bits: int
    q: np.ndarray  # uint8 [N, K] (values 0..15 for 4 bits, 0..255 for 8 bits)
    scale: np.ndarray  # float32 [N, K/32]
    zp: np.ndarray  # uint8 [N, K/32]
    resid: np.ndarray | None  # float32 [N, K/32] or None when exact without it

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantized(self) -> np.ndarray:
        n, k = self.shape
        w = self.scale[..., None] * (self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
                                     - self.zp[..., None].astype(np.float32))
        if self.resid is not None:
            w = w + self.resid[..., None]
        return w.reshape(n, k)


# ---- reading GGUF blocks -------------------------------------------------------------------------

def q4_1_blocks(raw: np.ndarray, n: int, k: int) -> QuantWeight:
    """GGUF Q4_1 rows ([N, K/32 * 20] bytes: f16 d, f16 m, 16 bytes of nibbles) to a QuantWeight."""
    blocks = raw.reshape(n, k // BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    # Element j of a block is the low nibble of qs[j], element j + 16 the high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return with_integer_zero_point(q, d, m)


def with_integer_zero_point(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> QuantWeight:
    """`d*q + m` as `d*(q - z) + r` with z = round(-m/d) in 0..15 and r = m + d*z."""
    safe_d = np.where(d == 0, 1.0, d)
    z = np.clip(np.rint(-m / safe_d), 0, 15).astype(np.uint8)
    resid = (m + d * z.astype(np.float32)).astype(np.float32)
    return QuantWeight(bits=4, q=q.astype(np.uint8), scale=d, zp=z, resid=resid)


def q8_0_blocks(raw: np.ndarray, n: int, k: int) -> QuantWeight:
    """GGUF Q8_0 rows ([N, K/32 * 34] bytes: f16 d, 32 int8) to a QuantWeight (zero point 128, exact)."""
    blocks = raw.reshape(n, k // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = (blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(n, k)
    return QuantWeight(bits=8, q=q, scale=d, zp=np.full(d.shape, 128, np.uint8), resid=None)


def quantize_q4_1(w: np.ndarray) -> QuantWeight:
    """Round-to-nearest Q4_1 of an fp32 [N, K] matrix (for test models that start in fp32)."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    lo, hi = b.min(-1), b.max(-1)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m[..., None]) / np.where(d == 0, 1, d)[..., None]), 0, 15).astype(np.uint8)
    return with_integer_zero_point(q.reshape(n, k), d, m)


def quantize_q8_0(w: np.ndarray) -> QuantWeight:
    """Round-to-nearest Q8_0 of an fp32 [N, K] matrix (for test models that start in fp32)."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    d = (np.abs(b).max(-1) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)[..., None]), -127, 127).astype(np.int16) + 128
    return QuantWeight(bits=8, q=q.astype(np.uint8).reshape(n, k), scale=d,
                       zp=np.full(d.shape, 128, np.uint8), resid=None)


def as_4bit_candidates(w: QuantWeight) -> QuantWeight:
    """A 4-bit copy of an 8-bit [N, K] matrix for picking the lm_head's candidates only (no residual):
    per block of 32, the integer zero point z in 0..15 and scale d whose grid `d*(j - z)`, j = 0..15,
    covers the block's range with the smallest step, then round to nearest. The exact 8-bit rows
    still score the candidates it picks (`rescore_top`)."""
    return as_4bit_grid(w.dequantized())


def as_4bit_grid(w: np.ndarray) -> QuantWeight:
    """Round-to-nearest 4-bit blocks of an fp32 [N, K] matrix on the grid `d*(j - z)` (integer z) that
    covers each block's range with the smallest step."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    lo, hi = np.minimum(b.min(-1), 0.0), np.maximum(b.max(-1), 0.0)
    z = np.arange(16, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.maximum(np.where(z < 15, hi[..., None] / (15 - z), np.where(hi[..., None] > 0, np.inf, 0.0)),
                           np.where(z > 0, -lo[..., None] / z, np.where(lo[..., None] < 0, np.inf, 0.0)))
    best = steps.argmin(-1)
    d = np.take_along_axis(steps, best[..., None], -1)[..., 0].astype(np.float32)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)[..., None] + best[..., None]), 0, 15)
    return QuantWeight(bits=4, q=q.astype(np.uint8).reshape(n, k), scale=d, zp=best.astype(np.uint8), resid=None)


def as_8bit(w: QuantWeight) -> QuantWeight:
    """Re-encode `d*(q - z) + r` blocks as 8-bit codes without a residual: `(d/k)*(k*(q - z) + c - z8)`
    with the integer k in 1..17 per block that best represents `r*k/d` as an integer c. The error,
    `(d/k)*|r*k/d - c|`, is at most d/(2k) and usually far smaller."""
    if w.bits != 4 or w.resid is None:
        return w
    d, r = w.scale, w.resid
    safe_d = np.where(d == 0, 1.0, d)
    signed = w.q.reshape(*d.shape, BLOCK).astype(np.int32) - w.zp[..., None].astype(np.int32)  # -15..15
    lo, hi = signed.min(-1), signed.max(-1)
    best_err = np.full(d.shape, np.inf, np.float32)
    best_k = np.ones(d.shape, np.int32)
    best_c = np.zeros(d.shape, np.int32)
    for k in range(1, 18):
        c = np.rint(r * k / safe_d).astype(np.int32)
        err = np.abs(r * k / safe_d - c) * d / k
        fits = (k * (hi - lo) <= 255)
        better = fits & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_k = np.where(better, k, best_k)
        best_c = np.where(better, c, best_c)
    codes = best_k[..., None] * signed + best_c[..., None]  # w ~= (d/k) * codes
    zp = np.clip(-codes.min(-1), 0, 255)
    zp = np.where(codes.max(-1) + zp > 255, 255 - codes.max(-1), zp)
    q8 = codes + zp[..., None]
    if q8.min() < 0 or q8.max() > 255:
        raise ValueError("a block does not fit 8 bits")
    return QuantWeight(bits=8, q=q8.reshape(w.q.shape).astype(np.uint8), scale=(d / best_k).astype(np.float32),
                       zp=zp.astype(np.uint8), resid=None)


def concat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Stack projections that read the same input (q, k, v) into one [sum N, K] weight."""
    resid = [p.resid for p in parts]
    return QuantWeight(
        bits=parts[0].bits,
        q=np.concatenate([p.q for p in parts]),
        scale=np.concatenate([p.scale for p in parts]),
        zp=np.concatenate([p.zp for p in parts]),
        resid=None if all(r is None for r in resid) else np.concatenate(
            [r if r is not None else np.zeros_like(p.scale) for r, p in zip(resid, parts)]),
    )


# ---- graph ---------------------------------------------------------------------------------------

def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes to MatMulNBits' B: uint8 [N, K/32, 32*bits/8], element 2i in the low nibble."""
    n, k = q.shape
    if bits == 8:
        return q.reshape(n, k // BLOCK, BLOCK)
    pairs = q.reshape(n, k // BLOCK, BLOCK // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """[N, K/32] zero points to MatMulNBits' layout: flat, 4-bit ones two per byte (padded per row)."""
    n, blocks = zp.shape
    if bits == 8:
        return zp.reshape(-1)
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    pairs = zp.reshape(n, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(-1)


class _NamedGraph(_Graph):
    """llama_onnx's graph helper; every initializer here gets exactly the name it is given."""

    def const(self, hint: str, value: np.ndarray, exact: bool = True) -> str:
        return super().const(hint, value, exact=exact)


class _Builder:
    def __init__(self, cfg: LlamaConfig, accuracy_level: int, exact_q4: bool, bits: int = 4,
                 fp32_names: frozenset[str] = frozenset(), fold: bool = False) -> None:
        self.g = _NamedGraph()
        self.cfg = cfg
        self.accuracy_level = accuracy_level
        self.fp32_names = fp32_names
        self.exact_q4 = exact_q4
        self.bits = bits
        self._blocksums: dict[str, str] = {}
        self.fold = fold  # the residual term inside the projection's MatMulNBits (see `folded`)

    def matmul(self, x: str, w: QuantWeight, name: str) -> str:
        """`x @ W^T` with MatMulNBits, plus the per-block residual term when it is kept."""
        g = self.g
        if self.bits == 8:
            w = as_8bit(w)
        if self.fold and w.resid is not None and self.exact_q4:
            x, w = self.folded(x, w)
        n, k = w.shape
        y = g.op("MatMulNBits", [
            x,
            g.const(f"{name}.qweight", _pack(w.q, w.bits)),
            g.const(f"{name}.scales", w.scale.reshape(-1).astype(np.float32)),
            g.const(f"{name}.zero_points", _pack_zero_points(w.zp, w.bits)),
        ], domain=MS, hint=name, K=k, N=n, bits=w.bits, block_size=BLOCK,
            accuracy_level=1 if name in self.fp32_names else self.accuracy_level)
        if w.resid is None or not self.exact_q4:
            return y
        correction = g.op("MatMul", [self.blocksum(x, k), g.const(f"{name}.block_residuals", w.resid.T.copy())])
        return g.op("Add", [y, correction], hint=f"{name}.out")

    def folded(self, x: str, w: QuantWeight) -> tuple[str, QuantWeight]:
        """The residual term inside the same MatMulNBits: the input extended by its block sums (twice,
        each padded to whole blocks of 32) and the weight by the residuals as two 4-bit digits."""
        n, k = w.shape
        nb = k // BLOCK
        width = BLOCK * -(-nb // BLOCK)
        key = f"{x}#folded"
        if key not in self._blocksums:
            g = self.g
            # The sums as a 4-bit MatMulNBits with fp32 activations: exact (codes 0 and 1)
            # and a few kilobytes where a dense fp32 matrix would be read whole every step.
            q = np.zeros((width, k), np.uint8)
            for b in range(nb):
                q[b, b * BLOCK:(b + 1) * BLOCK] = 1
            scale = np.ones((width, nb), np.float32)
            sums = g.op("MatMulNBits", [
                x, g.const(g.name("blocksum.qweight"), _pack(q, 4)),
                g.const(g.name("blocksum.scales"), scale.reshape(-1)),
                g.const(g.name("blocksum.zero_points"), _pack_zero_points(np.zeros((width, nb), np.uint8), 4)),
            ], domain=MS, K=k, N=width, bits=4, block_size=BLOCK, accuracy_level=1)
            self._blocksums[key] = g.op("Concat", [x, sums, sums], axis=-1)
        r = np.zeros((n, width), np.float32)
        r[:, :nb] = w.resid
        hi = as_4bit_grid(r)
        lo = as_4bit_grid(r - hi.dequantized())
        return self._blocksums[key], QuantWeight(
            bits=4, q=np.concatenate([w.q, hi.q, lo.q], axis=1),
            scale=np.concatenate([w.scale, hi.scale, lo.scale], axis=1),
            zp=np.concatenate([w.zp, hi.zp, lo.zp], axis=1), resid=None)

    def blocksum(self, x: str, k: int) -> str:
        """x [B, S, K] summed over each block of 32 along K -> [B, S, K/32]; computed once per input."""
        if x not in self._blocksums:
            g = self.g
            blocks = g.op("Reshape", [x, g.const(g.name("shape_blocks"), np.array([0, 0, k // BLOCK, BLOCK],
                                                                                   np.int64))])
            self._blocksums[x] = g.op("ReduceSum", [blocks, g.const(g.name("axis"), np.array([-1], np.int64))],
                                      keepdims=0)
        return self._blocksums[x]


def build_fused_model(cfg: LlamaConfig, w: dict, producer: str, accuracy_level: int = 4,
                      exact_q4: bool = True, bits: int = 4, rescore_top: int = 16,
                      fp32_mlp_layers: int = 0, lm_head_bits: int = 8, fold: bool = False,
                      mixed: bool = False) -> onnx.ModelProto:
    """`w` holds QuantWeight (embed, lm_head, layers.{i}.{q,k,v,o,gate,up,down}; [out, in]) and fp32
    norm vectors (final_norm, layers.{i}.{attn_norm,ffn_norm}). `lm_head` may be absent (tied).

    accuracy_level: MatMulNBits' 4 (int8 activations, the fast kernels) or 1 (fp32 activations).
    exact_q4: keep Q4_1's per-block residual (see the module docstring). bits=8 re-encodes the 4-bit
    blocks as 8-bit codes instead (no residual term; see `as_8bit`). rescore_top: how many of the
    lm_head's best candidates are re-scored in fp32 (0: none). fp32_mlp_layers: the MLP projections
    (gate/up and down) of this many last layers take fp32 activations (accuracy_level 1): their int8
    error reaches the logits with no layer after it to wash it out. lm_head_bits=4: the candidates
    are picked with a 4-bit copy of the lm_head (`as_4bit_candidates`, half the bytes read per
    token) and the top `rescore_top` scored exactly; needs rescore_top > 0."""
    if lm_head_bits == 4 and not rescore_top:
        raise ValueError("a 4-bit lm_head only picks candidates: it needs rescore_top > 0")
    if cfg.head_dim % 16:
        raise ValueError("GroupQueryAttention's fused rotary needs head_dim to be a multiple of 16")
    if cfg.hidden_size % BLOCK or cfg.intermediate_size % BLOCK:
        raise ValueError("hidden and intermediate sizes must be multiples of 32")
    fp32_names = frozenset(f"layers.{i}.{proj}" for i in range(cfg.num_layers - fp32_mlp_layers, cfg.num_layers)
                           for proj in ("gate_up_proj", "down_proj"))
    b = _Builder(cfg, accuracy_level, exact_q4, bits, fp32_names, fold)
    g = b.g
    eps = cfg.rms_eps
    hd = cfg.head_dim

    embed: QuantWeight = w["embed"]
    if embed.bits != 8 or embed.resid is not None:
        raise ValueError("the embedding must be 8-bit blocks (Q8_0)")
    embed_inputs = (g.const("model.embed_tokens.qweight", embed.q), g.const("model.embed_tokens.scales", embed.scale),
                    g.const("model.embed_tokens.zero_points", embed.zp))
    zero, one, two = (g.const(n, np.array([v], np.int64)) for n, v in (("zero", 0), ("one", 1), ("two", 2)))
    ids = "input_ids"
    if mixed:
        # Decode rows and the chunk as one sequence of tokens, [1, batch + chunk]: every projection
        # reads its weights once for both.
        batch = g.op("Shape", ["slots"])
        chunk = g.op("Slice", [g.op("Shape", ["chunk_ids"]), one, two])
        token_split = g.op("Concat", [batch, chunk], axis=0)
        flat = g.op("Reshape", ["input_ids", g.const("shape_one_row", np.array([1, -1], np.int64))])
        ids = g.op("Concat", [flat, "chunk_ids"], axis=1)
    x = g.op("GatherBlockQuantized", [embed_inputs[0], ids, *embed_inputs[1:]], domain=MS, hint="embeddings",
             gather_axis=0, quantize_axis=1, block_size=BLOCK, bits=8)

    # Rotary tables [max_positions, head_dim/2], rows are positions.
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.outer(np.arange(cfg.max_position_embeddings, dtype=np.float64), inv_freq)
    cos = g.const("cos_cache", np.cos(angles).astype(np.float32))
    sin = g.const("sin_cache", np.sin(angles).astype(np.float32))

    split_gate_up = g.const("split_gate_up", np.array([cfg.intermediate_size] * 2, np.int64))
    past_inputs, present_outputs = [], []
    # All cache rows' packed q/k/v start as zeros: [rows, seq, (heads + 2 * kv_heads) * head_dim].
    qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    rows = g.op("Slice", [g.op("Shape", ["past_key_values.0.key"]), zero, one])
    seq = g.op("Slice", [g.op("Shape", ["input_ids"]), one, two])
    hidden_width = cfg.num_heads * hd
    pool_shape = g.op("Concat", [rows, seq, g.const("qkv_width", np.array([qkv_width], np.int64))], axis=0)
    pool_zeros = g.op("ConstantOfShape", [pool_shape], value=helper.make_tensor("zero_f32", TensorProto.FLOAT, [1], [0.0]))
    slot_index = g.op("Unsqueeze", ["slots", g.const("axis_last_slot", np.array([-1], np.int64))])  # [batch, 1]
    h = g.op("SimplifiedLayerNormalization", [x, g.const("layers.0.attn_norm", w["layers.0.attn_norm"])],
             axis=-1, epsilon=eps, stash_type=1)
    residual = x
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        qkv = b.matmul(h, concat_rows([w[f"{p}.q"], w[f"{p}.k"], w[f"{p}.v"]]), f"{p}.qkv_proj")
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        past_inputs += [past_k, past_v]
        present_outputs += [pres_k, pres_v]
        attn = g.name(f"{p}.attn")
        if mixed:
            chunk_past_k, chunk_past_v = f"chunk_past_key_values.{i}.key", f"chunk_past_key_values.{i}.value"
            chunk_pres_k, chunk_pres_v = f"chunk_present.{i}.key", f"chunk_present.{i}.value"
            past_inputs += [chunk_past_k, chunk_past_v]
            present_outputs += [chunk_pres_k, chunk_pres_v]
            dec_qkv, chunk_qkv = g.op("Split", [qkv, token_split], n_out=2, axis=1)
            qkv = g.op("Reshape", [dec_qkv, g.const(g.name("shape_rows"), np.array([-1, 1, qkv_width], np.int64))])
            chunk_attn = g.name(f"{p}.chunk_attn")
            g.op("GroupQueryAttention", [chunk_qkv, "", "", chunk_past_k, chunk_past_v, "chunk_seqlens_k",
                                         "chunk_total_sequence_length", cos, sin],
                 outputs=[chunk_attn, chunk_pres_k, chunk_pres_v], domain=MS, num_heads=cfg.num_heads,
                 kv_num_heads=cfg.num_kv_heads, scale=float(1.0 / np.sqrt(hd)), do_rotary=1, rotary_interleaved=1,
                 local_window_size=-1)
            dec_attn = attn
            attn = g.name(f"{p}.attn_all")
        pool_qkv = g.op("ScatterND", [pool_zeros, slot_index, qkv])
        pool_attn = g.name(f"{p}.pool_attn")
        g.op("GroupQueryAttention", [pool_qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
             outputs=[pool_attn, pres_k, pres_v], domain=MS, num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads,
             scale=float(1.0 / np.sqrt(hd)), do_rotary=1, rotary_interleaved=1, local_window_size=-1)
        if mixed:
            g.op("Gather", [pool_attn, "slots"], outputs=[dec_attn], axis=0)
            dec_row = g.op("Reshape", [dec_attn, g.const(g.name("shape_one_row"), np.array([1, -1, hidden_width],
                                                                                        np.int64))])
            g.op("Concat", [dec_row, chunk_attn], outputs=[attn], axis=1)
        else:
            g.op("Gather", [pool_attn, "slots"], outputs=[attn], axis=0)
        o = b.matmul(attn, w[f"{p}.o"], f"{p}.o_proj")
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                 [o, residual, g.const(f"{p}.ffn_norm", w[f"{p}.ffn_norm"])],
                                 n_out=4, domain=MS, epsilon=eps)
        # gate and up read the same input: one MatMulNBits (one residual term), then a split.
        gate_up = b.matmul(h, concat_rows([w[f"{p}.gate"], w[f"{p}.up"]]), f"{p}.gate_up_proj")
        gate, up = g.op("Split", [gate_up, split_gate_up], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        down = b.matmul(act, w[f"{p}.down"], f"{p}.down_proj")
        norm = w[f"layers.{i + 1}.attn_norm"] if i + 1 < cfg.num_layers else w["final_norm"]
        norm_name = f"layers.{i + 1}.attn_norm" if i + 1 < cfg.num_layers else "final_norm"
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                 [down, residual, g.const(norm_name, norm)], n_out=4, domain=MS, epsilon=eps)

    # Only the last position's logits: generation never reads the others.
    if mixed:
        # Each decode row's position, then the chunk's last: [batch + 1, 1, hidden].
        n_tokens = g.op("Slice", [g.op("Shape", [ids]), one, two])
        picks = g.op("Concat", [g.op("Range", [g.const("range_start", np.array(0, np.int64)),
                                                g.op("Squeeze", [batch]), g.const("range_step", np.array(1, np.int64))]),
                                g.op("Sub", [n_tokens, one])], axis=0)
        last = g.op("Reshape", [g.op("Gather", [h, picks], axis=1),
                                g.const("shape_last_rows", np.array([-1, 1, cfg.hidden_size], np.int64))])
    else:
        last = g.op("Slice", [h, g.const("slice_last_start", np.array([-1], np.int64)),
                              g.const("slice_last_end", np.array([np.iinfo(np.int64).max], np.int64)),
                              g.const("slice_axis_1", np.array([1], np.int64))])
    # lm_head: MatMulNBits over the 8-bit rows (the tied embedding's Q8_0 blocks, as stored).
    head = w.get("lm_head", embed)
    picker = as_4bit_candidates(head) if lm_head_bits == 4 else head
    approx = g.op("MatMulNBits", [
        last,
        g.const("lm_head.qweight", _pack(picker.q, picker.bits)),
        g.const("lm_head.scales", picker.scale.reshape(-1).astype(np.float32)),
        g.const("lm_head.zero_points", _pack_zero_points(picker.zp, picker.bits)),
    ], outputs=["logits" if not rescore_top else "logits_int8"], domain=MS, K=cfg.hidden_size, N=cfg.vocab_size,
        bits=picker.bits, block_size=BLOCK, accuracy_level=accuracy_level)
    if rescore_top:
        # int8 activations can swap near-tied candidates. Re-score the top few in fp32 against their
        # exactly dequantized rows (GatherBlockQuantized), so the ranking at the top is the fp32 one.
        if head is embed:
            rows, scales, zero_points = embed_inputs
        else:
            rows, scales, zero_points = (g.const("lm_head.rows", head.q), g.const("lm_head.row_scales", head.scale),
                                         g.const("lm_head.row_zero_points", head.zp))
        _, top = g.op("TopK", [approx, g.const("rescore_k", np.array([rescore_top], np.int64))], n_out=2,
                      axis=-1, largest=1, sorted=0)  # [B, 1, k]
        candidates = g.op("GatherBlockQuantized", [rows, top, scales, zero_points], domain=MS, gather_axis=0,
                          quantize_axis=1, block_size=BLOCK, bits=8)  # [B, 1, k, H]
        minus_one = g.const("axis_last", np.array([-1], np.int64))
        exact = g.op("MatMul", [candidates, g.op("Unsqueeze", [last, minus_one])])  # [B, 1, k, 1]
        g.op("ScatterElements", [approx, top, g.op("Squeeze", [exact, minus_one])], outputs=["logits"], axis=-1)

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    kv_shape = ["cache_rows", cfg.num_kv_heads, "max_sequence_length", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("slots", i64, ["batch_size"]),
        helper.make_tensor_value_info("seqlens_k", i32, ["cache_rows"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    if mixed:
        inputs += [
            helper.make_tensor_value_info("chunk_ids", i64, [1, "chunk_length"]),
            helper.make_tensor_value_info("chunk_seqlens_k", i32, [1]),
            helper.make_tensor_value_info("chunk_total_sequence_length", i32, []),
        ]
    def kv_info(n: str):
        return helper.make_tensor_value_info(n, f32, [1, *kv_shape[1:]] if n.startswith("chunk_") else kv_shape)
    inputs += [kv_info(n) for n in past_inputs]
    logits_rows = "batch_size_plus_one" if mixed else "batch_size"
    outputs = [helper.make_tensor_value_info("logits", f32, [logits_rows, 1, cfg.vocab_size])] + [
        kv_info(n) for n in present_outputs]
    graph = helper.make_graph(g.nodes, "llama_fused_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name=producer)
    model.ir_version = 8
    return model
