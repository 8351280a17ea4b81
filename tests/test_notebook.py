"""KQL in a notebook, run headless (nbclient, an ipykernel kernel): results
display themselves (PNG, HTML), EXPLAIN as preformatted text, and ``%kql`` /
``%%kql`` take their bindings from the notebook's variables."""
from __future__ import annotations

import json
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

CELLS = [
    """%load_ext kql.magic
import numpy as np, torch, torch.nn as nn, kql
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(4, 5)).eval()
img = np.random.default_rng(0).random((16, 16, 3))""",
    "r = %kql SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 LABEL TOP 3\nr",
    """%%kql
SET batch_size = 8;
EXPLAIN SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4""",
    "%kql SELECT HEATMAP FROM img USING net PATCH 40 STRIDE 4",
    "print(r.labels, r.maps.shape)\nkql.occlusion(net, torch.randn(1, 3, 16, 16), 4, 4)[0]",
]


def test_a_notebook_runs_headless(tmp_path, monkeypatch):
    # a kernel of this interpreter (the one KQL is installed in), whatever else is on PATH
    spec = tmp_path / "kernels" / "kql-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kql test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="kql-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [cell.outputs for cell in nb.cells]

    def data(i, mime):
        return [o["data"][mime] for o in outputs[i] if o.get("output_type") == "execute_result"
                and mime in o.get("data", {})]

    assert not any(o.get("output_type") == "error" for cell in outputs for o in cell), outputs
    # a result displays as its figure, and as HTML with the summary line
    assert data(1, "image/png") and data(1, "text/html")
    assert "3 labels" in data(1, "text/html")[0]
    # EXPLAIN: preformatted text
    html = data(2, "text/html")[0]
    assert html.startswith("<pre>") and "Plan (exact)" in html and "batch: ≤8" in html
    # a bad query: one error line, no traceback
    text = "".join(o.get("text", "") for o in outputs[3])
    assert text.startswith("error: patch 40x40 does not fit image 16x16") and "Traceback" not in text
    # the tensor API's results display too
    assert "[" in "".join(o.get("text", "") for o in outputs[4]) and data(4, "image/png")
