"""The documentation's examples run.

- Every ```kql block of docs/language.md and README.md parses, and runs, in
  document order, in one session per file (later blocks use names that earlier
  ones LOAD).
- Every ```python block of docs/api.md runs, in order, in one namespace (like
  the cells of a notebook); the blocks assert what they show. So do those of
  docs/web.md (the web API through Starlette's test client).

Everything runs in a temporary directory holding the files the examples name
(``photos/cat.png``, ``weights/lite0_finetuned.pth``, ``models/tiny_cnn.pt``),
so ``INTO`` files land there. One test per document: the blocks of a document
depend on each other, so they must run in one process, in order.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kql
from kql.parser import parse_script
from kql.result import HeatmapResult

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE = ROOT / "docs" / "language.md"
API = ROOT / "docs" / "api.md"
WEB = ROOT / "docs" / "web.md"
COMPAT = ROOT / "docs" / "compat.md"
README = ROOT / "README.md"
DOC_PAGES = ("index.md", "language.md", "api.md", "architecture.md", "speedup.md", "web.md", "compat.md")


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block tagged ``lang`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory with the files the examples read."""
    from kql import sources
    root = tmp_path_factory.mktemp("docs")
    (root / "photos").mkdir()
    shutil.copy(sources.SAMPLE_IMAGES["chelsea"].file, root / "photos" / "cat.png")
    (root / "weights").mkdir()
    torch.save(sources.load_model("efficientnet_lite0").module.state_dict(),
               root / "weights" / "lite0_finetuned.pth")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(tiny_cnn(), root / "models" / "tiny_cnn.pt")
    return root


def run_kql_blocks(path: Path, workspace: Path, monkeypatch) -> list:
    """Run every kql block of ``path`` in one session; return all results."""
    monkeypatch.chdir(workspace)
    found = blocks(path, "kql")
    assert found, f"{path.name} has no ```kql blocks"
    con = kql.connect(progress="off")
    results = []
    for line, text in found:
        try:
            got = con.executescript(text)
        except kql.KqlError as e:
            pytest.fail(f"{path.name}, ```kql block at line {line} failed: {type(e).__name__}: {e}\n{text}")
        assert len(got) == len(parse_script(text)), f"{path.name} line {line}: a statement did not run"
        for r in got:
            if isinstance(r, HeatmapResult):
                assert r.heatmap.size > 0 and np.isfinite(r.heatmap).all(), f"{path.name} line {line}: {r}"
                assert ((r.heatmap >= 0) & (r.heatmap <= 1)).all(), f"{path.name} line {line}: {r}"
        results += got
    return results


def test_every_kql_block_parses():
    for path in (LANGUAGE, README):
        for line, text in blocks(path, "kql"):
            try:
                parse_script(text)
            except kql.ParseError as e:
                pytest.fail(f"{path.name}, ```kql block at line {line}: {e}\n{e.caret}")


@pytest.mark.slow  # every query of docs/language.md, real models
def test_language_examples_run(workspace, monkeypatch):
    results = run_kql_blocks(LANGUAGE, workspace, monkeypatch)
    heatmaps = [r for r in results if isinstance(r, HeatmapResult)]
    assert len(heatmaps) >= 10
    # the INTO examples wrote their files
    assert (workspace / "coffee.png").stat().st_size > 0
    assert np.load(workspace / "coffee.npy").shape == (2, 2)
    # LABEL 'tabby' resolved to the ImageNet class
    assert any(r.label_name == "tabby cat" for r in heatmaps)


@pytest.mark.slow  # real models
def test_readme_examples_run(workspace, monkeypatch):
    run_kql_blocks(README, workspace, monkeypatch)


def run_python_blocks(path: Path) -> None:
    """Run every python block of ``path`` in order, in one namespace."""
    found = blocks(path, "python")
    assert found, f"{path.name} has no ```python blocks"
    namespace: dict = {"__name__": path.stem + "_md"}
    for line, text in found:
        try:
            exec(compile(text, f"docs/{path.name}:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{path.name}, ```python block at line {line} failed: {type(e).__name__}: {e}\n{text}")


@pytest.mark.slow  # real models
def test_api_examples_run(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    run_python_blocks(API)


def test_compat_examples_run(workspace, monkeypatch):
    pytest.importorskip("captum")
    pytest.importorskip("monai")
    monkeypatch.chdir(workspace)
    run_python_blocks(COMPAT)


def test_web_examples_run(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    run_python_blocks(WEB)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    out = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_doc_links_resolve():
    """Relative links between the doc pages point at files and headings that
    exist (performance.md is written separately and may not exist yet)."""
    for page in DOC_PAGES + ("../README.md",):
        path = (ROOT / "docs" / page).resolve()
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.endswith("performance.md"):
                continue
            linked = (path.parent / target) if target else path
            assert linked.exists(), f"{path.name} links to missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{path.name} links to missing heading {target}#{anchor}"
