"""The ``>>>`` examples of every module of the package run, and hold.

The equivalent of ``pytest --doctest-modules`` for KQL's layout: ``setup.cfg``
maps the top-level folders (``planner/``, ``executor/``, ...) into the one
``kql`` namespace, so the modules are collected by their installed names
(``kql.planner.geometry``), not by their paths. One test per module; the
modules that document the pipeline's stages must keep examples.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("kql", "kql.grammar", "kql.sources", "kql.jobs", "kql.planner", "kql.planner.rules", "kql.executor",
            "kql.kernels", "kql.web", "kql.compat")


def modules() -> list[str]:
    names: list[str] = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    # __main__ runs the command line when imported
    return [n for n in dict.fromkeys(names) if not n.endswith("__main__")]


# Modules whose examples are part of their documentation: each must have some.
WITH_EXAMPLES = {
    "kql.api", "kql.parser", "kql.result", "kql.sources.images", "kql.sources.labels", "kql.sources.models",
    "kql.sources.preprocess", "kql.zoo", "kql.datasets",
    "kql.planner.graph", "kql.planner.ir", "kql.planner.tracer", "kql.planner.ops",
    "kql.planner.annotator", "kql.planner.geometry", "kql.planner.cost", "kql.planner.drilldown",
    "kql.executor.common", "kql.kernels", "kql.kernels.reference",
    "kql.tensor_api", "kql.compat.captum", "kql.compat.monai",
}


def test_every_package_module_is_collected():
    found = set(modules())
    assert WITH_EXAMPLES <= found, sorted(WITH_EXAMPLES - found)
    assert {"kql.planner.rules.incremental", "kql.executor.incremental", "kql.web.app"} <= found


@pytest.mark.parametrize("name", modules())
def test_module_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
                             report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} lost its examples"
