"""llama.cpp on the same GGUF, the same way `engine-bench` measures streamgate's engine: one
stream, greedy, same prompt and threads. Prints one JSON object per run (make bench-engine
tabulates them beside the Rust engine and the fp32 graph).

    python llama_cpp_bench.py --gguf FILE --prompt TEXT --tokens 128 --runs 3 --threads 2 \
        [--long-prompt-file FILE --long-prompt-tokens 2000]

Each run reports time to first token and decode tokens/s after the short prompt, and, with a long
prompt, prompt-processing tokens/s and decode tokens/s at the long prompt's position.
llama-cpp-python is built from its PyPI sdist by `make bench-engine` (GGML_NATIVE=ON).
"""

from __future__ import annotations

import argparse
import json
import time

from llama_cpp import Llama


def greedy(model: Llama, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(seconds to first token, decode tokens/s of the rest) for one greedy generation."""
    model.reset()
    started = time.perf_counter()
    model.eval(prompt)
    token = model.sample(temp=0.0)
    first = time.perf_counter()
    for _ in range(tokens - 1):
        model.eval([token])
        token = model.sample(temp=0.0)
    done = time.perf_counter()
    return first - started, (tokens - 1) / (done - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-prompt-file")
    ap.add_argument("--long-prompt-tokens", type=int, default=2000)
    args = ap.parse_args()

    model = Llama(args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=4096,
                  n_batch=512, verbose=False)
    prompt = model.tokenize(args.prompt.encode(), add_bos=False, special=True)
    long_prompt = None
    if args.long_prompt_file:
        text = open(args.long_prompt_file, encoding="utf-8").read()
        ids = model.tokenize(text.encode(), add_bos=False, special=True)
        while len(ids) < args.long_prompt_tokens:
            ids += ids
        long_prompt = ids[: args.long_prompt_tokens]
    greedy(model, prompt, 4)  # warm-up
    for run in range(1, args.runs + 1):
        ttft, decode = greedy(model, prompt, args.tokens)
        record = {"impl": "llama.cpp", "model": args.gguf, "run": run, "ttft_ms": ttft * 1e3,
                  "prompt_tokens": len(prompt), "tokens": args.tokens, "decode_tok_s": decode}
        if long_prompt is not None:
            long_ttft, long_decode = greedy(model, long_prompt, 64)
            record |= {"long_prompt_tokens": len(long_prompt), "prefill_tok_s": len(long_prompt) / long_ttft,
                       "long_decode_tok_s": long_decode}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
