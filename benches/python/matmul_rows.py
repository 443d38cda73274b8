"""Time each distinct `MatMulNBits` of a fused model folder alone, at 1..16 rows: how the cost
of ONNX Runtime's int4/int8 CPU kernel grows with the rows of a batched decode step.

Each node runs in a one-node graph with the model's own packed weights, scales and zero points
(so the weights sit in cache: the growth with rows, not the memory read, is what this shows).
Prints a Markdown table, microseconds per call (median of 5 rounds of 200 calls).

    .venv/bin/python benches/python/matmul_rows.py .cache/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROWS = (1, 2, 4, 8, 16)


def distinct_nodes(model: onnx.ModelProto) -> dict[tuple, tuple[onnx.NodeProto, int]]:
    """(K, N, bits, block size, accuracy level) -> (its first node, how many nodes have it), in
    graph order."""
    found: dict[tuple, tuple[onnx.NodeProto, int]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            key = (a["K"], a["N"], a["bits"], a["block_size"], a.get("accuracy_level", 0))
            first, count = found.get(key, (node, 0))
            found[key] = (first, count + 1)
    return found


def one_node_session(model: onnx.ModelProto, node: onnx.NodeProto, k: int, n: int, threads: int):
    inits = {i.name: i for i in model.graph.initializer}
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"], domain="com.microsoft",
                          **{x.name: helper.get_attribute_value(x) for x in node.attribute})],
        "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[inits[name] for name in node.input[1:] if name])
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    one.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(one.SerializeToString(), options, providers=["CPUExecutionProvider"])


def micros(session, rows: int, k: int) -> float:
    a = np.random.default_rng(0).standard_normal((rows, k), dtype=np.float32)
    for _ in range(20):
        session.run(None, {"A": a})
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(200):
            session.run(None, {"A": a})
        rounds.append((time.perf_counter() - started) / 200 * 1e6)
    return statistics.median(rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = args.model_dir / "model.onnx"
    if not path.is_file():
        print(f"{args.model_dir} has no model.onnx", file=sys.stderr)
        return 2
    model = onnx.load(str(path))
    print("| K x N, bits, block, accuracy level | nodes | " + " | ".join(f"{m} rows" for m in ROWS) + " | 16 vs 1 |")
    print("| --- | --- | " + " | ".join("---" for _ in ROWS) + " | --- |")
    for (k, n, bits, block, level), (node, count) in distinct_nodes(model).items():
        session = one_node_session(model, node, k, n, args.threads)
        times = [micros(session, m, k) for m in ROWS]
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {k} x {n}, {bits}, {block}, {level} | {count} | {cells} | {times[-1] / times[0]:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
