"""The shape of the house, checked on the source: no import cycles (imports inside functions count), no module over
450 lines, no folder of more than 15 modules, a Ray-free core, and one definition per public name.

These read the files with ``ast``; nothing is imported, so they run in milliseconds and fail with the offending
modules named.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Folder -> package, as pyproject.toml's package-dir mapping installs them.
PACKAGES = {"knowmap": "knowmap", "actors": "knowmap.actors", "serve": "knowmap.serve", "train": "knowmap.train",
            "jobs": "knowmap.jobs"}
CORE_FORBIDDEN = ("ray", "knowmap.actors", "knowmap.serve", "knowmap.train", "knowmap.jobs")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the distribution."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the distribution that ``name`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != name}


def _external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # A package's __init__ importing nothing of its own is the norm here; edges into a package are kept as they
    # are (importing ``knowmap.kb`` runs ``knowmap/kb/__init__.py``).
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_450_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_no_folder_over_15_modules() -> None:
    per_folder: dict[Path, int] = defaultdict(int)
    for path in MODULES.values():
        if path.name != "__init__.py":
            per_folder[path.parent] += 1
    crowded = {str(folder.relative_to(ROOT)): n for folder, n in per_folder.items() if n > 15}
    assert not crowded, f"folders with more than 15 modules: {crowded}"


def test_core_is_ray_free() -> None:
    core = {name: path for name, path in MODULES.items() if path.is_relative_to(ROOT / "knowmap")}
    offenders = {name: sorted(hit) for name, path in core.items()
                 if (hit := {m for m in _external_imports(path) | _imports(name, path)
                             if any(m == f or m.startswith(f + ".") for f in CORE_FORBIDDEN)})}
    assert not offenders, f"the core (knowmap/) must not import Ray or the Ray layer: {offenders}"


def test_every_package_says_what_it_owns() -> None:
    packages = [name for name, path in MODULES.items() if path.name == "__init__.py"]
    missing = [name for name in packages if len(ast.get_docstring(ast.parse(MODULES[name].read_text())) or "") < 80]
    assert not missing, f"packages without a docstring saying what they own: {missing}"


@pytest.mark.parametrize("kind", [ast.ClassDef, ast.FunctionDef])
def test_public_names_defined_once(kind: type) -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, kind) and not node.name.startswith("_"):
                where[node.name].append(name)
    # main() is each program's entry point by convention.
    twice = {n: mods for n, mods in where.items() if len(mods) > 1 and n != "main"}
    assert not twice, f"public names defined in more than one module: {twice}"


def test_public_constants_and_aliases_defined_once() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                # Type variables (``T = TypeVar("T")``) are local to their module by nature.
                if isinstance(target, ast.Name) and target.id[0].isupper() and len(target.id) > 1:
                    where[target.id].append(name)
    twice = {n: mods for n, mods in where.items() if len(mods) > 1}
    assert not twice, f"public constants defined in more than one module: {twice}"


def test_exceptions_live_in_errors() -> None:
    """Every public exception class is defined in knowmap/errors.py (private control-flow signals aside)."""
    elsewhere = []
    for name, path in MODULES.items():
        if name == "knowmap.errors":
            continue
        for node in ast.parse(path.read_text()).body:
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and \
                    any(b.endswith(("Error", "Exception")) for b in bases):
                elsewhere.append(f"{name}.{node.name}")
    assert not elsewhere, f"exception classes outside knowmap/errors.py: {elsewhere}"


def test_one_ranking_pipeline() -> None:
    """Dense ranking, BM25, fusion, reranking and the joint query are built in knowmap.models.retrieval alone: what
    evaluation, the benchmarks and the retrain gate measure is what the service serves."""
    owner, lexical = "knowmap.models.retrieval", "knowmap.models.lexical"
    called = defaultdict(set)
    for name, path in {**MODULES, **{f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").rglob("*.py")}}.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func in {"BM25Retriever", "fuse", "rrf", "enrich_query"}:
                    called[func].add(name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\nKnown facts: " in node.value:
                called["the joint query's text"].add(name)
    elsewhere = {what: sorted(m for m in mods if m not in {owner, lexical}) for what, mods in called.items()}
    # The training moments build the joint query through enrich_query, the served form.
    elsewhere["enrich_query"] = [m for m in elsewhere.get("enrich_query", []) if m != "knowmap.evaluation.moments"]
    assert not any(elsewhere.values()), f"a second ranking pipeline: {elsewhere}"
