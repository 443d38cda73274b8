"""The load generator works: one second of load against a test gateway (mock engine), with its
JSON result and SVG report checked. A smoke test of the tool, not a timing assertion."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import ORT_LIB, ROOT, TARGET, TINY, TINY_FUSED, require, start_gateway

BENCH = TARGET / "debug" / "streamgate-bench"


def test_load_generator_runs_for_a_second():
    require(BENCH, "build it with `cargo build -p streamgate-benches` (make test does)")
    server = start_gateway("--engine", "mock", "--mock-tokens", "16", "--model", "v1=unused",
                           "--rate-limit", "off", "--max-streams-per-client", "0")
    out = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    try:
        done = subprocess.run(
            [str(BENCH), "--url", server.base, "--concurrency", "4", "--duration-secs", "1", "--max-tokens", "16",
             "--server-pid", str(server.proc.pid), "--quiet", "--json", str(out / "r.json"), "--svg", str(out / "r.svg")],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "TTFT (ms)" in done.stdout and "server CPU" in done.stdout
        result = json.loads((out / "r.json").read_text())
        assert result["streams"] > 0 and result["completed"] == result["streams"]
        assert result["errors"] == 0 and result["status_503"] == 0 and result["status_429"] == 0
        assert result["token_events"] == 16 * result["completed"]
        assert result["server_cpu_us_per_event"] is not None and result["ttft_ms"]["count"] == result["completed"]
        svg = (out / "r.svg").read_text()
        assert svg.startswith("<svg") and svg.count("<polyline") == 3
    finally:
        server.stop()


BARE = TARGET / "debug" / "actix-bare-sse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bare_actix_baseline_serves_the_same_wire_format():
    """The bare actix-web baseline that `make bench` runs beside streamgate answers the load
    generator with complete streams (same events, same `[DONE]`)."""
    require(BARE, "build it with `cargo build -p streamgate-benches --bin actix-bare-sse` (make test does)")
    port = free_port()
    proc = subprocess.Popen([str(BARE), "--port", str(port), "--workers", "1", "--mock-tokens", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
                assert time.monotonic() < deadline, "the bare baseline did not start listening"
                time.sleep(0.05)
        out = Path(tempfile.mkdtemp(prefix="sg-bare-"))
        done = subprocess.run(
            [str(BENCH), "--url", f"http://127.0.0.1:{port}", "--concurrency", "2", "--requests", "20",
             "--duration-secs", "5", "--max-tokens", "8", "--quiet", "--json", str(out / "r.json")],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result = json.loads((out / "r.json").read_text())
        assert result["streams"] == 20 and result["completed"] == 20 and result["errors"] == 0
        assert result["token_events"] == 8 * 20
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_graph_ab_pairs_rounds_and_measures_quality():
    """benches/python/graph_ab.py on the committed tiny fused model against itself: the base row's
    paired ratio is exactly 1, both rows get the same quality numbers (the same graph), and the
    quality is measured against the tiny fp32 graph it was built from."""
    text = Path(tempfile.mkdtemp(prefix="sg-ab-")) / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "python" / "graph_ab.py"), str(TINY_FUSED), str(TINY_FUSED),
         "--rounds", "3", "--steps", "2", "--quality", "--reference", str(TINY), "--text", str(text)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {TINY_FUSED} |")]
    assert len(rows) == 4, done.stdout  # two timing rows, two quality rows
    assert "| 1.000x (IQR 1.000-1.000) | 1.000x (IQR 1.000-1.000) |" in rows[0]
    quality = [row.split("|")[2:4] for row in rows[2:]]
    assert quality[0] == quality[1]
    agreement = float(quality[0][0].strip().rstrip("%"))
    assert 0.0 <= agreement <= 100.0 and float(quality[0][1]) >= 0.0


def test_graph_ab_refuses_a_folder_without_a_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "python" / "graph_ab.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "has no model.onnx" in done.stderr


def test_graph_ab_refuses_a_position_below_one():
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "python" / "graph_ab.py"), str(TINY_FUSED),
                           "--position", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--position" in done.stderr


ENGINE_BENCH = TARGET / "debug" / "engine-bench"


def engine_bench(*extra: str) -> subprocess.CompletedProcess:
    """engine-bench on the committed tiny fused model: one run of 6 tokens, one thread."""
    require(ENGINE_BENCH, "build it with `cargo build -p streamgate-benches --bin engine-bench` (make test does)")
    return subprocess.run(
        [str(ENGINE_BENCH), "--model", str(TINY_FUSED), "--ort", str(ORT_LIB), "--prompt", "Hello there",
         "--tokens", "6", "--runs", "1", "--threads", "1", *extra],
        capture_output=True, text=True, timeout=120)


def test_engine_bench_runs_identical_streams_together():
    """`engine-bench --streams 3` on the committed tiny fused model: the lone run and the three
    batched greedy streams of the same prompt make the same tokens each (batching changes no
    greedy result), and the record carries the aggregate rates."""
    done = engine_bench("--streams", "3")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 1, done.stdout
    record = records[0]
    assert record["streams"] == 3 and record["tokens"] >= 1
    assert record["batched_tokens"] == 3 * record["tokens"], record
    assert record["solo_tok_s"] > 0 and record["batched_tok_s"] > 0 and record["aggregate_ratio"] > 0


def test_matmul_rows_times_every_distinct_kernel_shape():
    """benches/python/matmul_rows.py on the committed tiny fused model: one row per distinct
    `MatMulNBits` shape, whose node counts add up to the graph's, with a time for each row count."""
    import onnx

    done = subprocess.run([sys.executable, str(ROOT / "benches" / "python" / "matmul_rows.py"), str(TINY_FUSED),
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines()[2:]]
    graph = onnx.load(str(TINY_FUSED / "model.onnx"))
    assert sum(int(row[1]) for row in rows) == sum(n.op_type == "MatMulNBits" for n in graph.graph.node) > 0
    for row in rows:
        assert all(float(cell) > 0 for cell in row[2:7]), row


def test_matmul_rows_refuses_a_folder_without_a_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "python" / "matmul_rows.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "has no model.onnx" in done.stderr


def test_ort_profile_sums_an_engine_profile_per_operator(tmp_path):
    """`engine-bench --ort-profile` on the tiny fused model writes a complete ONNX Runtime profile
    (the engine waits for its sessions to close), and benches/python/ort_profile.py finds its
    one-row decode steps and sums them per operator; a cut-off profile is refused."""
    done = engine_bench("--ort-profile", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr
    [profile] = list(tmp_path.glob("tiny*.json"))
    script = str(ROOT / "benches" / "python" / "ort_profile.py")
    summed = subprocess.run([sys.executable, script, str(profile), "--sizes", "1"],
                            capture_output=True, text=True, timeout=120)
    assert summed.returncode == 0, summed.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summed.stdout.splitlines()[2:]}
    assert float(rows["MatMulNBits"]) > 0 and float(rows["GroupQueryAttention"]) > 0, summed.stdout
    # The warm-up run's 3 decode steps and the measured run's 5 (6 tokens, the first from the prompt).
    assert int(rows["runs"]) >= 5, summed.stdout

    cut = tmp_path / "cut.json"
    cut.write_bytes(profile.read_bytes()[:-100])
    refused = subprocess.run([sys.executable, script, str(cut)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a complete ONNX Runtime profile" in refused.stderr
