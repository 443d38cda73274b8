"""The load generator works: one second of load against a test gateway (mock engine), with its
JSON result and SVG report checked. A smoke test of the tool, not a timing assertion."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from conftest import TARGET, require, start_gateway

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
