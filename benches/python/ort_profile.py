"""Sum an ONNX Runtime profile (`engine-bench --ort-profile PREFIX`) per operator, for the runs of
each size: where a decode step of 1 row and one of 16 rows spend their time.

A run's size is the rows x tokens of its first `MatMulNBits` input (1 for a lone decode step,
16 for a 16-row one, a chunk's length for a prompt chunk). Prints a Markdown table of mean
microseconds per run for each operator type, for the sizes asked (`--sizes`, default 1 and 16).
Profiling slows every node by a fixed amount, so read the table for proportions and growth.

    target/release/engine-bench ... --streams 16 --ort-profile /tmp/prof/smol
    .venv/bin/python benches/python/ort_profile.py /tmp/prof/smol_*.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def run_sizes(events: list[dict]) -> tuple[list[tuple[int, int]], list[int]]:
    """The `model_run` spans (start, end) in time order and each one's size."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    starts = [start for start, _ in runs]
    sizes = [0] * len(runs)
    for e in sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"]):
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or sizes[i] or e["args"].get("op_name") != "MatMulNBits":
            continue
        shape = next(iter(e["args"]["input_type_shape"][0].values()))
        sizes[i] = math.prod(shape[:-1])
    return runs, sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    try:
        events = json.loads(args.profile.read_text())
    except (OSError, ValueError) as e:
        print(f"{args.profile}: not a complete ONNX Runtime profile ({e})", file=sys.stderr)
        return 2
    runs, sizes = run_sizes(events)
    starts = [start for start, _ in runs]
    per_op: dict[int, dict[str, float]] = {size: defaultdict(float) for size in args.sizes}
    for e in events:
        if e.get("cat") != "Node":
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and sizes[i] in per_op:
            per_op[sizes[i]][e["args"].get("op_name", "?")] += e["dur"]
    counts = {size: sizes.count(size) for size in args.sizes}
    wall = {size: sum(end - start for (start, end), s in zip(runs, sizes) if s == size) for size in args.sizes}
    if not any(counts.values()):
        print(f"no runs of sizes {args.sizes} (sizes present: {sorted(set(sizes))})", file=sys.stderr)
        return 2
    mean = {size: {op: t / counts[size] for op, t in ops.items()} for size, ops in per_op.items() if counts[size]}
    shown = [size for size in args.sizes if counts[size]]
    ops = sorted({op for size in shown for op in mean[size]}, key=lambda op: -mean[shown[-1]].get(op, 0.0))
    print("| operator | " + " | ".join(f"size {s} (µs/run)" for s in shown) + " |")
    print("| --- | " + " | ".join("---" for _ in shown) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{mean[s].get(op, 0.0):.0f}" for s in shown) + " |")
    print("| all nodes | " + " | ".join(f"{sum(mean[s].values()):.0f}" for s in shown) + " |")
    print("| run (wall) | " + " | ".join(f"{wall[s] / counts[s]:.0f}" for s in shown) + " |")
    print("| runs | " + " | ".join(str(counts[s]) for s in shown) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
