"""executor.common.batch_hook: progress reports and cooperative cancellation
reach every executor's batch loop without any argument passed along."""
from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import kql
from kql.executor.common import batch_hook, run_batches
from helpers import rand_pixels, small_cnn

PIXELS = rand_pixels(32, 32)


def tiny_net() -> nn.Module:
    return small_cnn(widths=(4, 4), classes=2)


QUERY = "SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 LABEL 1 BATCH 8 {mode}"


def test_run_batches_reports_every_batch():
    seen = []
    with batch_hook(lambda done, total: seen.append((done, total))):
        run_batches(10, 4, lambda sl: None, progress="off")
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]
    # outside the block nothing is reported
    run_batches(10, 4, lambda sl: None, progress="off")
    assert len(seen) == 4


def test_hook_of_array_bounds_counts_positions():
    seen = []
    with batch_hook(lambda done, total: seen.append(done)):
        run_batches(7, np.array([0, 3, 7]), lambda sl: None, progress="off")
    assert seen == [0, 3, 7]


def test_rounds_of_a_longer_loop_report_against_its_total():
    """Refinement runs one run_batches per stage over one bar: the hook counts
    the whole loop's positions and sees 0 once."""
    seen = []
    with batch_hook(lambda done, total: seen.append((done, total))):
        run_batches(4, 2, lambda sl: None, progress="off", before=0, total=10)
        run_batches(6, 3, lambda sl: None, progress="off", before=4, total=10)
    assert seen == [(0, 10), (2, 10), (4, 10), (7, 10), (10, 10)]

    def stop(done, total):
        if done > 4:
            raise KeyboardInterrupt
    with batch_hook(stop), pytest.raises(kql.QueryInterrupted) as info:
        run_batches(6, 3, lambda sl: None, progress="off", before=4, total=10)
    assert str(info.value) == "interrupted after 7 of 10 positions; nothing was written"


@pytest.mark.parametrize("mode", ["NAIVE", "EXACT"])
def test_hook_sees_both_executors(mode):
    con = kql.connect(progress="off")
    seen = []
    with batch_hook(lambda done, total: seen.append((done, total))):
        r = con.execute(QUERY.format(mode=mode), img=PIXELS, net=tiny_net())
    assert r.mode == mode.lower()
    assert seen[0] == (0, 64) and seen[-1] == (64, 64)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 3


@pytest.mark.parametrize("mode", ["NAIVE", "EXACT"])
def test_hook_cancels_between_batches(mode):
    con = kql.connect(progress="off")
    calls = []

    def cancel_after_first_batch(done, total):
        calls.append(done)
        if done > 0:
            raise kql.QueryInterrupted("cancelled")

    with batch_hook(cancel_after_first_batch), pytest.raises(kql.QueryInterrupted) as info:
        con.execute(QUERY.format(mode=mode), img=PIXELS, net=tiny_net())
    assert len(calls) == 2 and calls[0] == 0
    assert str(info.value) == f"interrupted after {calls[1]} of 64 positions; nothing was written"
    # the session still works afterwards
    assert con.execute(QUERY.format(mode=mode), img=PIXELS, net=tiny_net()).heatmap.shape == (8, 8)
