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


def __getattr__(name):  # lazy: `import kql` stays fast for the REPL's --help
    if name == "Connection":
        from kql.api import Connection
        return Connection
    raise AttributeError(f"module 'kql' has no attribute {name!r}")


__all__ = ["connect", "Connection", "KqlError", "ParseError", "PlanError", "SettingError", "ExecutionError",
           "QueryInterrupted", "__version__"]
