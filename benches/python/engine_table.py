"""Tabulate `make bench-engine`: engine-bench (the fused default model on streamgate's attention
kernel and on ONNX Runtime's, and the fp32 graph) and
llama_cpp_bench.py (llama.cpp on the same GGUF) JSON lines, as medians and ratios to llama.cpp.

A round whose llama.cpp run failed (the Makefile writes `{"impl": "llama.cpp", "error": ...}`; seen: a
segfault in llama_decode on some CPUs) is reported, not tabulated; with no llama.cpp run at all the
table still prints the other engines and the script exits 1, since the comparison did not happen."""

import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
failures = []
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        if "error" in r:
            failures.append(f"{r['impl']}: {r['error']}")
            continue
        name = r["model"].rstrip("/").split("/")[-1]
        engine = "llama.cpp (GGUF)" if r["impl"] == "llama.cpp" else (
            "streamgate, fp32 graph" if name.endswith("-fp32") else
            "streamgate, fused graph, --batch-invariant" if r.get("batch_invariant") else
            "streamgate, fused graph, --attention-kernel onnxruntime" if r.get("attention") == "onnxruntime" else
            "streamgate, fused graph (default)")
        rows[engine].append(r)


def med(rs, key):
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else float("nan")


order = ["streamgate, fused graph (default)", "streamgate, fused graph, --attention-kernel onnxruntime",
         "streamgate, fused graph, --batch-invariant", "streamgate, fp32 graph", "llama.cpp (GGUF)"]
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
    for engine in order[:-1]:
        rs = rows.get(engine)
        if rs:
            print(f"| {engine} | {med(rs, 'decode_tok_s') / med(base, 'decode_tok_s'):.2f}x | "
                  f"{med(rs, 'prefill_tok_s') / med(base, 'prefill_tok_s'):.2f}x | "
                  f"{med(base, 'ttft_ms') / med(rs, 'ttft_ms'):.2f}x |")

if failures:
    print()
    print(f"{len(failures)} run(s) failed and are not in the table: " + "; ".join(failures))
    if not base:
        print("no llama.cpp run succeeded: there is no ratio to llama.cpp on this machine", file=sys.stderr)
        sys.exit(1)
