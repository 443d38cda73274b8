"""Generate the tiny test model (models/tiny-llama): 2 layers, hidden 64, GQA 4/2 heads, a byte-level
BPE tokenizer trained on the text below. Random weights from a fixed seed; same Optimum layout and
graph builder as the real model, so tests of the KV cache, sampling and streaming run in
milliseconds against real ONNX Runtime.

    python make_tiny_model.py OUT_DIR [--fused DIR] [--no-past-fixture DIR]

--fused also writes the same weights, quantized (Q4_1 projections, Q8_0 embedding and lm_head,
round to nearest), as a fused-layout graph (llama_fused.py): the tests' model of that layout.

--no-past-fixture also writes a model that is valid ONNX but lacks the KV-cache inputs (an export
without `-with-past`), for the test that the loader names what is missing.

--attention-fixture also writes a graph of one GroupQueryAttention node with the fused layout's
attributes and every tensor an input, for the test of streamgate's attention kernel against ONNX
Runtime's (crates/inference/tests/attention.rs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_files import write_model_folder  # noqa: E402
from llama_fused import build_fused_model, quantize_q4_1, quantize_q8_0  # noqa: E402
from llama_onnx import LlamaConfig, build_model  # noqa: E402

SEED = 20261124
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mixed scripts on purpose: merges then include multi-byte characters, and the byte-level
# alphabet guarantees any UTF-8 text encodes (split across tokens where no merge covers it).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Streaming tokens to the browser, one event at a time.",
    "Server-sent events keep a connection open; each data line carries JSON and the stream ends with DONE.",
    "Café, naïve, résumé, déjà vu: accents travel as two bytes in UTF-8.",
    "中文字符需要三个字节。模型逐个生成标记。",
    "Emoji need four bytes: 🚀 🦀 ✨ 👍🏽 and the decoder must hold partial characters.",
    "Rust, ONNX Runtime, actix-web and a KV cache: 0 1 2 3 4 5 6 7 8 9.",
]

CFG = LlamaConfig(vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5, max_position_embeddings=256)


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def random_weights(cfg: LlamaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def mat(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    # An untied, unit-scale lm_head: a tied one makes a random model repeat its input token, and
    # large logits give clear top-2 margins, so greedy decoding is stable across harmless
    # floating-point differences between runtimes.
    w = {"embed": rng.standard_normal((cfg.vocab_size, h)).astype(np.float32),
         "lm_head": rng.standard_normal((cfg.vocab_size, h)).astype(np.float32),
         "final_norm": np.ones(h, np.float32)}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}"
        w |= {f"{p}.attn_norm": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
              f"{p}.q": mat(cfg.num_heads * hd, h), f"{p}.k": mat(cfg.num_kv_heads * hd, h),
              f"{p}.v": mat(cfg.num_kv_heads * hd, h), f"{p}.o": mat(h, cfg.num_heads * hd),
              f"{p}.ffn_norm": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
              f"{p}.gate": mat(i, h), f"{p}.up": mat(i, h), f"{p}.down": mat(h, i)}
    return w


def quantized(w: dict[str, np.ndarray]) -> dict:
    """What a GGUF of these weights holds: 8-bit embedding and lm_head, 4-bit projections, fp32 norms."""
    return {k: (quantize_q8_0(v) if k in ("embed", "lm_head") else quantize_q4_1(v) if v.ndim == 2 else v)
            for k, v in w.items()}


def write_no_past_fixture(out_dir: Path, tiny_dir: Path) -> None:
    """input_ids + attention_mask -> logits, no past_key_values: what a plain export looks like."""
    # The loader rejects it before running anything, so a 16-row table is enough.
    emb = numpy_helper.from_array(np.zeros((16, 16), np.float32), "embed")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["logits"], axis=0)], "no_past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 16])], initializer=[emb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamgate fixture")
    model.ir_version = 8
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_dir / "model.onnx"))
    shutil.copy(tiny_dir / "tokenizer.json", out_dir / "tokenizer.json")


def write_attention_fixture(out_dir: Path) -> None:
    """One GroupQueryAttention node as the fused graph has it (packed q/k/v, rotary fused and
    interleaved, past and present in one buffer): 6 query heads on 2 key/value heads of 64."""
    heads, kv_heads, hd = 6, 2, 64
    width = (heads + 2 * kv_heads) * hd
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
        scale=float(1.0 / np.sqrt(hd)), do_rotary=1, rotary_interleaved=1, local_window_size=-1)
    cache = ["batch", kv_heads, "max_len", hd]
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("query", f32, ["batch", "seq", width]),
         helper.make_tensor_value_info("past_key", f32, cache),
         helper.make_tensor_value_info("past_value", f32, cache),
         helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
         helper.make_tensor_value_info("total_sequence_length", i32, []),
         helper.make_tensor_value_info("cos_cache", f32, ["positions", hd // 2]),
         helper.make_tensor_value_info("sin_cache", f32, ["positions", hd // 2])],
        [helper.make_tensor_value_info("output", f32, ["batch", "seq", heads * hd]),
         helper.make_tensor_value_info("present_key", f32, cache),
         helper.make_tensor_value_info("present_value", f32, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="streamgate fixture")
    model.ir_version = 8
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_dir / "model.onnx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--fused", type=Path)
    ap.add_argument("--no-past-fixture", type=Path)
    ap.add_argument("--attention-fixture", type=Path)
    args = ap.parse_args()
    tok = train_tokenizer()
    cfg = LlamaConfig(**{**CFG.__dict__, "vocab_size": tok.get_vocab_size(with_added_tokens=True)})
    weights = random_weights(cfg, np.random.default_rng(SEED))
    folder = dict(bos_token="<|im_start|>", eos_token="<|im_end|>",
                  eos_ids=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
                  chat_template=CHAT_TEMPLATE, tied_embeddings=False)
    model = build_model(cfg, weights, producer="streamgate make_tiny_model")
    write_model_folder(args.out_dir, cfg, model, tok, name="streamgate/tiny-llama", **folder)
    if args.fused:
        blocks = quantized(weights)
        fused = build_fused_model(cfg, blocks, producer="streamgate make_tiny_model (fused)")
        mixed = build_fused_model(cfg, blocks, producer="streamgate make_tiny_model (fused, mixed step)", mixed=True)
        write_model_folder(args.fused, cfg, fused, tok, name="streamgate/tiny-llama-fused", mixed=mixed, **folder)
    if args.no_past_fixture:
        write_no_past_fixture(args.no_past_fixture, args.out_dir)
    if args.attention_fixture:
        write_attention_fixture(args.attention_fixture)
    print(f"wrote {args.out_dir} (vocab {cfg.vocab_size})")


if __name__ == "__main__":
    main()
