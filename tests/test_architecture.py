"""The import graph is the architecture: ``ppd_core`` never imports Prefect, no module imports itself back
through others, and packages import only downwards in the layer order documented in docs/architecture.md."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("ppd_core", "flows", "tasks")
# low to high: a package may import its own layer and the ones before it
LAYERS = (
    "ppd_core",  # the top-level modules: errors, schemas, config, layout, manifest, weights, stage, compared
    "ppd_core.data",
    "ppd_core.embed",
    "ppd_core.rewards",
    "ppd_core.models",
    "ppd_core.train",
    "ppd_core.evaluate",
    "ppd_core.tiny",
    "ppd_core.stages",
    "ppd_core.pipeline",
    "ppd_core.personalize",
    "tasks",
    "flows",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "ppd_core" or len(parts) == 1:
        return parts[0]
    if (REPO / "ppd_core" / parts[1]).is_dir() or parts[1] in ("pipeline", "personalize"):
        return f"ppd_core.{parts[1]}"
    return "ppd_core"


def imports() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its body (function-local imports included)."""
    modules = {module_name(p): p for top in OURS for p in (REPO / top).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def test_ppd_core_never_imports_prefect():
    graph = imports()
    offenders = []
    for path in (REPO / "ppd_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders
    # and importing every library module at run time pulls in no Prefect either
    library = sorted(m for m in graph if m.startswith("ppd_core"))
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in library)
    code += "sys.exit(3 if any(m.split('.')[0] == 'prefect' for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300).returncode == 0


def test_no_module_imports_itself_back():
    graph = imports()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_packages_import_only_downwards():
    rank = {package: i for i, package in enumerate(LAYERS)}
    upward = []
    for module, targets in imports().items():
        for target in targets:
            a, b = package_of(module), package_of(target)
            if rank[b] > rank[a]:
                upward.append(f"{module} ({a}) imports {target} ({b})")
    assert not upward, "\n".join(sorted(upward))
