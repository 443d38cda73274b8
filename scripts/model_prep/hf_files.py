"""Write the Hugging Face side files of a model folder (config, generation and tokenizer config).

These are the files `optimum-cli export onnx` leaves beside `model.onnx`; the Rust crate reads
the same ones from a user's own export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from llama_onnx import LlamaConfig


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_folder(out_dir: Path, cfg: LlamaConfig, model: onnx.ModelProto, tokenizer, *,
                       bos_token: str, eos_token: str, eos_ids: list[int], chat_template: str | None,
                       name: str, tied_embeddings: bool = True, mixed: onnx.ModelProto | None = None) -> None:
    """Write everything into a temporary sibling folder, then rename it into place, so an
    interrupted run never leaves a folder that looks complete. `mixed`: the fused layout's
    mixed-step graph (decode rows and a prompt chunk in one pass), saved as model_mixed.onnx."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        onnx.save_model(model, str(tmp / "model.onnx"))
        if mixed is not None:
            onnx.save_model(mixed, str(tmp / "model_mixed.onnx"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        write_json(tmp / "config.json", {
            "_name_or_path": name,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_eps,
            "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": tied_embeddings,
            "bos_token_id": vocab[bos_token],
            "eos_token_id": eos_ids[0],
            "torch_dtype": "float32",
        })
        write_json(tmp / "generation_config.json", {
            "bos_token_id": vocab[bos_token],
            "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
            "pad_token_id": eos_ids[0],
        })
        tok_cfg = {
            "add_bos_token": False,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": eos_token,
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "GPT2Tokenizer",
        }
        if chat_template is not None:
            tok_cfg["chat_template"] = chat_template
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / "special_tokens_map.json", {"bos_token": bos_token, "eos_token": eos_token,
                                                     "pad_token": eos_token})
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
