"""Tabulate engine-bench (Rust) and ort_loop.py (Python) JSON lines: medians and the ratio."""

import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        rows[(r["model"].rstrip("/").split("/")[-1], r["impl"])].append(r)

print("| model | implementation | runs | TTFT median (ms) | decode median (tok/s) |")
print("| --- | --- | --- | --- | --- |")
models = sorted({m for m, _ in rows})
for model in models:
    for impl in ("rust", "python"):
        rs = rows.get((model, impl), [])
        if rs:
            print(f"| {model} | {impl} | {len(rs)} | {statistics.median(r['ttft_ms'] for r in rs):.1f} | "
                  f"{statistics.median(r['decode_tok_s'] for r in rs):.1f} |")
print()
print("| model | decode ratio rust/python | TTFT ratio python/rust |")
print("| --- | --- | --- |")
for model in models:
    rust, py = rows.get((model, "rust")), rows.get((model, "python"))
    if rust and py:
        d = statistics.median(r["decode_tok_s"] for r in rust) / statistics.median(r["decode_tok_s"] for r in py)
        t = statistics.median(r["ttft_ms"] for r in py) / statistics.median(r["ttft_ms"] for r in rust)
        print(f"| {model} | {d:.2f}x | {t:.2f}x |")
