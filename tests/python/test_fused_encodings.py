"""The fused builder's optional encodings (scripts/model_prep/llama_fused.py) against its default, on
the tiny model's weights, run by ONNX Runtime's Python API:

- `--q4-residual folded` (the residual as two 4-bit digits inside each projection's MatMulNBits)
  computes what the separate fp32 residual term computes: with fp32 activations the logits agree
  to the digits' rounding; dropping the residual does not come that close.
- `--lm-head-bits 4` (a 4-bit copy picks the candidates, the 8-bit rows score them) gives the
  re-scored candidates exactly the default's logits, so greedy decoding is unchanged.

The SmolLM2 figures of both (agreement, KL, speed) are in docs/models.md.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "model_prep"))
from llama_fused import build_fused_model  # noqa: E402
from make_tiny_model import CFG, SEED, quantized, random_weights  # noqa: E402
from llama_onnx import LlamaConfig  # noqa: E402

VOCAB = 384
RESCORE = 8
TOKENS = [5, 77, 140, 3, 201, 42, 99, 300]


@pytest.fixture(scope="module")
def weights():
    cfg = LlamaConfig(**{**CFG.__dict__, "vocab_size": VOCAB})
    return cfg, quantized(random_weights(cfg, np.random.default_rng(SEED)))


def logits_of(cfg, weights, **options) -> np.ndarray:
    """Teacher-forced logits of TOKENS, one decode step at a time, in a one-row cache."""
    model = build_fused_model(cfg, weights, producer="test", **options)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    max_len = 16
    past = [np.zeros((1, cfg.num_kv_heads, max_len, cfg.head_dim), np.float32) for _ in names]
    out = []
    for i, token in enumerate(TOKENS):
        feed = {"input_ids": np.array([[token]], np.int64), "slots": np.array([0], np.int64),
                "seqlens_k": np.array([i], np.int32), "total_sequence_length": np.array(i + 1, np.int32),
                **dict(zip(names, past))}
        logits, *present = session.run(None, feed)
        past = present
        out.append(logits[0, -1])
    return np.stack(out)


def test_the_folded_residual_computes_the_residual_term(weights):
    cfg, w = weights
    exact = logits_of(cfg, w, accuracy_level=1, rescore_top=0)
    folded = logits_of(cfg, w, accuracy_level=1, rescore_top=0, fold=True)
    dropped = logits_of(cfg, w, accuracy_level=1, rescore_top=0, exact_q4=False)
    folded_err, dropped_err = np.abs(folded - exact).max(), np.abs(dropped - exact).max()
    assert folded_err < 1e-3 * np.abs(exact).max(), f"folded differs by {folded_err}"
    assert folded_err * 10 < dropped_err, f"folded {folded_err} vs dropped {dropped_err}: not the residual term"
    assert (folded.argmax(-1) == exact.argmax(-1)).all()


def test_a_4bit_lm_head_only_picks_candidates(weights):
    cfg, w = weights
    default = logits_of(cfg, w, rescore_top=RESCORE)
    picked = logits_of(cfg, w, rescore_top=RESCORE, lm_head_bits=4)
    for row_default, row_picked in zip(default, picked):
        top = np.argsort(row_default)[-3:]
        # The best candidates were picked and scored by the same exact rows: identical logits.
        np.testing.assert_array_equal(row_picked[top], row_default[top])
        assert row_picked.argmax() == row_default.argmax()
    assert not np.array_equal(default, picked), "the 4-bit copy was not used for the other logits"
    with pytest.raises(ValueError, match="rescore_top"):
        build_fused_model(cfg, w, producer="test", rescore_top=0, lm_head_bits=4)
