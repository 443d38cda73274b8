"""The import-cycle check that `make lint` runs: it passes on the gateway and catches a cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CHECK = ROOT / "scripts" / "check_import_cycles.py"


def run(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(src)], capture_output=True, text=True, timeout=60)


def test_the_gateway_has_no_import_cycle() -> None:
    done = run(ROOT / "crates" / "gateway" / "src")
    assert done.returncode == 0, done.stderr


def test_a_cycle_through_a_use_tree_or_a_parent_module_is_reported(tmp_path: Path) -> None:
    (tmp_path / "lib.rs").write_text("pub mod a;\npub mod b;\npub mod c;\n")
    (tmp_path / "a.rs").write_text("use crate::{b::Thing, c};\n#[cfg(test)]\nmod tests { use crate::c; }\n")
    (tmp_path / "b.rs").write_text("pub struct Thing;\nfn f() { crate::a::g(); }\n")
    (tmp_path / "c.rs").write_text("// use crate::a;\n")
    done = run(tmp_path)
    assert done.returncode == 1, done.stdout
    assert "a -> b" in done.stderr and "b -> a" in done.stderr and "c ->" not in done.stderr
    (tmp_path / "b.rs").write_text("pub struct Thing;\n")
    assert run(tmp_path).returncode == 0
