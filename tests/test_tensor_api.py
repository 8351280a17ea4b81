"""The tensor API (``kql.occlusion``) and several labels from one run, in
the API and in the language (``LABEL TOP k``, ``LABEL ALL``, a list)."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

import kql
from kql.errors import ExecutionError, ParseError, PlanError


def _net(classes: int = 6) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, classes))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    return net.eval()


NET = _net()
X = torch.randn(3, 3, 20, 18, generator=torch.Generator().manual_seed(1))


def _naive_scores(x, fill, ys, xs, patch, score):
    """Occlude by hand and score: the definition, for every position."""
    out = []
    with torch.no_grad():
        for y in ys:
            row = []
            for x0 in xs:
                z = x.clone()
                z[:, y:y + patch[0], x0:x0 + patch[1]] = fill[:, y:y + patch[0], x0:x0 + patch[1]]
                row.append(score(NET(z[None]))[0])
            out.append(torch.stack(row))
    return torch.stack(out)  # rows, cols, K


@pytest.mark.parametrize("mode", ["exact", "naive"])
@pytest.mark.parametrize("score, fn", [("softmax", lambda o: o.softmax(1)), ("logits", lambda o: o),
                                      ("sigmoid", lambda o: o.sigmoid()),
                                      (lambda o: o.tanh(), lambda o: o.tanh())])
def test_every_target_of_every_input_matches_occluding_by_hand(mode, score, fn):
    baseline = torch.randn(1, 3, 20, 18, generator=torch.Generator().manual_seed(2))
    results = kql.occlusion(NET, X, patch=(5, 4), stride=(3, 4), target=[[0, 5], 2, [4, 1, 3]],
                            baseline=baseline, score=score, mode=mode)
    assert [r.labels for r in results] == [[0, 5], [2], [4, 1, 3]]
    for n, r in enumerate(results):
        truth = _naive_scores(X[n], baseline[0], r.ys, r.xs, r.patch, fn)
        for t, label in enumerate(r.labels):
            np.testing.assert_allclose(r.maps[t], truth[..., label].numpy(), atol=2e-5, rtol=0)
        np.testing.assert_allclose(r.originals, fn(NET(X[n:n + 1]))[0, r.labels].detach().numpy(), atol=1e-5)
        assert r.mode == mode and r.plan.mode == mode
        assert set(r.timings) >= {"plan", "reference", "occlusion", "total"}


@pytest.mark.parametrize("baseline", [0.0, [0.5, -1.0, 2.0], torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1),
                                      torch.randn(3, 20, 18, generator=torch.Generator().manual_seed(4))])
def test_baseline_kinds_and_the_grid_that_clips(baseline):
    if isinstance(baseline, list):
        full = torch.tensor(baseline).view(3, 1, 1).expand(3, 20, 18)
    else:
        full = torch.broadcast_to(torch.as_tensor(baseline, dtype=torch.float32), (3, 20, 18))
    (r,) = kql.occlusion(NET, X[:1], patch=6, stride=5, target=1, baseline=baseline, score="logits", grid="clip")
    assert r.ys.tolist() == [0, 5, 10, 15] and r.xs.tolist() == [0, 5, 10, 15]   # Captum's starts
    with torch.no_grad():
        for i, y in enumerate(r.ys):
            for j, x0 in enumerate(r.xs):
                z = X[0].clone()
                z[:, y:y + 6, x0:x0 + 6] = full[:, y:y + 6, x0:x0 + 6]   # clipped at the edge
                assert abs(float(NET(z[None])[0, 1]) - float(r.maps[0, i, j])) < 2e-5


def test_a_function_around_the_model_top_k_and_all():
    fn = lambda x: NET(x) * 2.0  # noqa: E731
    top = kql.occlusion(fn, X[0], patch=4, stride=4, top=3, score="logits")[0]
    every = kql.occlusion(NET, X[0], patch=4, stride=4, target="all", score="logits")[0]
    assert top.labels == torch.argsort(NET(X[:1])[0], descending=True)[:3].tolist()
    assert every.labels == list(range(6))
    for label in top.labels:
        np.testing.assert_allclose(top.map(label), 2.0 * every.map(label), atol=5e-5)


def test_approximate_mode_runs_through_the_same_planner():
    (r,) = kql.occlusion(NET, X[:1], patch=4, stride=2, target=0, mode="approx", tau=0.5)
    assert r.mode == "approx" and r.tau == 0.5
    assert any(w.rule == "approximate" for w in r.plan.rewrites)


def test_result_attribution_is_the_mean_drop_over_covering_windows():
    (r,) = kql.occlusion(NET, X[:1], patch=4, stride=2, target=3, score="logits")
    attr = r.attribution()
    i, j = 5, 7   # covered by the windows starting at rows 2, 4 and columns 4, 6
    drops = [r.p_original - r.heatmap[list(r.ys).index(y), list(r.xs).index(x)] for y in (2, 4) for x in (4, 6)]
    assert attr.shape == (20, 18)
    assert abs(attr[i, j] - np.mean(drops)) < 1e-5


def test_results_show_themselves_in_notebooks():
    (r,) = kql.occlusion(NET, X[:1], patch=4, stride=4, top=2)
    png = r._repr_png_()
    assert png.startswith(b"\x89PNG")
    html = r._repr_html_()
    assert "<img src=\"data:image/png;base64," in html and "2 labels" in html
    assert np.load(io.BytesIO(r.to_bytes(".npy"))).shape == (2, 5, 5)
    assert isinstance(r, kql.HeatmapResult)


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(inputs=np.zeros((1, 3, 8, 8))), TypeError, "torch.Tensor"),
    (dict(inputs=torch.zeros(3, 8)), ValueError, r"\(N, C, H, W\)"),
    (dict(model="net"), TypeError, "nn.Module"),
    (dict(patch=0), ValueError, "at least 1"),
    (dict(patch=(2, 4, 4)), ValueError, "span all 3 channels"),
    (dict(patch=30), ValueError, "does not fit"),
    (dict(stride=1.5), TypeError, "int"),
    (dict(target=[1, 2]), ValueError, "one entry per input"),
    (dict(target=9), ValueError, "out of range"),
    (dict(target="cat"), ValueError, "'all'"),
    (dict(baseline=torch.zeros(2, 2)), ValueError, "does not broadcast"),
    (dict(baseline=[1.0, 2.0]), ValueError, "one per channel"),
    (dict(score="relu"), ValueError, "score must be"),
    (dict(mode="fast"), ValueError, "mode must be"),
    (dict(mode="approx"), ValueError, "needs tau"),
    (dict(region=(0, 0, 40, 4)), ValueError, "does not lie inside"),
    (dict(top=0), ValueError, "positive"),
])
def test_bad_input_is_a_clear_error(kwargs, error, text):
    args = dict(model=NET, inputs=X[:1], patch=4, stride=4)
    args.update(kwargs)
    with pytest.raises(error, match=text):
        kql.occlusion(args.pop("model"), args.pop("inputs"), args.pop("patch"), args.pop("stride"), **args)


def test_an_untraceable_model_is_a_value_error_naming_it():
    class Branchy(nn.Module):
        def forward(self, x):
            return NET(x) if x.sum() > 0 else -NET(x)

    with pytest.raises(ValueError, match="cannot plan Branchy"):
        kql.occlusion(Branchy(), X[:1], 4, 4)


def test_a_float64_model_runs_as_a_float32_copy_and_stays_float64():
    net64 = copy.deepcopy(NET).double()
    with pytest.warns(UserWarning, match="'Sequential' holds float64 weights.*float32 copy"):
        got = kql.occlusion(net64, X[:1].double(), 4, 4, target=[[1, 4]])[0]
    ref = kql.occlusion(NET, X[:1], 4, 4, target=[[1, 4]])[0]
    assert np.abs(np.asarray(got.maps) - np.asarray(ref.maps)).max() < 1e-6
    assert {p.dtype for p in net64.parameters()} == {torch.float64}
    # a function's code calls the float64 modules themselves: a copy would not be what runs
    with pytest.raises(TypeError, match="runs modules with float64 weights.*float32"):
        kql.occlusion(lambda v: net64(v).softmax(1), X[:1], 4, 4)
    # and in queries: registered as a float32 copy
    con = kql.connect(progress="off")
    with pytest.warns(UserWarning, match="float32 copy"):
        con.register_model("net64", net64)
    con.register_model("net32", NET)
    con.register_image("img", np.random.default_rng(0).random((20, 18, 3)))
    heat = {m: con.execute(f"SELECT HEATMAP FROM img USING {m} PATCH 4 STRIDE 4 LABEL 2").heatmap
            for m in ("net64", "net32")}
    assert np.abs(heat["net64"] - heat["net32"]).max() < 1e-6


# -- the language -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def con():
    c = kql.connect(progress="off")
    c.register_model("net", NET, labels=[f"c{i}" for i in range(6)])
    c.register_image("img", np.random.default_rng(0).random((20, 18, 3)))
    return c


@pytest.mark.parametrize("clause, labels", [
    ("LABEL TOP 3", None), ("LABEL ALL", [0, 1, 2, 3, 4, 5]), ("LABEL 4, 'c1', 2", [4, 1, 2]),
])
@pytest.mark.parametrize("mode", ["EXACT", "NAIVE"])
def test_several_labels_equal_one_query_per_label(con, clause, labels, mode):
    r = con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 {clause} {mode}")
    if labels is None:
        probs = torch.softmax(NET(r.plan.input[None]), 1)[0]
        labels = torch.argsort(probs, descending=True)[:3].tolist()
    assert r.labels == labels and r.label == labels[0] and r.label_names == [f"c{i}" for i in labels]
    for label in labels:
        one = con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 LABEL {label} NAIVE")
        np.testing.assert_allclose(r.map(label), one.heatmap, atol=1e-5, rtol=0)
        assert abs(float(r.originals[r.labels.index(label)]) - one.p_original) < 1e-6
    assert r.select(labels[-1]).label == labels[-1]


def test_several_labels_in_explain_and_png(con, tmp_path):
    text = str(con.explain("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 LABEL TOP 2"))
    assert "labels: TOP 2" in text and "LABEL TOP 2: 2 maps from one run" in text
    out = tmp_path / "two.png"
    con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 LABEL 1, 2 INTO '{out}'")
    assert out.read_bytes().startswith(b"\x89PNG")
    npy = tmp_path / "two.npy"
    con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 LABEL 1, 2 INTO '{npy}'")
    assert np.load(npy).shape == (2, 7, 6)   # rows 0, 3, ..., 15, 16; columns 0, 3, ..., 14


@pytest.mark.parametrize("query, error, text", [
    ("LABEL TOP 7", PlanError, "between 1 and the model's 6 classes"),
    ("LABEL TOP 0", PlanError, "between 1"),
    ("LABEL 1, 9", PlanError, "out of range"),
    ("LABEL 1, 'dog'", PlanError, "unknown label 'dog'"),
    ("LABEL TOP 2 DRILLDOWN", PlanError, "DRILLDOWN takes one label"),
    ("LABEL TOP", ParseError, "expected an integer"),
    ("LABEL ALL, 2", ParseError, "unexpected ','"),
])
def test_bad_label_clauses(con, query, error, text):
    with pytest.raises(error, match=text):
        con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 {query}")


def test_label_clauses_print_back_as_written():
    from kql.ast import select_text
    from kql.parser import parse
    for clause in ("LABEL TOP 5", "LABEL ALL", "LABEL 3, 'tabby cat', PREDICTED"):
        q = f"SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 8 {clause}"
        assert clause in select_text(parse(q))


def test_top_k_larger_than_the_outputs_of_a_model_without_known_classes():
    con = kql.connect(progress="off")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 4 outputs, no Linear
    with pytest.raises(ExecutionError, match="TOP 5: the model has 4 outputs"):
        con.execute("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 LABEL TOP 5",
                    img=np.zeros((12, 12, 3)), net=net)


def test_explain_renders_a_tensor_plan_from_its_records():
    from kql.planner.explain import plan_tree, tree_lines
    r = kql.occlusion(NET, X[:1], 4, 4, target=[[1, 3]], baseline=0.5)[0]
    text = "\n".join(tree_lines(plan_tree(r.plan)))
    assert "color: (0.5, 0.5, 0.5)" in text and "labels: 1, 3 (one run, a map each)" in text
    assert r.plan.label_choice.classes(torch.zeros(6)) == [1, 3]
