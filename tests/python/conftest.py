"""Shared fixtures for the reference tests: repository paths and the Rust dump example."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
ORT_LIB = CACHE / "onnxruntime" / "libonnxruntime.so.1.31.1"
TINY = ROOT / "models" / "tiny-llama"
TINY_FUSED = ROOT / "models" / "tiny-llama-fused"
# The default model (fused, quantized graph) and the fp32 graph of the same GGUF it is measured against.
SMOLLM2 = CACHE / "models" / "smollm2-135m-instruct"
SMOLLM2_FP32 = CACHE / "models" / "smollm2-135m-instruct-fp32"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
DUMP = TARGET / "debug" / "examples" / "reference_dump"
# Same thread count on both sides, so both runtimes partition work the same way.
THREADS = 2


def require(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}")
    return path


@pytest.fixture(scope="session")
def rust_dump():
    """Run the Rust crate on a model + prompt and return its JSON answer."""
    require(DUMP, "build it with `cargo build -p streamgate-inference --example reference_dump` (make test does)")
    require(ORT_LIB, "run `make setup`")

    def run(model: Path, prompt: str, steps: int, texts: list[str] | None = None, **extra) -> dict:
        request = {"model": str(model), "ort": str(ORT_LIB), "prompt": prompt, "steps": steps,
                   "texts": texts or [], "threads": THREADS, **extra}
        done = subprocess.run([str(DUMP)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


BINARY = TARGET / "debug" / "streamgate"


class Gateway:
    """A running streamgate binary; `logs` collects its JSON log records."""

    def __init__(self, proc: subprocess.Popen, address: str, logs: list) -> None:
        self.proc, self.address, self.logs = proc, address, logs
        self.base = f"http://{address}"

    def request_logs(self, path: str) -> list:
        return [r for r in self.logs if r.get("msg") == "request" and r.get("path") == path]

    def awaited_request_logs(self, path: str, wait_s: float = 5.0) -> list:
        """`request_logs`, once there is one: the gateway writes a request's line after the response
        went out, and a thread reads it from the pipe, so a client can be faster than both."""
        deadline = time.monotonic() + wait_s
        while not (lines := self.request_logs(path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def start_gateway(*args: str) -> Gateway:
    """Start the real binary on 127.0.0.1:0 and wait for its `listening` log line."""
    import threading

    require(BINARY, "build it with `cargo build -p streamgate-gateway` (make test does)")
    require(SMOLLM2 / "model.onnx", "run `make setup`")
    proc = subprocess.Popen(
        [str(BINARY), "--host", "127.0.0.1", "--port", "0", "--ort-dylib-path", str(ORT_LIB), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    logs: list = []
    address = None
    for line in proc.stdout:
        record = json.loads(line)
        logs.append(record)
        if record.get("msg") == "listening":
            address = record["address"]
            break
    if address is None:
        proc.kill()
        pytest.fail(f"gateway did not start: {proc.stderr.read() if proc.stderr else ''}")
    # Keep reading stdout (so the server never blocks on a full pipe) into `logs`.
    threading.Thread(target=lambda: [logs.append(json.loads(l)) for l in proc.stdout], daemon=True).start()
    return Gateway(proc, address, logs)


@pytest.fixture(scope="session")
def gateway():
    """SmolLM2 as v1 and the tiny model as v2; yields the base URL."""
    server = start_gateway("--model", f"v1={SMOLLM2}", "--model", f"v2={TINY}")
    yield server.base
    server.stop()
