"""Suite-wide fixtures."""
from __future__ import annotations

import pytest


# -- A CNN really trained on Fashion-MNIST (kql.zoo), for tests of heatmap quality ----------


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
    import os
    from kql import zoo
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return zoo.trained_fmnist_net(base / "kql-zoo")
