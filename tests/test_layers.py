"""Dependencies point one way: front end (kql/) -> planner -> executor -> kernels.

Every module's imports are read from its source (``ast``, so imports inside
functions count too) and checked against what its layer may import. A new
import that points back up fails here, with the module, the line and the
rule it breaks.

- ``planner/`` imports no executor and nothing of the front end: what it
  needs from there (a catalog, a model spec, the SSIM calibrations, the
  executor's profiler) is handed to it as arguments.
- ``executor/`` imports no optimizer rule, no binder, no optimizer and
  nothing of the front end: what must be decided at run time (drill-down's
  stage two) is a planner function it is handed with the plan.
- ``kernels/`` imports only itself and the errors.

Shared by every layer: ``kql.errors`` (the exception types), ``kql.ast`` (the
parsed query the plan carries) and ``kql.files`` (atomic writes). The planner
may name the kernels it chooses (``kql.kernels``), which lie below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: folder -> the package it installs as (setup.cfg's package_dir)
LAYERS = {"kql": "kql", "planner": "kql.planner", "executor": "kql.executor", "kernels": "kql.kernels"}
SHARED = ("kql.errors", "kql.ast", "kql.files")


def _modules():
    for folder, package in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield folder, ".".join([package, *parts]), path


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a ``kql`` module in the file;
    ``from kql import x`` gives ``kql.x``, relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in out if name == "kql" or name.startswith("kql.")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violation(layer: str, name: str) -> str | None:
    """Why ``name`` may not be imported from ``layer``, or None."""
    if any(_under(name, s) for s in SHARED):
        return None
    if layer == "kql":
        return None                       # the front end may use everything below it
    if layer == "kernels":
        return None if _under(name, "kql.kernels") else "kernels import only kernels and kql.errors"
    if layer == "planner":
        if _under(name, "kql.executor"):
            return "the planner does not import the executor (hand it what it needs as an argument)"
        if _under(name, "kql.planner") or _under(name, "kql.kernels"):
            return None
        return "the planner does not import the front end (hand it what it needs as an argument)"
    if layer == "executor":
        for banned in ("kql.planner.rules", "kql.planner.binder", "kql.planner.optimizer", "kql.planner.explain"):
            if _under(name, banned):
                return f"the executor does not import {banned} (the plan carries every decision)"
        if any(_under(name, ok) for ok in ("kql.executor", "kql.planner", "kql.kernels")):
            return None
        return "the executor does not import the front end (it returns what it computed)"
    raise AssertionError(layer)


MODULES = list(_modules())


def test_every_layer_has_modules():
    assert {layer for layer, _, _ in MODULES} == set(LAYERS)
    assert len(MODULES) > 50


@pytest.mark.parametrize("layer,module,path", MODULES, ids=[m for _, m, _ in MODULES])
def test_imports_point_down(layer, module, path):
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}: {why}"
           for line, name in imports(path, module) if (why := violation(layer, name))]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_each_kind_of_import(tmp_path):
    """The rules above applied to a module that breaks each of them."""
    source = tmp_path / "bad.py"
    source.write_text("import kql.executor\n"
                      "from kql import sources\n"
                      "from ..executor import naive\n"
                      "def later():\n"
                      "    from kql.planner.rules.incremental import layer_costs\n")
    found = imports(source, "kql.planner.bad")
    assert found == [(1, "kql.executor"), (2, "kql.sources"), (3, "kql.executor.naive"),
                     (5, "kql.planner.rules.incremental.layer_costs")]
    assert [bool(violation("planner", n)) for _, n in found] == [True, True, True, False]
    assert [bool(violation("executor", n)) for _, n in found] == [False, True, False, True]
    assert violation("kernels", "kql.planner.graph") and not violation("kernels", "kql.errors")
