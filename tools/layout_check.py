#!/usr/bin/env python
"""Check the package layout: no import cycles among its modules, and no module over a size limit.

Imports are read from the source (``ast``), nothing is imported. Every import counts: at module
level, inside functions and under ``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py``, so those count as imported too (except the importer's
own parent packages, which are already being imported when it runs).

    python tools/layout_check.py            # exit 1 on a cycle or an over-long module
    python tools/layout_check.py --max-lines 400
"""

from __future__ import annotations

import argparse
import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "osscar_export"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for f in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imported(name: str, node: ast.AST, known: set[str], is_package: bool) -> set[str]:
    """The package's modules that one import statement runs."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            parts = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    out = set()
    for target in targets:
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return out - own - {name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any level of the file)."""
    files = modules(root)
    known = set(files)
    return {
        name: set().union(*(_imported(name, n, known, f.name == "__init__.py")
                            for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)))
        for name, f in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def long_modules(max_lines: int, root: Path = ROOT) -> dict[str, int]:
    """Modules over ``max_lines`` lines, with their line counts."""
    counts = {name: len(f.read_text().splitlines()) for name, f in modules(root).items()}
    return {name: n for name, n in sorted(counts.items()) if n > max_lines}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-lines", type=int, default=400)
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    graph = import_graph(args.root)
    cycle = find_cycle(graph)
    long = long_modules(args.max_lines, args.root)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    print("import cycles: " + (" -> ".join(cycle) if cycle else "none"))
    print(f"modules over {args.max_lines} lines: " + (", ".join(f"{m} ({n})" for m, n in long.items()) or "none"))
    return 1 if cycle or long else 0


if __name__ == "__main__":
    raise SystemExit(main())
