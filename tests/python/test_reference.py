"""This crate against references it does not share code with:

- ONNX Runtime's own Python API running the same model (greedy ids for 32+ steps, first-step logits
  within 1e-4), for the tiny model and SmolLM2, in both graph layouts (fused and Optimum);
- the `tokenizers` Python package (same token ids for a range of texts);
- for SmolLM2, an independent numpy forward pass of the original GGUF weights, so a conversion
  mistake cannot hide behind a self-consistent ONNX file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import CACHE, SMOLLM2, SMOLLM2_FP32, THREADS, TINY, TINY_FUSED, require
from ort_reference import OrtDecoder, decoder_for

STEPS = 32
TEXTS = [
    "Hello world",
    "The year 2026 has 365 days; 1234567890.",
    "Café 中文 🚀 emoji 👍🏽 naïve déjà-vu’s “quotes”",
    "  leading spaces\n\n\ttabs and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x**2  # comment",
]
SMOL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
)
TINY_PROMPT = "<|im_start|>user\nStreaming tokens to the browser<|im_end|>\n<|im_start|>assistant\n"


def eos_ids(model_dir) -> set[int]:
    gen = json.loads((model_dir / "generation_config.json").read_text())
    ids = gen["eos_token_id"]
    return set(ids if isinstance(ids, list) else [ids])


def check_against_ort(rust_dump, model_dir, prompt: str) -> None:
    require(model_dir / "model.onnx", "run `make setup`")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # ONNX Runtime's attention kernel: the same arithmetic as the Python API, so that logits agree
    # to rounding and greedy ids exactly. (streamgate's kernel agrees with it to 2e-7 per node,
    # tests/attention.rs, but the int8 activations amplify that; test_quality.py gates it.)
    ours = rust_dump(model_dir, prompt, STEPS, TEXTS, ort_attention=True)

    assert ours["prompt_ids"] == tok.encode(prompt).ids
    for text, ids in zip(TEXTS, ours["encodings"]):
        assert ids == tok.encode(text).ids, f"tokenization differs for {text!r}"

    first, greedy = decoder_for(model_dir, THREADS).greedy(ours["prompt_ids"], STEPS, eos_ids(model_dir))
    diff = np.abs(np.array(ours["first_logits"], np.float32) - first).max()
    assert diff < 1e-4, f"first-step logits differ by {diff}"
    assert len(greedy) >= STEPS, "pick a prompt that runs at least 32 steps"
    assert ours["greedy_ids"] == greedy
    assert ours["finish_reason"] == "length"


def test_tiny_model_matches_onnxruntime_python(rust_dump):
    check_against_ort(rust_dump, TINY, TINY_PROMPT)


def test_tiny_fused_model_matches_onnxruntime_python(rust_dump):
    check_against_ort(rust_dump, TINY_FUSED, TINY_PROMPT)


def test_smollm2_matches_onnxruntime_python(rust_dump):
    """The default model (fused layout): the Rust engine runs it exactly as ONNX Runtime's Python API does."""
    check_against_ort(rust_dump, SMOLLM2, SMOL_PROMPT)


def test_smollm2_fp32_matches_onnxruntime_python(rust_dump):
    """The fp32 Optimum graph of the same GGUF, the layout of users' own exports."""
    check_against_ort(rust_dump, SMOLLM2_FP32, SMOL_PROMPT)


def test_smollm2_conversion_matches_numpy_forward_of_gguf():
    """The fp32 graph is the GGUF's model: the fused graph is measured against it (test_quality.py)."""
    from numpy_llama import NumpyLlama

    gguf_path = require(CACHE / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf", "run `make setup`")
    tok = Tokenizer.from_file(str(require(SMOLLM2_FP32 / "tokenizer.json", "run `make reference-model`")))
    ids = tok.encode(SMOL_PROMPT).ids
    reference = NumpyLlama(str(gguf_path)).last_logits(ids)
    fp32 = OrtDecoder(SMOLLM2_FP32, THREADS)
    onnx_logits, _ = fp32.forward(ids, fp32.empty_past(), 0)
    onnx_logits = onnx_logits.astype(np.float64)

    # float32 ONNX vs float64 numpy over 30 layers: seen here 4e-5 on logits of magnitude ~26.
    diff = np.abs(onnx_logits - reference).max()
    assert diff < 1e-3, f"converted model disagrees with the GGUF forward pass by {diff}"
    assert np.argmax(onnx_logits) == np.argmax(reference)
    assert list(np.argsort(onnx_logits)[-5:]) == list(np.argsort(reference)[-5:])
    assert np.corrcoef(onnx_logits, reference)[0, 1] > 0.9999


@pytest.mark.parametrize("prompt", ["What is the capital of France?"])
def test_smollm2_answers_a_known_question(rust_dump, prompt):
    """A sanity check of the whole conversion (the fp32 graph): a question with a clear answer.

    With this system prompt the first token is a near-tie in fp32 ("The" 25.33, "L" 25.24): the
    fused int8-activation graph picks "L" ("L'Étoile, la Marseillaise, ..."), exactly as llama.cpp
    does on the same GGUF. test_quality.py checks the fused graph where margins are clear."""
    chat = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    ours = rust_dump(SMOLLM2_FP32, chat, 16)
    text = Tokenizer.from_file(str(SMOLLM2_FP32 / "tokenizer.json")).decode(ours["greedy_ids"])
    assert "Paris" in text
