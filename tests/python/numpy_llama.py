"""An independent LLaMA forward pass in numpy, straight from the GGUF weights.

It shares no code with the converter (scripts/model_prep): it undoes llama.cpp's q/k permutation
to get Hugging Face's weight layout back and uses Hugging Face's rotate-half rotary embedding,
so a mistake in the converter's pairwise rotation, GQA grouping, norms or weight orientation shows
up as a mismatch instead of hiding behind a self-consistent ONNX file. float64 throughout.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute: rows [h, d/2, 2] -> [h, 2, d/2]."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class NumpyLlama:
    def __init__(self, gguf_path: str) -> None:
        r = GGUFReader(gguf_path)
        meta = lambda k: r.fields[k].contents()  # noqa: E731
        self.layers = int(meta("llama.block_count"))
        self.heads = int(meta("llama.attention.head_count"))
        self.kv_heads = int(meta("llama.attention.head_count_kv"))
        self.hidden = int(meta("llama.embedding_length"))
        self.head_dim = self.hidden // self.heads
        self.theta = float(meta("llama.rope.freq_base"))
        self.eps = float(meta("llama.attention.layer_norm_rms_epsilon"))
        self.w = {}
        for t in r.tensors:
            arr = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = arr.reshape([int(d) for d in reversed(t.shape.tolist())])
        for i in range(self.layers):
            self.w[f"blk.{i}.attn_q.weight"] = _unpermute(self.w[f"blk.{i}.attn_q.weight"], self.heads)
            self.w[f"blk.{i}.attn_k.weight"] = _unpermute(self.w[f"blk.{i}.attn_k.weight"], self.kv_heads)

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Hugging Face rotate_half on [heads, seq, dim]."""
        d = self.head_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2) / d))
        ang = np.concatenate([pos[:, None] * inv[None, :]] * 2, axis=-1)  # [seq, d]
        rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
        return x * np.cos(ang) + rot * np.sin(ang)

    def last_logits(self, ids: list[int]) -> np.ndarray:
        w, s, d = self.w, len(ids), self.head_dim
        x = w["token_embd.weight"][ids]  # [seq, hidden]
        pos = np.arange(s, dtype=np.float64)
        causal = np.triu(np.full((s, s), -np.inf), k=1)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"blk.{i}."
            h = self._norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(s, self.heads, d).transpose(1, 0, 2)
            k = (h @ w[p + "attn_k.weight"].T).reshape(s, self.kv_heads, d).transpose(1, 0, 2)
            v = (h @ w[p + "attn_v.weight"].T).reshape(s, self.kv_heads, d).transpose(1, 0, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # HF repeat_kv
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v  # [heads, seq, d]
            x = x + attn.transpose(1, 0, 2).reshape(s, -1) @ w[p + "attn_output.weight"].T
            h = self._norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = self._norm(x[-1], w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return head @ x
