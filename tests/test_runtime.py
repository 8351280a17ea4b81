"""Runtime estimates (planner/runtime.py, executor/profile.py, executor/timing_cache.py):
the per-layer model with a fixed calibration, the prediction of what the executor runs, the on-disk cache, and
the EXPLAIN / EXPLAIN ANALYZE lines.

No test asserts on measured times (the machine is shared and noisy); how close
estimates come to actual times is benchmarks/runtime_estimate_bench.py's job.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kql
from kql.parser import parse
from kql.executor import profile, timing_cache
from kql.planner import runtime
from kql.planner.plan import batch_bounds
from kql.planner.plan import format_seconds
from kql.planner.runtime import LayerTimings
from helpers import rand_image

IMAGE = rand_image(20, 24)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Residual(nn.Module):
    """A merge (add), a strided conv and a depthwise conv: states that differ
    between central and border batches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.pw(torch.relu(self.dw(x)))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache directory and no in-process memo."""
    monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(timing_cache, "_MEMO", {})
    return tmp_path / "cache"


@pytest.fixture
def con():
    c = kql.connect(progress="off")
    c.register_image("img", IMAGE)
    c.register_model("net", Net())
    c.register_model("res", Residual())
    return c


def plan_of(con, query):
    return con.plan(parse(query))


# ----------------------------------------------------------------------------- the model
def test_naive_estimate_is_reference_plus_a_line_per_batch(con):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 NAIVE BATCH 8")
    n = plan.n_positions
    cal = LayerTimings.fixed(plan, per_batch=0.5, per_position=0.01, reference=2.0)
    est = runtime.estimate(plan, cal)
    batches = -(-n // 8)
    assert est.batches == batches
    assert est.seconds == pytest.approx(2.0 + 0.5 * batches + 0.01 * n)
    assert est.parts == {"reference": 2.0, "batches": pytest.approx(0.5 * batches + 0.01 * n)}


def test_exact_estimate_sums_the_layer_lines_over_the_predicted_runs(con):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 EXACT BATCH 4")
    order, bounds = plan.order, plan.bounds
    runs = runtime.predict_runs(plan, order, bounds)
    units = sum(u for batch in runs for _, _, u in batch)
    calls = sum(len(batch) for batch in runs)
    cal = LayerTimings.fixed(plan, per_call=1e-3, per_pixel=1e-6, per_batch=0.1, per_position=0.01,
                            reference=0.5)
    est = runtime.estimate(plan, cal)
    nb = len(bounds) - 1
    assert est.batches == nb
    expected = 0.5 + 0.5 + 0.1 * nb + 0.01 * plan.n_positions + 1e-3 * calls + 1e-6 * units
    assert est.seconds == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["NAIVE", "EXACT", "APPROX TAU 0.5"])
def test_drilldown_estimate_is_stage_one_plus_the_selected_share(con, monkeypatch, mode):
    plan = plan_of(con, f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 1 {mode} DRILLDOWN FRACTION 0.2")
    dd = plan.drilldown
    monkeypatch.setattr(timing_cache, "layer_timings", lambda p: LayerTimings.fixed(p))
    one = runtime.estimate(dd.stage_one, LayerTimings.fixed(dd.stage_one))
    whole = runtime._estimate_grid(plan, LayerTimings.fixed(plan))
    est = runtime.estimate(plan, LayerTimings.fixed(plan), LayerTimings.fixed)
    share = dd.n_select / dd.n_fine
    assert 0 < share < 0.25
    assert est.parts["batches"] == pytest.approx(one.parts["batches"] + share * whole.parts["batches"])
    assert est.seconds == pytest.approx(one.seconds + whole.seconds - whole.parts["reference"]
                                        - (1 - share) * whole.parts["batches"])


def test_a_smaller_region_is_estimated_cheaper(con):
    """Fewer positions cost less; the same per-layer lines cover any grid."""
    big = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 2 EXACT BATCH 4")
    small = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 2 REGION (0, 0, 12, 10) "
                         "EXACT BATCH 4")
    assert runtime.estimate(small, LayerTimings.fixed(small)).seconds < \
        runtime.estimate(big, LayerTimings.fixed(big)).seconds


@pytest.mark.parametrize("model,query", [
    ("net", "PATCH 4 STRIDE 2 EXACT BATCH 5"),
    ("res", "PATCH 5 STRIDE 3 EXACT BATCH 4"),
    ("res", "PATCH 3 STRIDE 1 EXACT BATCH 7"),
    ("res", "PATCH 9 STRIDE 5 REGION (3, 2, 24, 20) EXACT BATCH 3"),
])
def test_prediction_matches_what_the_executor_runs(con, model, query):
    """For every batch, the (layer, state, pixels) the estimate sums are those
    the incremental executor really runs (recorded by the timing runner)."""
    plan = plan_of(con, f"SELECT HEATMAP FROM img USING {model} {query}")
    bounds = batch_bounds(plan.n_positions, plan.bounds)
    predicted = runtime.predict_runs(plan, plan.order, bounds)
    runner = profile.timing_runner()(plan, plan.spec.module, plan.regions, plan.full_layers, plan.gather_backend)
    states = set()
    with torch.inference_mode():
        for i, runs in enumerate(predicted):
            runner.record = []
            runner.run(plan.order[bounds[i]:bounds[i + 1]], 0)
            assert [(n, s, u) for n, s, u, _ in runner.record] == runs, f"batch {i}"
            states |= {s for _, s, _ in runs}
    assert "full" in states and any(s.startswith("patch") for s in states)


def test_fit():
    assert profile.fit_line([(10, 2.0), (20, 3.0)]) == pytest.approx([1.0, 0.1])
    assert profile.fit_line([(10, 2.0)]) == pytest.approx([0.0, 0.2])        # one size: all per unit
    assert profile.fit_line([(10, 3.0), (20, 2.0)]) == pytest.approx([2.0, 0.0])  # noise: no negative slope
    assert profile.fit_line([(10, 1.0), (20, 3.0)])[0] == 0.0                  # nor a negative intercept


# ----------------------------------------------------------------------------- the cache
def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path / "x"))
    assert timing_cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(timing_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing_cache.cache_dir() == tmp_path / "xdg" / "kql"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert timing_cache.cache_dir() == tmp_path / "home" / ".cache" / "kql"


def test_write_atomic_replaces_whole_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "d" / "f.json"
    timing_cache.write_atomic(path, "one")
    timing_cache.write_atomic(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["f.json"]

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(timing_cache.os, "replace", fail)
    with pytest.raises(OSError):
        timing_cache.write_atomic(path, "three")
    assert path.read_text() == "two"                   # the old file is intact
    assert os.listdir(path.parent) == ["f.json"]       # and the temporary is gone


@pytest.fixture
def counted(monkeypatch):
    """Replace measuring by a fixed calibration and count the calls."""
    calls = []

    def fake(plan, need=None):
        calls.append(need)
        cal = LayerTimings.fixed(plan)
        cal.key = profile.timings_key(plan)
        cal.source = "measured"
        return cal
    monkeypatch.setattr(profile, "measure", fake)
    return calls


def test_calibration_is_cached_on_disk(con, counted, cache):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 EXACT BATCH 4")
    assert timing_cache.layer_timings(plan).source == "measured"
    assert len(counted) == 1
    files = list((cache / "runtime").iterdir())
    assert len(files) == 1 and files[0].name.startswith("res-incremental-")
    assert json.loads(files[0].read_text())["version"] == timing_cache.CACHE_VERSION
    # Same session: from memory; a new session: from the file. Neither measures.
    assert timing_cache.layer_timings(plan).source == "cache"
    timing_cache._MEMO.clear()
    assert timing_cache.layer_timings(plan).source == "cache"
    assert len(counted) == 1
    # Another mode family is another calibration.
    naive = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 NAIVE BATCH 4")
    timing_cache.layer_timings(naive)
    assert len(counted) == 2 and len(list((cache / "runtime").iterdir())) == 2


@pytest.mark.parametrize("garbage", ["", "{not json", "[]", '{"version": 1}',
                                     '{"version": 999, "key": {}}'])
def test_a_corrupt_cache_file_is_ignored_and_rebuilt(con, counted, cache, garbage):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 EXACT BATCH 4")
    path = timing_cache._cache_path(profile.timings_key(plan))
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    assert timing_cache.layer_timings(plan).source == "measured"
    assert len(counted) == 1
    assert LayerTimings.from_json(path.read_text(), profile.timings_key(plan), timing_cache.CACHE_VERSION) is not None


def test_a_calibration_for_another_machine_is_not_used(con, counted, cache):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 EXACT BATCH 4")
    timing_cache.layer_timings(plan)
    path = timing_cache._cache_path(profile.timings_key(plan))
    d = json.loads(path.read_text())
    assert LayerTimings.from_json(json.dumps(d), dict(d["key"], threads=d["key"]["threads"] + 1),
                                  timing_cache.CACHE_VERSION) is None


def test_missing_states_are_calibrated_and_added(con, counted, cache):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 EXACT BATCH 4")
    timing_cache.layer_timings(plan)
    path = timing_cache._cache_path(profile.timings_key(plan))
    d = json.loads(path.read_text())
    runs = runtime.predict_runs(plan, plan.order, plan.bounds)
    dropped = next(n for batch in runs for n, s, _ in batch if s == "full")
    del d["layers"][dropped]["full"]
    path.write_text(json.dumps(d))
    timing_cache._MEMO.clear()
    timing_cache.layer_timings(plan)
    assert len(counted) == 2 and (dropped, "full") in counted[1]
    assert "full" in json.loads(path.read_text())["layers"][dropped]


def test_is_calibrated_says_whether_an_estimate_would_measure(con, counted, cache, monkeypatch):
    plan = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 EXACT BATCH 4")
    assert not timing_cache.is_profiled(plan)
    timing_cache.layer_timings(plan)
    assert timing_cache.is_profiled(plan)
    timing_cache._MEMO.clear()
    assert timing_cache.is_profiled(plan)            # from the file
    assert len(counted) == 1                      # asking measures nothing
    # a cached file that lacks a state this plan needs would be extended: not calibrated
    path = timing_cache._cache_path(profile.timings_key(plan))
    d = json.loads(path.read_text())
    dropped = next(n for batch in runtime.predict_runs(plan, plan.order, plan.bounds) for n, s, _ in batch if s == "full")
    del d["layers"][dropped]["full"]
    path.write_text(json.dumps(d))
    timing_cache._MEMO.clear()
    assert not timing_cache.is_profiled(plan)
    # DRILLDOWN: stage one is a plan of its own, with its own batches; both are asked for
    dd = plan_of(con, "SELECT HEATMAP FROM img USING res PATCH 5 STRIDE 3 EXACT BATCH 4 DRILLDOWN")
    runtime.estimate(dd, timing_cache.layer_timings(dd), timing_cache.layer_timings)
    asked = []
    key = profile.timings_key
    monkeypatch.setattr(profile, "timings_key", lambda p: asked.append(p) or key(p))
    assert timing_cache.is_profiled(dd)
    assert asked == [dd, dd.drilldown.stage_one]


def test_real_calibration_of_a_tiny_model(con):
    """Measures for real (no assertion on the figures, only on the shape of
    the result and the cache it leaves)."""
    for query in ("PATCH 5 STRIDE 3 EXACT BATCH 4", "PATCH 4 STRIDE 4 NAIVE BATCH 4"):
        plan = plan_of(con, f"SELECT HEATMAP FROM img USING res {query}")
        cal = timing_cache.layer_timings(plan)
        assert cal.source == "measured" and cal.reference > 0 and cal.seconds > 0
        assert not runtime.missing_states(plan, cal) if plan.mode != "naive" else cal.layers == {}
        est = plan.runtime.get()
        assert est.seconds > 0 and "calibration cached" in est.line()  # read after the calibration above


# ----------------------------------------------------------------------------- EXPLAIN
@pytest.fixture
def fixed(monkeypatch):
    monkeypatch.setattr(timing_cache, "layer_timings", lambda plan: LayerTimings.fixed(plan))


def test_explain_shows_the_estimate(con, fixed):
    e = con.execute("EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 EXACT BATCH 4")
    lines = e.text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("estimated time: "))
    assert lines[i - 1].startswith("   └─ Occlude ") and lines[i + 1] == ""  # right under the plan tree
    est = e.plan.runtime.get()
    nb = len(e.plan.bounds) - 1
    assert lines[i] == (f"estimated time: {format_seconds(est.seconds)} on this machine (cpu, 1 thread; "
                        f"fixed calibration): reference 10.0 ms + views 10.0 ms + {nb} batches "
                        f"{format_seconds(est.parts['batches'])}")
    naive = con.execute("EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 NAIVE BATCH 4").text
    assert "fixed calibration): reference 10.0 ms + 25 batches " in naive


def test_explain_says_when_it_calibrates_and_when_it_reads_the_cache(con):
    query = "EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 EXACT BATCH 4"
    first = con.execute(query).text
    assert "; calibrated now in " in first and ", cached): " in first
    second = con.execute(query).text
    assert "; calibration cached 20" in second and " UTC): " in second


def test_explain_analyze_compares_estimate_and_actual(con, fixed):
    e = con.execute("EXPLAIN ANALYZE SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2 NAIVE BATCH 4")
    lines = e.text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("estimated time: "))
    assert lines[i - 1].startswith("measured: ")
    assert lines[i + 1].startswith("estimated ") and "actual " in lines[i + 1]
    assert lines[i + 1].endswith(" %; reference inference + occlusion)")
    est = e.plan.runtime.get().seconds
    actual = e.result.timings["reference"] + e.result.timings["occlusion"]
    assert f"({'+' if est >= actual else '−'}{abs(est - actual) / actual * 100:.0f} %;" in lines[i + 1]


def test_select_never_calibrates(con, monkeypatch):
    def boom(plan, need=None):
        raise AssertionError("SELECT calibrated")
    monkeypatch.setattr(profile, "measure", boom)
    con.execute("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2")


def test_a_failed_calibration_does_not_fail_explain(con, monkeypatch):
    def boom(plan, need=None):
        raise RuntimeError("out of memory\nmore")
    monkeypatch.setattr(profile, "measure", boom)
    text = con.execute("EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 2").text
    assert "estimated time: unavailable (calibration failed: RuntimeError: out of memory)" in text.splitlines()
