"""KQL: a declarative query engine for fast occlusion-based explanations of
CNN predictions.

>>> import kql
>>> con = kql.connect()                                   # doctest: +SKIP
>>> r = con.execute("SELECT HEATMAP FROM coffee USING efficientnet_lite0 "
...                 "PATCH 16 STRIDE 8")                  # doctest: +SKIP
>>> r.save("coffee.png")                                  # doctest: +SKIP

The pipeline, one stage per place: ``grammar/kql.lark`` -> ``kql.parser``
(AST in ``kql.ast``) -> ``kql.planner`` (binder, CNN graph, geometry, cost,
rules, optimizer, EXPLAIN) -> ``kql.executor`` -> ``kql.kernels``.
"""
from kql.errors import ExecutionError, KqlError, ParseError, PlanError, QueryInterrupted, SettingError

__version__ = "0.1.0"


def connect(**settings):
    """Open a session; see :func:`kql.api.connect`."""
    from kql.api import connect as _connect
    return _connect(**settings)


def occlusion(model, inputs, patch, stride, **options):
    """Occlusion maps of tensors in the model's space; see :func:`kql.tensor_api.occlusion`."""
    from kql.tensor_api import occlusion as _occlusion
    return _occlusion(model, inputs, patch, stride, **options)


def __getattr__(name):  # lazy: `import kql` stays fast for the REPL's --help
    if name == "Connection":
        from kql.api import Connection
        return Connection
    if name == "HeatmapResult":
        from kql.result import HeatmapResult
        return HeatmapResult
    if name == "Explanation":
        from kql.planner.explain import Explanation
        return Explanation
    if name == "Table":
        from kql.table import Table
        return Table
    if name == "BatchJob":
        from kql.jobs.batch import BatchJob
        return BatchJob
    if name == "Volume":
        from kql.sources.volumes import Volume
        return Volume
    if name == "compat":
        import importlib
        return importlib.import_module("kql.compat")
    raise AttributeError(f"module 'kql' has no attribute {name!r}")


__all__ = ["connect", "Connection", "occlusion", "HeatmapResult", "Explanation", "Table", "BatchJob", "Volume",
           "KqlError", "ParseError", "PlanError", "SettingError", "ExecutionError",
           "QueryInterrupted", "__version__"]
