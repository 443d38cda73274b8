"""The same single-stream benchmark as `engine-bench`, written the way a FastAPI handler would
run the model: ONNX Runtime's Python API, KV cache, greedy, tokenizer decode per token.

    python ort_loop.py --model DIR --prompt TEXT --tokens 64 --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from ort_reference import OrtDecoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    decoder = OrtDecoder(args.model, args.threads)
    for run in range(args.runs + 1):  # run 0 warms up
        started = time.perf_counter()
        ids = tok.encode(args.prompt).ids
        logits, past = decoder.forward(ids, decoder.empty_past(), 0)
        done, generated, first = len(ids), [], None
        for _ in range(args.tokens):
            token = int(np.argmax(logits))
            generated.append(token)
            tok.decode(generated[-4:])  # what a handler does to emit text
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            if len(generated) == args.tokens:
                break
            logits, past = decoder.forward([token], past, done)
            done += 1
        if run == 0:
            continue
        decode_s = last - first
        print(json.dumps({"impl": "python", "model": str(args.model), "run": run,
                          "ttft_ms": (first - started) * 1e3, "tokens": len(generated),
                          "decode_tok_s": (len(generated) - 1) / decode_s if decode_s > 0 else 0.0}))


if __name__ == "__main__":
    main()
