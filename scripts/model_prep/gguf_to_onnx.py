"""Convert a LLaMA-architecture GGUF file (e.g. SmolLM2-135M-Instruct) into an ONNX model folder:
model.onnx + tokenizer.json + config/generation/tokenizer config.

    python gguf_to_onnx.py MODEL.gguf OUT_DIR [--layout fused|optimum]

--layout fused (the default model): one fused graph of ONNX Runtime contrib ops built from the GGUF's
own quantized blocks (llama_fused.py): MatMulNBits, GroupQueryAttention with rotary and a shared KV
buffer, SkipSimplifiedLayerNormalization.
--layout optimum: the fp32 Optimum "text-generation-with-past" layout (llama_onnx.py), weights
dequantized to float32; the reference the fused graph is measured against.

GGUF keeps the q/k projections permuted for interleaved rotary embeddings; both graphs rotate
adjacent pairs to match, so the weights are used as stored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_files import write_model_folder  # noqa: E402
from llama_fused import build_fused_model, q4_1_blocks, q8_0_blocks  # noqa: E402
from llama_onnx import LlamaConfig, build_model  # noqa: E402

GGUF_CONTROL_TOKEN = 3
# Our names for a layer's tensors -> GGUF's (blk.{i}.NAME.weight).
LAYER_TENSORS = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                 "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise SystemExit(f"GGUF metadata is missing '{key}'")
    return f.contents()


def read_config(reader: GGUFReader) -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"unsupported GGUF architecture '{arch}' (expected 'llama')")
    hidden = int(field(reader, "llama.embedding_length"))
    heads = int(field(reader, "llama.attention.head_count"))
    return LlamaConfig(
        vocab_size=len(field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=int(field(reader, "llama.feed_forward_length")),
        num_layers=int(field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, "llama.attention.head_count_kv")),
        head_dim=hidden // heads,
        rope_theta=float(field(reader, "llama.rope.freq_base")),
        rms_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field(reader, "llama.context_length")),
    )


def read_weights(reader: GGUFReader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32, in [out, in] orientation (numpy order of GGUF data)."""
    raw = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        raw[t.name] = arr.reshape([int(d) for d in reversed(t.shape.tolist())]) if arr.ndim != len(t.shape) else arr
    w = {"embed": raw.pop("token_embd.weight"), "final_norm": raw.pop("output_norm.weight")}
    if "output.weight" in raw:
        w["lm_head"] = raw.pop("output.weight")
    for i in range(cfg.num_layers):
        for ours, theirs in LAYER_TENSORS.items():
            w[f"layers.{i}.{ours}"] = raw.pop(f"blk.{i}.{theirs}.weight")
    if raw:
        raise SystemExit(f"unexpected GGUF tensors: {sorted(raw)[:5]}")
    return w


def read_blocks(reader: GGUFReader, cfg: LlamaConfig) -> dict:
    """The GGUF's tensors as they are stored: Q4_1 / Q8_0 matrices as quantized blocks, F32 as arrays."""
    readers = {"Q4_1": q4_1_blocks, "Q8_0": q8_0_blocks}
    raw = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind == "F32":
            raw[t.name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif kind in readers:
            k, n = (int(d) for d in t.shape.tolist())
            raw[t.name] = readers[kind](np.asarray(t.data), n, k)
        else:
            raise SystemExit(f"{t.name}: GGUF type {kind} is not supported by the fused layout "
                             "(Q4_1, Q8_0 and F32 are); use --layout optimum")
    w = {"embed": raw.pop("token_embd.weight"), "final_norm": raw.pop("output_norm.weight")}
    if "output.weight" in raw:
        w["lm_head"] = raw.pop("output.weight")
    if getattr(w["embed"], "bits", None) != 8:
        raise SystemExit("the fused layout needs a Q8_0 token embedding; use --layout optimum")
    for i in range(cfg.num_layers):
        for ours, theirs in LAYER_TENSORS.items():
            w[f"layers.{i}.{ours}"] = raw.pop(f"blk.{i}.{theirs}.weight")
    if raw:
        raise SystemExit(f"unexpected GGUF tensors: {sorted(raw)[:5]}")
    return w


def build_tokenizer(reader: GGUFReader) -> tuple[Tokenizer, list[str]]:
    """Byte-level BPE from the GGUF vocabulary and merges, with control tokens as special tokens."""
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM's pre-tokenizer ('smollm' in llama.cpp): digits split one by one, then GPT-2's regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layout", choices=["fused", "optimum"], default="fused")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=[1, 4],
                    help="MatMulNBits accuracy_level for the fused layout: 4 = int8 activations, 1 = fp32")
    ap.add_argument("--q4-residual", choices=["exact", "none", "folded"], default="exact",
                    help="fused layout: Q4_1's per-block residual as its own fp32 term (exact), inside the "
                         "projection's MatMulNBits as two 4-bit digits (folded), or dropped (none)")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4,
                    help="fused layout: 4 = the GGUF's 4-bit blocks plus residual, 8 = re-encoded as 8-bit codes")
    ap.add_argument("--fp32-mlp-layers", type=int, default=1,
                    help="fused layout: the MLP projections of this many last layers take fp32 activations")
    ap.add_argument("--rescore-top", type=int, default=16,
                    help="fused layout: re-score the lm_head's best N candidates in fp32 (0: off)")
    ap.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=8,
                    help="fused layout: 8 = the GGUF's Q8_0 lm_head as stored; 4 = a 4-bit copy picks the "
                         "--rescore-top candidates, the 8-bit rows score them")
    ap.add_argument("--no-mixed", action="store_true",
                    help="fused layout: do not write model_mixed.onnx, the graph that runs decode rows and a "
                         "prompt chunk in one pass (the engine then runs them one after the other)")
    args = ap.parse_args()

    reader = GGUFReader(str(args.gguf))
    cfg = read_config(reader)
    tok, tokens = build_tokenizer(reader)
    eos_id = int(field(reader, "tokenizer.ggml.eos_token_id"))
    bos_id = int(field(reader, "tokenizer.ggml.bos_token_id"))
    template = reader.fields.get("tokenizer.chat_template")
    mixed = None
    if args.layout == "fused":
        weights = read_blocks(reader, cfg)
        options = dict(accuracy_level=args.accuracy_level, exact_q4=args.q4_residual != "none",
                       fold=args.q4_residual == "folded", bits=args.bits, rescore_top=args.rescore_top,
                       fp32_mlp_layers=args.fp32_mlp_layers, lm_head_bits=args.lm_head_bits)
        model = build_fused_model(cfg, weights, producer="streamgate gguf_to_onnx (fused)", **options)
        if not args.no_mixed:
            mixed = build_fused_model(cfg, weights, producer="streamgate gguf_to_onnx (fused, mixed step)",
                                      mixed=True, **options)
    else:
        weights = read_weights(reader, cfg)
        model = build_model(cfg, weights, producer="streamgate gguf_to_onnx")
    tied = "lm_head" not in weights
    write_model_folder(
        args.out_dir, cfg, model, tok,
        bos_token=tokens[bos_id], eos_token=tokens[eos_id], eos_ids=[eos_id],
        chat_template=template.contents() if template is not None else None,
        name=str(field(reader, "general.name")), tied_embeddings=tied, mixed=mixed,
    )
    print(f"wrote {args.out_dir} ({args.layout} layout, {cfg.num_layers} layers, vocab {cfg.vocab_size})")


if __name__ == "__main__":
    main()
