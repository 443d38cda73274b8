"""Paired A/B of fused-graph variants (model folders from `scripts/prepare_smollm2.sh DIR [options]`):
decode-step time with ONNX Runtime's Python API, and optionally the quality gate's numbers.

    python benches/python/graph_ab.py BASE_DIR VARIANT_DIR... [--rounds 30 --steps 5 --threads 2 --position 100]
        [--quality --reference .cache/models/smollm2-135m-instruct-fp32]

Every variant is loaded in this one process and the rounds alternate between them, so a slow
minute of a shared machine slows all of them. Each session's intra-op threads sleep between runs
(`session.intra_op.allow_spinning` 0): a spinning pool of the variant that just ran would take the
cores of the next one and bias the comparison (docs/benchmarks.md). A round is `--steps` decode
steps of one row after `--position` prompt positions (100, or 2000 for the long-context target);
the ratio reported is the median over rounds of base time / variant time *in the same round*, with
its interquartile range, for wall time and for CPU time.

With `--quality`: teacher-forced top-1 agreement and mean KL against the fp32 graph over
tests/data/quality_text.txt, as tests/python/test_quality.py measures the default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from ort_reference import FusedDecoder, OrtDecoder, open_session, teacher_forced  # noqa: E402

START = 100  # default prompt positions before the measured steps (--position)


def session(model: Path, threads: int) -> ort.InferenceSession:
    return open_session(model, threads, spinning=False)


def step_times(models: list[Path], rounds: int, steps: int, threads: int,
               start: int = START) -> dict[Path, tuple[list, list]]:
    """Per model: (wall ms per step, CPU ms per step) of each round, the rounds alternating."""
    state = []
    for model in models:
        decoder = FusedDecoder(model, threads, max_len=start + rounds * steps + 1, session=session(model, threads))
        logits, past = decoder.forward(list(range(100, 100 + start)), decoder.empty_past(), 0)
        state.append([decoder, past, logits, start])
    times: dict[Path, tuple[list, list]] = {m: ([], []) for m in models}
    for _ in range(rounds):
        for model, s in zip(models, state):
            decoder, past, logits, done = s
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                logits, past = decoder.forward([int(np.argmax(logits))], past, done)
                done += 1
            times[model][0].append((time.perf_counter() - wall) / steps * 1e3)
            times[model][1].append((time.process_time() - cpu) / steps * 1e3)
            s[1:] = [past, logits, done]
    return times


def quality(model: Path, reference: np.ndarray, ids: list[int], threads: int) -> tuple[float, float]:
    """(top-1 agreement, mean KL(fp32 || model)) teacher-forced over `ids`."""
    decoder = FusedDecoder(model, threads, max_len=len(ids), session=session(model, threads))
    return teacher_forced(decoder, reference, ids)


def ratio_text(base: list[float], other: list[float]) -> str:
    r = np.array(base) / np.array(other)
    return f"{np.median(r):.3f}x (IQR {np.percentile(r, 25):.3f}-{np.percentile(r, 75):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+", help="model folders; the first is the base")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position", type=int, default=START, help="prompt positions before the measured steps")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--reference", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct-fp32")
    ap.add_argument("--text", type=Path, default=ROOT / "tests" / "data" / "quality_text.txt")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1 or args.position < 1:
        ap.error("--rounds, --steps, --threads and --position must be at least 1")
    for model in args.models:
        if not (model / "model.onnx").is_file():
            ap.error(f"{model} has no model.onnx")
    ort.set_default_logger_severity(3)

    times = step_times(args.models, args.rounds, args.steps, args.threads, args.position)
    base_wall, base_cpu = times[args.models[0]]
    print("| model | wall ms/step (median) | wall vs base | CPU vs base |")
    print("| --- | --- | --- | --- |")
    for model in args.models:
        wall, cpu = times[model]
        print(f"| {model} | {np.median(wall):.2f} | {ratio_text(base_wall, wall)} | {ratio_text(base_cpu, cpu)} |")

    if args.quality:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(args.models[0] / "tokenizer.json")).encode(
            args.text.read_text(encoding="utf-8")).ids
        reference = OrtDecoder(args.reference, args.threads).all_logits(ids)
        print()
        print(f"| model | top-1 agreement with fp32 ({len(ids) - 1} tokens) | mean KL (nats) |")
        print("| --- | --- | --- |")
        for model in args.models:
            agreement, kl = quality(model, reference, ids, args.threads)
            print(f"| {model} | {agreement * 100:.2f} % | {kl:.5f} |")


if __name__ == "__main__":
    main()
