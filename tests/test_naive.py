"""The NAIVE executor against the definition of an occlusion heatmap.

The oracle below is the plainest possible loop, independent of KQL's code:
for every patch position clone the (normalised) image, paste the fill colour
at (y, x), run the model on that one image, softmax, take the label's
probability. NAIVE must match it on every position for several small models,
non-square images / patches / strides, REGION crops, strides that do not
divide the image (the grid then gets one more row / column flush with the
far edge: the positions are checked as literal lists), batch sizes 1 and 5
and every COLOR.

Also: Ctrl-C during a query (a model whose forward raises KeyboardInterrupt)
raises QueryInterrupted, a KeyboardInterrupt, and leaves no output file.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from torch import nn

import kql
from kql.errors import ExecutionError, QueryInterrupted
from kql.repl import main
from helpers import rand_image

H, W = 14, 19
IMAGE = rand_image(H, W)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Residual(nn.Module):
    """Stride-2 conv, batch norm, a residual add and max pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.conv(x))
        x = self.pool(x)
        return self.head(x.mean((2, 3)))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed({"plain": 0, "deep": 1, "residual": 2}[kind])
    if kind == "plain":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 3))
    elif kind == "deep":
        model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), nn.Sigmoid(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    else:
        model = Residual()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


# (model, normalised?) ; normalisation is checked on one model so the oracle has to apply it too.
MODELS = {"plain": False, "deep": True, "residual": False}


def oracle(model, image, mean, std, patch, ys, xs, rgb, label):
    """Heatmap by the definition: one occluded copy at a time, no batching, no KQL code."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1) - mean_t) / std_t
    fill = ((torch.tensor(rgb, dtype=torch.float32) - mean_t.view(3)) / std_t.view(3)).view(3, 1, 1)
    ph, pw = patch
    out = np.zeros((len(ys), len(xs)), dtype=np.float64)
    with torch.no_grad():
        p0 = torch.softmax(model(x[None]), dim=1)[0]
        label = int(p0.argmax()) if label is None else label
        for i, y in enumerate(ys):
            for j, x0 in enumerate(xs):
                occluded = x.clone()
                occluded[:, y:y + ph, x0:x0 + pw] = fill
                out[i, j] = torch.softmax(model(occluded[None]), dim=1)[0, label]
    return out, label, float(p0[label])


# (query clauses, patch (h, w), expected ys, expected xs)
GRIDS = {
    # 14 - 4 = 10 is not a multiple of 3: rows 0, 3, 6, 9 and then 10, flush with the bottom;
    # 19 - 5 = 14 is not a multiple of 4: columns 0, 4, 8, 12 and then 14.
    "uneven": ("PATCH 4x5 STRIDE 3x4", (4, 5), [0, 3, 6, 9, 10], [0, 4, 8, 12, 14]),
    # Stride 5 divides 19 - 4 = 15 (columns); 14 - 2 = 12 is not a multiple of 5 (rows).
    "tall strides": ("PATCH 2x4 STRIDE 5", (2, 4), [0, 5, 10, 12], [0, 5, 10, 15]),
    # A crop: rows [3, 12), columns [2, 15). Rows 3, 6 then 8 (= 12 - 4); columns 2, 7, 12 (= 15 - 3).
    "region": ("PATCH 4x3 STRIDE 3x5 REGION (2, 3, 15, 12)", (4, 3), [3, 6, 8], [2, 7, 12]),
    # A one-pixel patch over a thin crop at the image's right edge.
    "edge region": ("PATCH 1 STRIDE 2 REGION (16, 0, 19, 5)", (1, 1), [0, 2, 4], [16, 18]),
}

# (COLOR clause or "", the fill as RGB in [0, 1])
COLORS = {
    "default gray": ("", (128 / 255,) * 3),
    "black": ("COLOR BLACK", (0.0, 0.0, 0.0)),
    "gray": ("COLOR GRAY", (128 / 255,) * 3),
    "mean": ("COLOR MEAN", tuple(IMAGE.reshape(-1, 3).astype(np.float64).mean(axis=0))),
    "rgb": ("COLOR (255, 0, 64)", (1.0, 0.0, 64 / 255)),
    "value": ("COLOR 200", (200 / 255,) * 3),
}


@pytest.fixture(scope="module")
def con():
    c = kql.connect(progress="off")
    c.register_image("img", IMAGE)
    for kind, normalised in MODELS.items():
        c.register_model(kind, make_model(kind), mean=MEAN if normalised else None,
                         std=STD if normalised else None)
    return c


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("grid", GRIDS, ids=GRIDS.keys())
@pytest.mark.parametrize("kind", MODELS)
def test_naive_matches_the_definition(con, kind, grid, batch):
    clauses, patch, ys, xs = GRIDS[grid]
    color = list(COLORS)[(list(GRIDS).index(grid) + list(MODELS).index(kind)) % len(COLORS)]
    r = con.execute(f"SELECT HEATMAP FROM img USING {kind} {clauses} {COLORS[color][0]} NAIVE BATCH {batch}")
    assert r.mode == "naive" and r.plan.batch_size == min(batch, len(ys) * len(xs))
    assert r.ys.tolist() == ys and r.xs.tolist() == xs
    assert r.heatmap.shape == (len(ys), len(xs))
    mean, std = (MEAN, STD) if MODELS[kind] else ((0.0,) * 3, (1.0,) * 3)
    expected, label, p0 = oracle(con.catalog.models[kind].module, IMAGE, mean, std, patch, ys, xs,
                                 COLORS[color][1], None)
    assert r.label == label
    assert r.p_original == pytest.approx(p0, abs=1e-6)
    np.testing.assert_allclose(r.heatmap, expected, rtol=0, atol=2e-6)
    # The occlusion changes something: the comparison is not between two constant maps.
    assert np.ptp(expected) > 1e-4


@pytest.mark.parametrize("color", COLORS, ids=COLORS.keys())
def test_every_color(con, color):
    clause, rgb = COLORS[color]
    r = con.execute(f"SELECT HEATMAP FROM img USING deep PATCH 5 STRIDE 3 {clause} LABEL 2 NAIVE BATCH 5")
    ys, xs = [0, 3, 6, 9], [0, 3, 6, 9, 12, 14]
    assert r.ys.tolist() == ys and r.xs.tolist() == xs
    expected, label, _ = oracle(con.catalog.models["deep"].module, IMAGE, MEAN, STD, (5, 5), ys, xs, rgb, 2)
    assert r.label == label == 2
    np.testing.assert_allclose(r.heatmap, expected, rtol=0, atol=2e-6)


def test_batch_size_does_not_change_the_result(con):
    query = "SELECT HEATMAP FROM img USING residual PATCH 3 STRIDE 2 LABEL 4 NAIVE BATCH {}"
    maps = [con.execute(query.format(b)).heatmap for b in (1, 5, 64)]
    np.testing.assert_allclose(maps[0], maps[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps[0], maps[2], rtol=0, atol=1e-6)


def test_one_position(con):
    """A patch the size of the image: one position, one occluded image all fill colour."""
    r = con.execute(f"SELECT HEATMAP FROM img USING plain PATCH {H}x{W} STRIDE 1 COLOR BLACK NAIVE")
    assert r.ys.tolist() == [0] and r.xs.tolist() == [0]
    expected, _, _ = oracle(con.catalog.models["plain"].module, IMAGE, (0.0,) * 3, (1.0,) * 3, (H, W),
                            [0], [0], (0.0, 0.0, 0.0), r.label)
    np.testing.assert_allclose(r.heatmap, expected, rtol=0, atol=2e-6)


# ---------------------------------------------------------------- interruption

class CtrlC(nn.Module):
    """A model whose forward raises KeyboardInterrupt on its ``at``-th call with
    a real tensor (tracing calls it with fx proxies, which do not count)."""

    def __init__(self, at: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = make_model("plain")
        self.at = at
        self.calls = 0

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return self.body(x)


def test_ctrl_c_raises_query_interrupted_and_writes_nothing(tmp_path):
    con = kql.connect(progress="off")
    model = CtrlC()
    out = tmp_path / "heat.png"
    # Call 1 is the unoccluded reference, call 2 the first batch, call 3 the second batch.
    with pytest.raises(QueryInterrupted) as info:
        con.execute(f"SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4 NAIVE BATCH 1 INTO '{out}'",
                    img=IMAGE, m=model)
    assert isinstance(info.value, KeyboardInterrupt) and isinstance(info.value, ExecutionError)
    assert str(info.value) == "interrupted after 1 of 20 positions; nothing was written"
    assert model.calls == 3
    assert os.listdir(tmp_path) == []           # no heat.png, and no temporary file either
    # The session still works afterwards.
    r = con.execute(f"SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4 NAIVE BATCH 7 INTO '{out}'",
                    img=IMAGE, m=model)
    assert r.heatmap.shape == (4, 5) and os.listdir(tmp_path) == ["heat.png"]


def test_ctrl_c_in_the_shell(tmp_path):
    con = kql.connect(progress="off")
    con.register_image("img", IMAGE)
    con.register_model("m", CtrlC())
    stdout, stderr = io.StringIO(), io.StringIO()
    out = tmp_path / "heat.npy"
    status = main(["-c", f"SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4 NAIVE BATCH 2 INTO '{out}'; HELP"],
                  connection=con, stdin=io.StringIO(), stdout=stdout, stderr=stderr)
    assert (status, stdout.getvalue(), stderr.getvalue()) == (130, "", "interrupted\n")
    assert os.listdir(tmp_path) == []
