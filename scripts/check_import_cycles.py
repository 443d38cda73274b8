#!/usr/bin/env python3
"""Fail when modules of a Rust crate import each other in a circle.

Reads every `.rs` file under SRC (default crates/gateway/src), skipping `#[cfg(test)]` modules:
an edge A -> B is a `use crate::…` / `use super::…` / `use self::…` tree, an inline `crate::…`
path, or a parent module naming a child it declares (`child::item`). Paths resolve to the longest
module that exists (`crate::http::paths::resource` -> `http::paths`). Prints every strongly
connected component with more than one module and exits 1 if there is any. Standard library only.

Usage: scripts/check_import_cycles.py [SRC]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_name(src: Path, file: Path) -> str | None:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts == ["lib"]:
        return "crate"
    if parts == ["main"] or parts[0] == "bin":
        return None  # binaries use the crate by name, not `crate::`
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def strip(text: str) -> str:
    """Code without comments, string literals and `#[cfg(test)]` items."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"//[^\n]*", "", text)
    out, depth, skipping = [], 0, False
    tokens = re.split(r"(#\[cfg\(test\)\]|[{};])", text)
    for token in tokens:
        if token == "#[cfg(test)]":
            skipping, depth = True, 0
            continue
        if skipping:
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth == 0:
                    skipping = False
            elif token == ";" and depth == 0:
                skipping = False
            continue
        out.append(token)
    return "".join(out)


def expand_use_tree(tree: str) -> list[str]:
    """`a::{b, c::{d, e as f}}` -> [a::b, a::c::d, a::c::e] (`self` leaves name their parent)."""
    tree = re.sub(r"\s+as\s+" + IDENT, "", tree)
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        return [re.sub(r"::self$", "", tree)]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    parts, depth, current = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        current += ch
    parts.append(current)
    out = []
    for part in filter(None, parts):
        for sub in expand_use_tree(part):
            out.append(prefix.rstrip(":") if sub == "self" else prefix + sub)
    return out


def resolve(path: str, here: str, is_mod_file: bool, modules: set[str]) -> str | None:
    segments = path.split("::")
    if segments[0] == "crate":
        segments = segments[1:]
    elif segments[0] in ("super", "self"):
        base = [] if here == "crate" else here.split("::")
        while segments and segments[0] in ("super", "self"):
            if segments[0] == "super":
                # In `a/b.rs` (module a::b) `super` is `a`.
                base = base[:-1]
            segments = segments[1:]
        segments = base + segments
    else:
        return None
    for end in range(len(segments), 0, -1):
        candidate = "::".join(segments[:end])
        if candidate in modules:
            return candidate
    return "crate"


def edges_of(src: Path, file: Path, here: str, modules: set[str]) -> set[str]:
    code = strip(file.read_text(encoding="utf-8"))
    is_mod_file = file.name in ("mod.rs", "lib.rs")
    targets: set[str] = set()
    for tree in re.findall(r"\buse\s+((?:crate|super|self)::[^;]+);", code):
        for path in expand_use_tree(tree):
            targets.add(resolve(path, here, is_mod_file, modules) or "")
    outside_use = re.sub(r"\buse\s+[^;]+;", "", code)
    for path in re.findall(r"\b(crate(?:::" + IDENT + r")+)", outside_use):
        targets.add(resolve(path, here, is_mod_file, modules) or "")
    if is_mod_file:
        prefix = "" if here == "crate" else here + "::"
        declared = re.findall(r"\bmod\s+(" + IDENT + r")\s*;", code)
        for child in declared:
            body = re.sub(r"\bmod\s+" + child + r"\s*;", "", code)
            if re.search(r"(?<![:\w])" + child + r"::", body):
                targets.add(prefix + child)
    targets.discard("")
    targets.discard(here)
    return {t for t in targets if t in modules or t == "crate"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/gateway/src")
    files = {m: f for f in sorted(src.rglob("*.rs")) if (m := module_name(src, f)) is not None}
    modules = set(files)
    graph = {m: edges_of(src, f, m, modules) for m, f in files.items()}
    found = cycles(graph)
    for component in found:
        members = set(component)
        print(f"import cycle among {len(component)} modules of {src}:", file=sys.stderr)
        for m in component:
            inside = sorted(graph[m] & members)
            print(f"  {m} -> {', '.join(inside)}", file=sys.stderr)
    if not found:
        print(f"{src}: {len(modules)} modules, {sum(map(len, graph.values()))} imports, no cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
