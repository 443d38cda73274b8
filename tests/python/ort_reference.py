"""The reference decode loop with ONNX Runtime's Python API: KV cache, greedy, as a FastAPI
handler would run it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_session(model_dir: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    """spinning=False: the intra-op threads sleep between runs, so several sessions in one process
    do not take each other's cores (what an A/B of variants needs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])


class GreedyLoop:
    """The greedy KV-cache loop, over a decoder's `empty_past` and `forward(ids, past, done)`."""

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


class OrtDecoder(GreedyLoop):
    def __init__(self, model_dir: Path, threads: int, session: ort.InferenceSession | None = None) -> None:
        self.session = session or open_session(model_dir, threads)
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

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` in one pass ([len(ids), vocab]): teacher forcing."""
        feed = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None, :],
            **self.empty_past(),
        }
        return self.session.run(["logits"], feed)[0][0]


class FusedDecoder(GreedyLoop):
    """The fused layout (scripts/model_prep/llama_fused.py): one KV buffer per layer of `max_len`
    positions, bound as both `past_key_values.*` and `present.*`, so GroupQueryAttention writes new
    positions in place; `seqlens_k` / `total_sequence_length` say how many are valid. One cache row
    (`slots` = [0]): the engine's pool of rows is its own business."""

    def __init__(self, model_dir: Path, threads: int, max_len: int = 2048,
                 session: ort.InferenceSession | None = None) -> None:
        self.session = session or open_session(model_dir, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        assert "seqlens_k" in inputs, "not a fused-layout model"
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        first = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim, self.max_len = first.shape[1], first.shape[3], max_len

    def empty_past(self) -> list:
        shape = (1, self.kv_heads, self.max_len, self.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.past_names]

    def forward(self, ids: list[int], past: list, done: int):
        total = done + len(ids)
        if total > self.max_len:
            raise ValueError(f"{total} positions do not fit a cache of {self.max_len}")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([ids], np.int64))
        binding.bind_cpu_input("slots", np.array([0], np.int64))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_output("logits")  # first, so it is get_outputs()[0]
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0, -1], past


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced(decoder: GreedyLoop, reference: np.ndarray, ids: list[int]) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || decoder)) of `decoder` fed `ids` one token at a time,
    against `reference` logits ([len(ids), vocab], row i predicting token i + 1: `all_logits`)."""
    past, rows = decoder.empty_past(), []
    for i, token in enumerate(ids[:-1]):
        logits, past = decoder.forward([token], past, i)
        rows.append(logits)
    return agreement_and_kl(np.stack(rows), reference)


def agreement_and_kl(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || logits)) of logits rows against the first as many
    reference rows."""
    reference = reference[: len(logits)]
    p, q = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return float(np.mean(np.argmax(logits, -1) == np.argmax(reference, -1))), float(np.mean(kl))


def decoder_for(model_dir: Path, threads: int):
    """The reference decoder for either layout, told apart by the graph's inputs (one session)."""
    session = open_session(model_dir, threads)
    fused = any(i.name == "seqlens_k" for i in session.get_inputs())
    return (FusedDecoder if fused else OrtDecoder)(model_dir, threads, session=session)
