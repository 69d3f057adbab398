#!/usr/bin/env python3
"""The layer rules of largessl, checked on the imports of the source tree (AST; lazy imports included).

Every module stands on a floor; it may import only modules on its own floor or below, never one above.
On floors marked *apart*, packages do not import each other either (train and eval stand side by side on
the run machinery). The import graph between modules has no cycle. ``docs/architecture.md`` draws the same
table for people; ``tests/unit/test_layers.py`` runs this check on every ``make test``.

    python tools/check_layers.py [ROOT]     # prints each violation; exit 1 when there is one
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# (floor name, module prefixes on it, packages on it must not import each other)
# Lowest first. A prefix matches the module itself and everything below it (``largessl`` only itself); the longest prefix wins, so a
# section of the config tree (``largessl.train.config``) can stand lower than the rest of its package.
FLOORS: list[tuple[str, tuple[str, ...], bool]] = [
    ("foundation", ("largessl", "largessl.registry"), False),
    ("distributed", ("largessl.distributed",), False),
    ("layers", ("largessl.nn",), False),
    ("blocks", ("largessl.models", "largessl.data", "largessl.metrics"), True),
    ("methods", ("largessl.methods",), False),
    ("config", ("largessl.config", "largessl.train.config", "largessl.eval.config", "largessl.hub.config",
                "largessl.hub.records"), False),
    ("run machinery", ("largessl.run",), False),
    ("hub", ("largessl.hub",), False),
    ("train | eval", ("largessl.train", "largessl.eval"), True),
    ("stages | bench | repro | demo", ("largessl.stages", "largessl.bench", "largessl.repro", "largessl.demo"), True),
    ("entry points", ("largessl.cli", "largessl.__main__", "largessl.config_cli", "largessl.launch",
                      "largessl.data.cli", "largessl.eval.cli", "largessl.train.cli", "largessl.hub.cli",
                      "largessl.bench.cli", "largessl.repro.cli"), False),
]

FORBIDDEN: list[tuple[str, tuple[str, ...], str]] = [
    ("largessl.launch", ("largessl.train", "largessl.eval", "largessl.hub", "largessl.methods", "largessl.models",
                         "largessl.data", "largessl.nn", "largessl.metrics", "largessl.bench", "largessl.repro"),
     "launch code builds commands and environments; it never imports the training internals"),
]
"""Extra rules beyond the floors: (importer prefix, forbidden prefixes, why)."""


@dataclass(frozen=True)
class Violation:
    """One import that breaks a rule."""

    importer: str
    imported: str
    line: int
    path: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}: {self.why}"


def module_name(path: Path, root: Path) -> str:
    """``largessl/run/checkpoint.py`` → ``largessl.run.checkpoint`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, name: str) -> bool:
    rel = Path(*name.split("."))
    return (root / rel.with_suffix(".py")).is_file() or (root / rel / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported largessl module, line) for every import statement in ``path``, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "largessl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "largessl":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(root, f"{mod}.{a.name}")]
            # `from pkg import submodule` depends on the submodule; any other name depends on the module itself
            if len(subs) < len(node.names):
                out.append((mod, node.lineno))
            out += [(s, node.lineno) for s in subs]
    return out


def _match(module: str, prefix: str) -> bool:
    # the package root holds only the version; it places itself, not the modules below it
    return module == prefix or (prefix != "largessl" and module.startswith(prefix + "."))


def floor_of(module: str) -> tuple[int, str]:
    """(floor index, the prefix that placed it) of a module; the longest matching prefix wins."""
    best: tuple[int, int, str] | None = None
    for i, (_, prefixes, _) in enumerate(FLOORS):
        for p in prefixes:
            if _match(module, p) and (best is None or len(p) > best[1]):
                best = (i, len(p), p)
    if best is None:
        raise ValueError(f"module {module} stands on no floor; add it to FLOORS in tools/check_layers.py")
    return best[0], best[2]


def _with_packages(importer: str, imported: str, bare: set[str]) -> list[str]:
    """``imported`` and the packages whose ``__init__`` Python runs to import it from ``importer``.

    Importing ``largessl.hub.config`` from outside ``largessl.hub`` first runs ``largessl/hub/__init__.py``, so
    whatever that file imports is imported too. From inside the package the ``__init__`` is already running.
    A package whose ``__init__`` imports nothing of ours (in ``bare``) adds nothing and is left out.
    """
    parts = imported.split(".")
    out = [imported]
    for i in range(2, len(parts)):
        pkg = ".".join(parts[:i])
        if not _match(importer, pkg) and pkg not in bare:
            out.append(pkg)
    return out


def graph(root: Path) -> dict[str, list[tuple[str, int, str]]]:
    """module → [(imported module, line, path)] over every ``.py`` file of the ``largessl`` package."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    bare = {module_name(p, root) for p in (root / "largessl").rglob("__init__.py") if not imports_of(p, root)}
    for path in sorted((root / "largessl").rglob("*.py")):
        rel = str(path.relative_to(root))
        importer = module_name(path, root)
        edges = []
        for m, line in imports_of(path, root):
            edges += [(dep, line, rel) for dep in _with_packages(importer, m, bare) if (dep, line, rel) not in edges]
        out[importer] = edges
    return out


def cycles(g: dict[str, list[tuple[str, int, str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in g.get(v, []):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def _package(module: str, prefixes: tuple[str, ...]) -> str:
    return max((p for p in prefixes if _match(module, p)), key=len, default=module)


def check(root: str | Path = ".") -> list[str]:
    """Every violation of the layer rules under ``root`` (the repository root), as printable lines."""
    root = Path(root)
    g = graph(root)
    problems: list[str] = []
    for importer, edges in g.items():
        f_from, _ = floor_of(importer)
        for imported, line, path in edges:
            if imported == importer:
                continue
            f_to, _ = floor_of(imported)
            name_from, prefixes, apart = FLOORS[f_from]
            if f_to > f_from:
                problems.append(str(Violation(importer, imported, line, path,
                                              f"an upward import (floor '{name_from}' → '{FLOORS[f_to][0]}')")))
            elif f_to == f_from and apart:
                a, b = _package(importer, prefixes), _package(imported, prefixes)
                if a != b:
                    problems.append(str(Violation(importer, imported, line, path,
                                                  f"{a} and {b} stand side by side on floor '{name_from}' "
                                                  "and never import each other")))
            for src, banned, why in FORBIDDEN:
                if _match(importer, src) and any(_match(imported, b) for b in banned):
                    problems.append(str(Violation(importer, imported, line, path, why)))
    for comp in cycles(g):
        problems.append(f"import cycle: {' ↔ '.join(comp)}")
    return problems


def main(argv: list[str]) -> int:
    """Print the violations under ROOT (default: this repository); exit 1 when there is any."""
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    problems = check(root)
    for p in problems:
        print(p)
    print(f"{len(problems)} layer violation(s) in {root / 'largessl'}" if problems else "layers: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
