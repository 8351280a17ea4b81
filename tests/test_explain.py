"""EXPLAIN text: snapshots of whole plans, and the statements EXPLAIN must make.

Snapshots live in tests/fixtures/explain/<name>.txt: the query on the first
line (after ``-- ``), then the EXPLAIN text exactly. When a change to the
planner or to EXPLAIN's layout is intended, regenerate them and review the diff:

    KQL_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -p no:xdist tests/test_explain.py

The plans are of tiny seeded models bound in the session, so nothing depends
on downloaded weights; EXPLAIN (without ANALYZE) never runs the model, and the
text holds no measured times, so it is the same on every machine: the runtime
estimate uses a fixed calibration here (``fixed_runtime``), never a measured one.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kql
from helpers import rand_image

SNAPSHOTS = Path(__file__).parent / "fixtures" / "explain"
UPDATE = os.environ.get("KQL_UPDATE_SNAPSHOTS") == "1"

IMAGE = rand_image(12, 16)


class Counted(nn.Module):
    """Counts the calls of forward with a real tensor (tracing passes fx proxies)."""

    calls = 0

    def count(self, x):
        if isinstance(x, torch.Tensor):
            self.calls += 1


class Net(Counted):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        self.count(x)
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Upsampling(Counted):
    """Nearest-neighbour upsampling in the middle: the planner cannot make it incremental."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.count(x)
        x = torch.relu(self.conv1(x))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(autouse=True)
def fixed_runtime(monkeypatch):
    """Runtime estimates from a fixed calibration: no timing, same text everywhere."""
    from kql.executor import timing_cache
    from kql.planner.runtime import LayerTimings
    monkeypatch.setattr(timing_cache, "layer_timings", lambda plan: LayerTimings.fixed(plan))


@pytest.fixture(scope="module")
def con():
    c = kql.connect(progress="off")
    c.register_image("img", IMAGE)
    c.register_model("net", Net(), labels=["cat", "dog", "bird"])
    c.register_model("up", Upsampling())
    return c


SNAPSHOT_QUERIES = {
    "naive": "EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 COLOR BLACK LABEL 1 NAIVE BATCH 8",
    "exact_region": "EXPLAIN SELECT HEATMAP FROM img USING net PATCH 5x3 STRIDE 2x3 REGION (2, 1, 14, 11) "
                    "LABEL 'dog' EXACT BATCH 6",
    "not_incremental": "EXPLAIN SELECT HEATMAP FROM img USING up PATCH 4 STRIDE 4 COLOR MEAN EXACT BATCH 4 "
                       "INTO 'heat.png'",
}


def check_snapshot(name: str, query: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    content = f"-- {query}\n{text}\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    assert path.is_file(), f"no snapshot {path}: run with KQL_UPDATE_SNAPSHOTS=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert content == expected, (f"EXPLAIN differs from {path}; if the change is intended, rerun with "
                                 f"KQL_UPDATE_SNAPSHOTS=1 and review the diff")


@pytest.mark.parametrize("name", SNAPSHOT_QUERIES)
def test_snapshot(con, name):
    query = SNAPSHOT_QUERIES[name]
    e = con.execute(query)
    check_snapshot(name, query, e.text)
    # Deterministic: planning again gives the same text.
    assert con.execute(query).text == e.text


def test_explain_does_not_run_the_model(con, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = (con.catalog.models["net"].module.calls, con.catalog.models["up"].module.calls)
    for query in SNAPSHOT_QUERIES.values():
        con.execute(query)
    assert (con.catalog.models["net"].module.calls, con.catalog.models["up"].module.calls) == before
    assert os.listdir(tmp_path) == []                           # nor writes INTO


def test_exact_on_a_model_the_planner_cannot_make_incremental_says_so(con):
    text = con.execute(SNAPSHOT_QUERIES["not_incremental"]).text
    assert text.startswith("Plan (exact)\n")
    assert ("not incremental (computed in full, with everything after them):\n"
            "  interpolate (torch.nn.functional.interpolate): interpolation is not modelled as a local window\n"
            ) in text
    assert "  incremental     incremental up to the first global layer interpolate (interpolate)" in text
    # A model without such a layer has no such section.
    assert "not incremental" not in con.execute(SNAPSHOT_QUERIES["exact_region"]).text


@pytest.mark.parametrize("name", SNAPSHOT_QUERIES)
def test_explain_states_the_theoretical_speedup(con, name):
    e = con.execute(SNAPSHOT_QUERIES[name])
    lines = [line for line in e.text.splitlines()
             if line.startswith("theoretical speedup of incremental vs naive: R = ")]
    assert len(lines) == 1
    assert lines[0].startswith(f"theoretical speedup of incremental vs naive: R = {e.speedup:.2f} ")
    assert e.speedup > 1


def test_explain_of_naive_says_it_is_naive(con):
    text = con.execute(SNAPSHOT_QUERIES["naive"]).text
    lines = text.splitlines()
    assert lines[0] == "Plan (naive)"
    assert lines[2].startswith("└─ Infer  model: net (bound from Python) · device: cpu · mode: naive · ")
    assert "  choose_mode     NAIVE: batched full re-inference" in lines
    assert "Materialize" not in text and "mode: exact" not in text and "IVM cutoff" not in text


def test_mode_without_a_clause(con):
    """No NAIVE/EXACT: the session's mode decides, and EXPLAIN says why."""
    query = "EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4"
    text = con.execute(query).text
    assert text.startswith("Plan (exact)\n")
    assert "  choose_mode     no mode given: exact incremental inference" in text.splitlines()
    naive = kql.connect(progress="off", mode="naive")
    text = naive.execute(query, img=IMAGE, net=Net()).text
    assert text.startswith("Plan (naive)\n")
    assert "  choose_mode     NAIVE: batched full re-inference" in text.splitlines()


def test_the_tree_is_rendered_from_the_plans_records(con):
    """The rules decide in typed records; EXPLAIN only says what they hold."""
    import dataclasses

    from kql.planner.explain import explain_text, plan_tree
    from kql.planner.plan import LabelChoice
    plan = con.plan("SELECT HEATMAP FROM img USING net PATCH 5x3 STRIDE 2x3 LABEL 'dog' EXACT BATCH 6")
    infer = plan_tree(plan).find("Infer")
    assert dict(infer.details)["cutoff"] == plan.schedule.cutoff
    assert dict(infer.details)["gather"] == f"torch for {len(plan.schedule.layer_backends)} layers"
    assert infer.flops == plan.estimates.infer_flops
    with pytest.raises(dataclasses.FrozenInstanceError):  # a rule replaces a record, never edits a shared one
        plan.schedule.cutoff = None
    other = dataclasses.replace(plan, label_choice=LabelChoice(2, "bird"))
    assert "Heatmap  label: 2 'bird'" in explain_text(other).splitlines()[1]
    assert "Heatmap  label: 1 'dog'" in explain_text(plan).splitlines()[1]
