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


def per_run(events: list[dict]) -> list[tuple[int, int, dict[str, float]]]:
    """For each `model_run`, in time order: (its size, its wall time, µs per operator type)."""
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    starts = [start for start, _ in runs]
    sizes = [0] * len(runs)
    first_seen = [math.inf] * len(runs)  # the run's earliest MatMulNBits sets its size
    ops: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    for e in events:
        i = bisect.bisect_right(starts, e["ts"]) - 1 if e.get("cat") == "Node" else -1
        if i < 0:
            continue
        op = e["args"].get("op_name", "?")
        ops[i][op] += e["dur"]
        if op == "MatMulNBits" and e["ts"] < first_seen[i]:
            first_seen[i] = e["ts"]
            sizes[i] = math.prod(next(iter(e["args"]["input_type_shape"][0].values()))[:-1])
    return [(size, wall, dict(o)) for size, (_, wall), o in zip(sizes, runs, ops)]


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
    runs = per_run(events)
    shown = [size for size in args.sizes if any(s == size for s, _, _ in runs)]
    if not shown:
        print(f"no runs of sizes {args.sizes} (sizes present: {sorted({s for s, _, _ in runs})})", file=sys.stderr)
        return 2
    mean: dict[int, dict[str, float]] = {}
    wall: dict[int, float] = {}
    counts: dict[int, int] = {}
    for size in shown:
        mine = [(w, o) for s, w, o in runs if s == size]
        counts[size] = len(mine)
        wall[size] = sum(w for w, _ in mine) / len(mine)
        total: dict[str, float] = defaultdict(float)
        for _, o in mine:
            for op, t in o.items():
                total[op] += t
        mean[size] = {op: t / len(mine) for op, t in total.items()}
    ops = sorted({op for size in shown for op in mean[size]}, key=lambda op: -mean[shown[-1]].get(op, 0.0))
    print("| operator | " + " | ".join(f"size {s} (µs/run)" for s in shown) + " |")
    print("| --- | " + " | ".join("---" for _ in shown) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{mean[s].get(op, 0.0):.0f}" for s in shown) + " |")
    print("| all nodes | " + " | ".join(f"{sum(mean[s].values()):.0f}" for s in shown) + " |")
    print("| run (wall) | " + " | ".join(f"{wall[s]:.0f}" for s in shown) + " |")
    print("| runs | " + " | ".join(str(counts[s]) for s in shown) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
