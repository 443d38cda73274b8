"""Shared fixtures for the reference tests: repository paths and the Rust dump example."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
ORT_LIB = CACHE / "onnxruntime" / "libonnxruntime.so.1.31.1"
TINY = ROOT / "models" / "tiny-llama"
SMOLLM2 = CACHE / "models" / "smollm2-135m-instruct"
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

    def run(model: Path, prompt: str, steps: int, texts: list[str] | None = None) -> dict:
        request = {"model": str(model), "ort": str(ORT_LIB), "prompt": prompt, "steps": steps,
                   "texts": texts or [], "threads": THREADS}
        done = subprocess.run([str(DUMP)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run
