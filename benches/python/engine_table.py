"""Tabulate `make bench-engine`: engine-bench (the fused default model and the fp32 graph) and
llama_cpp_bench.py (llama.cpp on the same GGUF) JSON lines, as medians and ratios to llama.cpp."""

import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        name = r["model"].rstrip("/").split("/")[-1]
        engine = "llama.cpp (GGUF)" if r["impl"] == "llama.cpp" else (
            "streamgate, fp32 graph" if name.endswith("-fp32") else
            "streamgate, fused graph, --batch-invariant" if r.get("batch_invariant") else
            "streamgate, fused graph (default)")
        rows[engine].append(r)


def med(rs, key):
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else float("nan")


order = ["streamgate, fused graph (default)", "streamgate, fused graph, --batch-invariant", "streamgate, fp32 graph",
         "llama.cpp (GGUF)"]
print("| engine | runs | TTFT (ms) | decode (tok/s) | prefill 2,000 tokens (tok/s) | decode at position 2,000 (tok/s) "
      "| at 2,000 / at start | RSS loaded / after (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for engine in order:
    rs = rows.get(engine, [])
    if not rs:
        continue
    rss = f"{med(rs, 'rss_loaded_mib'):.0f} / {med(rs, 'rss_peak_mib'):.0f}" if "rss_mib" in rs[0] else "-"
    print(f"| {engine} | {len(rs)} | {med(rs, 'ttft_ms'):.1f} | {med(rs, 'decode_tok_s'):.1f} | "
          f"{med(rs, 'prefill_tok_s'):.1f} | {med(rs, 'long_decode_tok_s'):.1f} | "
          f"{med(rs, 'long_decode_tok_s') / med(rs, 'decode_tok_s'):.2f} | {rss} |")
base = rows.get("llama.cpp (GGUF)")
if base:
    print()
    print("| engine | decode vs llama.cpp | prefill vs llama.cpp | TTFT llama.cpp / engine |")
    print("| --- | --- | --- | --- |")
    for engine in order[:3]:
        rs = rows.get(engine)
        if rs:
            print(f"| {engine} | {med(rs, 'decode_tok_s') / med(base, 'decode_tok_s'):.2f}x | "
                  f"{med(rs, 'prefill_tok_s') / med(base, 'prefill_tok_s'):.2f}x | "
                  f"{med(base, 'ttft_ms') / med(rs, 'ttft_ms'):.2f}x |")
