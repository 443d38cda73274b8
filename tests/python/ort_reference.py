"""The reference decode loop with ONNX Runtime's Python API: KV cache, greedy, as a FastAPI
handler would run it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OrtDecoder:
    def __init__(self, model_dir: Path, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def forward(self, ids: list[int], past: dict[str, np.ndarray], done: int):
        feed = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, done + len(ids)), np.int64),
            "position_ids": np.arange(done, done + len(ids), dtype=np.int64)[None, :],
            **past,
        }
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        new_past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        return out["logits"][0, -1], new_past

    def greedy(self, prompt_ids: list[int], steps: int, eos: set[int]) -> tuple[np.ndarray, list[int]]:
        logits, past = self.forward(prompt_ids, self.empty_past(), 0)
        first = logits.copy()
        done, ids = len(prompt_ids), []
        for _ in range(steps):
            token = int(np.argmax(logits))
            ids.append(token)
            if token in eos:
                break
            logits, past = self.forward([token], past, done)
            done += 1
        return first, ids
