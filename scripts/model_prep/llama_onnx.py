"""Build a LLaMA-family decoder as an ONNX graph in Hugging Face Optimum's layout.

The graph is what `optimum-cli export onnx --task text-generation-with-past` produces for a
LLaMA model, so the Rust crate loads our bundled models and users' own exports the same way:

    inputs : input_ids        int64 [batch, seq]
             attention_mask   int64 [batch, past + seq]
             position_ids     int64 [batch, seq]
             past_key_values.{i}.key / .value   float32 [batch, kv_heads, past, head_dim]
    outputs: logits           float32 [batch, seq, vocab]
             present.{i}.key / .value           float32 [batch, kv_heads, past + seq, head_dim]

Rotary embeddings rotate *adjacent pairs* (2i, 2i+1): GGUF stores the q/k projection rows
permuted for that interleaved form, and we keep its weights as they are. Grouped-query attention
broadcasts each KV head over its group of query heads with a 5-D MatMul instead of copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
EMBED = "model.embed_tokens.weight"
MASK_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_position_embeddings: int


class _Graph:
    """Tiny helper that names nodes and collects initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray, exact: bool = False) -> str:
        name = hint if exact else self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: list[str] | None = None,
           n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        """Add a node; `domain` names a contrib-op domain (e.g. com.microsoft), "" for standard ONNX."""
        if outputs is None:
            outputs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        if domain:
            attrs["domain"] = domain
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, eps: float, hint: str) -> str:
    sq = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    eps_c = g.const("eps", np.array(eps, dtype=np.float32))
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, eps_c])])])
    w = g.const(f"{hint}.weight", weight.astype(np.float32))
    return g.op("Mul", [g.op("Mul", [x, inv]), w], hint=hint)


def _linear(g: _Graph, x: str, weight_out_in: np.ndarray, hint: str) -> str:
    """x @ W^T, storing W^T ([in, out]) so MatMul needs no runtime transpose."""
    w = g.const(f"{hint}.weight", weight_out_in.astype(np.float32).T)
    return g.op("MatMul", [x, w], hint=hint)


def _rope_pairs(g: _Graph, x: str, cos: str, sin: str, head_dim: int, shp: dict) -> str:
    """Rotate adjacent pairs of x [B, H, S, D] by the angles in cos/sin [B, 1, S, D/2, 1]."""
    pairs = g.op("Reshape", [x, shp["pairs"]])  # [B, H, S, D/2, 2]
    x0, x1 = g.op("Split", [pairs, shp["split_1_1"]], axis=4, n_out=2)
    out0 = g.op("Sub", [g.op("Mul", [x0, cos]), g.op("Mul", [x1, sin])])
    out1 = g.op("Add", [g.op("Mul", [x0, sin]), g.op("Mul", [x1, cos])])
    return g.op("Reshape", [g.op("Concat", [out0, out1], axis=4), shp["heads_flat"]])


