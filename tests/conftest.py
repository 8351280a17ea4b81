"""Suite-wide fixtures.

EXPLAIN prints a runtime estimate calibrated by timing the plan's own layers
(planner/runtime.py, executor/timing_cache.py). Outside tests/test_runtime.py, which tests that, the
estimate comes from a fixed calibration: the suite neither spends seconds
timing large models in doc examples nor depends on the machine's speed, and
nothing is written to the user's cache (``KQL_CACHE_DIR`` points at a
temporary directory for the whole session).
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _runtime_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KQL_CACHE_DIR", str(tmp_path_factory.mktemp("kql-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _calibration_store(tmp_path_factory):
    """TUNE's store (``KQL_DATA_DIR``, kql/calibration.py) in a temporary folder: no test reads
    or writes the user's calibrations; the built-in ones (kql/calibrations/) are still read."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KQL_DATA_DIR", str(tmp_path_factory.mktemp("kql-data")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fixed_runtime_calibration(request, monkeypatch):
    if request.module.__name__.rpartition(".")[2] == "test_runtime":
        return
    from kql.executor import timing_cache
    from kql.planner.runtime import LayerTimings
    monkeypatch.setattr(timing_cache, "layer_timings", lambda plan: LayerTimings.fixed(plan))
    monkeypatch.setattr(timing_cache, "is_profiled", lambda plan: True)  # the fixed one measures nothing


# -- A CNN really trained on Fashion-MNIST (kql.zoo), for tests of heatmap quality ----------


def pytest_collection_modifyitems(items):
    """Every test that needs the trained net (directly or through another fixture)
    is ``slow``: the first one in a run trains it (``make test-fast`` leaves them out)."""
    for item in items:
        if {"fmnist_net", "fmnist3d_net", "fmnist_se_net"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)



def _shared_temp(tmp_path_factory):
    """The run's temporary folder every xdist worker shares (``getbasetemp().parent``
    under xdist, the run's own folder otherwise)."""
    import os
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def fmnist_net(tmp_path_factory):
    """kql.zoo's Fashion-MNIST CNN (about 87% test accuracy), trained at most once per run.

    The weights are cached in the run's temporary folder, which every xdist worker shares
    (``getbasetemp().parent`` under xdist, the run's own folder otherwise), and
    ``zoo.trained_fmnist_net`` trains under a file lock: under ``-n 2`` one worker trains
    (about 15 CPU-seconds) while the other waits, then loads. Register it with
    ``con.register_model("fmnist", fmnist_net, **zoo.FMNIST_SPEC)``; treat it as read-only
    (``copy.deepcopy`` it before changing it).
    """
    from kql import zoo
    base = _shared_temp(tmp_path_factory)
    return zoo.trained_fmnist_net(base / "kql-zoo")


@pytest.fixture(scope="session")
def fmnist_se_net(tmp_path_factory):
    """kql.zoo's Fashion-MNIST CNN with a squeeze-and-excitation gate after each
    conv (``zoo.fmnist_se_cnn``, about 87% test accuracy), trained at most once
    per run and shared by the xdist workers, as :func:`fmnist_net`. Read-only."""
    from kql import zoo
    base = _shared_temp(tmp_path_factory)
    return zoo.trained_fmnist_net(base / "kql-zoo", architecture="se")


@pytest.fixture(scope="session")
def fmnist3d_net(tmp_path_factory):
    """kql.zoo's 3-D CNN on Fashion-MNIST volumes (about 80% test accuracy),
    trained at most once per run and shared by the xdist workers, as
    :func:`fmnist_net`. Read-only."""
    from kql import zoo
    base = _shared_temp(tmp_path_factory)
    return zoo.trained_fmnist3d_net(base / "kql-zoo")