def build_model(cfg: LlamaConfig, weights: dict[str, np.ndarray], producer: str) -> onnx.ModelProto:
    """Return the ONNX model. `weights` uses Hugging Face orientation ([out, in]) and keys:
    embed, final_norm, optional lm_head, and layers.{i}.{attn_norm,q,k,v,o,ffn_norm,gate,up,down}."""
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    g = _Graph()
    group = cfg.num_heads // cfg.num_kv_heads
    hd = cfg.head_dim

    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    shp = {
        "pairs": g.const("shape_pairs", i64(0, 0, 0, hd // 2, 2)),
        "heads_flat": g.const("shape_heads_flat", i64(0, 0, 0, hd)),
        "split_1_1": g.const("split_1_1", i64(1, 1)),
    }
    q_heads = g.const("shape_q_heads", i64(0, 0, cfg.num_heads, hd))
    kv_heads = g.const("shape_kv_heads", i64(0, 0, cfg.num_kv_heads, hd))
    q_groups = g.const("shape_q_groups", i64(0, cfg.num_kv_heads, group, -1, hd))
    attn_merge = g.const("shape_attn_merge", i64(0, cfg.num_heads, -1, hd))
    hidden_flat = g.const("shape_hidden", i64(0, 0, cfg.num_heads * hd))
    ax = {k: g.const(f"axes_{k}", i64(*v)) for k, v in
          {"0": (0,), "1": (1,), "2": (2,), "1_2": (1, 2), "1_4": (1, 4)}.items()}

    # ---- attention mask: causal over [past, past + seq) and padding, as an additive bias [B,1,1,S,T]
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("idx1", np.array(1, dtype=np.int64))], axis=0)
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("idx1", np.array(1, dtype=np.int64))],
                     axis=0)
    past_len = g.op("Sub", [total_len, seq_len])
    zero = g.const("zero", np.array(0, dtype=np.int64))
    one = g.const("one", np.array(1, dtype=np.int64))
    key_pos = g.op("Unsqueeze", [g.op("Range", [zero, total_len, one]), ax["0"]])  # [1, T]
    query_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total_len, one]), ax["1"]])  # [S, 1]
    causal = g.op("LessOrEqual", [key_pos, query_pos])  # [S, T]
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), ax["1_2"]])  # [B,1,1,T]
    allowed = g.op("Unsqueeze", [g.op("And", [causal, padding]), ax["1"]])  # [B,1,1,S,T]
    mask = g.op("Where", [allowed, g.const("mask_zero", np.array(0.0, dtype=np.float32)),
                          g.const("mask_min", np.array(MASK_MIN, dtype=np.float32))], hint="mask")

    # ---- rotary angles from position_ids: cos/sin [B, 1, S, D/2, 1]
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), ax["2"]]),
                         g.const("inv_freq", inv_freq.astype(np.float32))])
    cos = g.op("Unsqueeze", [g.op("Cos", [freqs]), ax["1_4"]], hint="cos")
    sin = g.op("Unsqueeze", [g.op("Sin", [freqs]), ax["1_4"]], hint="sin")
    scale = g.const("attn_scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))

    x = g.op("Gather", [g.const(EMBED, weights["embed"].astype(np.float32), exact=True), "input_ids"],
             axis=0, hint="embeddings")
    past_inputs, present_outputs = [], []
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        h = _rms_norm(g, x, weights[f"{p}.attn_norm"], cfg.rms_eps, f"{p}.input_layernorm")
        to_heads = lambda t, s: g.op("Transpose", [g.op("Reshape", [t, s])], perm=[0, 2, 1, 3])  # noqa: E731
        q = to_heads(_linear(g, h, weights[f"{p}.q"], f"{p}.q_proj"), q_heads)
        k = to_heads(_linear(g, h, weights[f"{p}.k"], f"{p}.k_proj"), kv_heads)
        v = to_heads(_linear(g, h, weights[f"{p}.v"], f"{p}.v_proj"), kv_heads)
        q = _rope_pairs(g, q, cos, sin, hd, shp)
        k = _rope_pairs(g, k, cos, sin, hd, shp)

        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        past_inputs += [past_k, past_v]
        present_outputs += [pres_k, pres_v]
        g.op("Concat", [past_k, k], outputs=[pres_k], axis=2)
        g.op("Concat", [past_v, v], outputs=[pres_v], axis=2)

        q5 = g.op("Reshape", [q, q_groups])  # [B, KV, G, S, D]
        k5t = g.op("Transpose", [g.op("Unsqueeze", [pres_k, ax["2"]])], perm=[0, 1, 2, 4, 3])  # [B, KV, 1, D, T]
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q5, k5t]), scale]), mask])
        probs = g.op("Softmax", [scores], axis=-1)
        attn = g.op("MatMul", [probs, g.op("Unsqueeze", [pres_v, ax["2"]])])  # [B, KV, G, S, D]
        attn = g.op("Transpose", [g.op("Reshape", [attn, attn_merge])], perm=[0, 2, 1, 3])  # [B, S, H, D]
        attn = _linear(g, g.op("Reshape", [attn, hidden_flat]), weights[f"{p}.o"], f"{p}.o_proj")
        x = g.op("Add", [x, attn])

        h = _rms_norm(g, x, weights[f"{p}.ffn_norm"], cfg.rms_eps, f"{p}.post_attention_layernorm")
        gate = _linear(g, h, weights[f"{p}.gate"], f"{p}.gate_proj")
        up = _linear(g, h, weights[f"{p}.up"], f"{p}.up_proj")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        x = g.op("Add", [x, _linear(g, g.op("Mul", [silu, up]), weights[f"{p}.down"], f"{p}.down_proj")])

    x = _rms_norm(g, x, weights["final_norm"], cfg.rms_eps, "norm")
    # lm_head: Gemm with transB reads the (possibly tied) [vocab, hidden] matrix without a copy.
    flat = g.op("Reshape", [x, g.const("shape_rows", i64(-1, cfg.hidden_size))])
    head = weights.get("lm_head")
    head_name = g.const("lm_head.weight", head.astype(np.float32), exact=True) if head is not None else EMBED
    rows = g.op("Gemm", [flat, head_name], transB=1)
    out_shape = g.op("Concat", [g.op("Slice", [g.op("Shape", ["input_ids"]), g.const("s0", i64(0)),
                                               g.const("s2", i64(2))]),
                                g.const("vocab", i64(cfg.vocab_size))], axis=0)
    g.op("Reshape", [rows, out_shape], outputs=["logits"])

    f32, i64t = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64t, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64t, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", i64t, ["batch_size", "sequence_length"]),
    ] + [helper.make_tensor_value_info(n, f32, ["batch_size", cfg.num_kv_heads, "past_sequence_length", hd])
         for n in past_inputs]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", cfg.vocab_size])] + [
        helper.make_tensor_value_info(n, f32, ["batch_size", cfg.num_kv_heads, "total_sequence_length", hd])
        for n in present_outputs]
    graph = helper.make_graph(g.nodes, "llama_decoder_with_past", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
