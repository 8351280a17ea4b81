"""Every error a user can cause, asserted by its exact text.

Each case of ``CASES`` runs twice: through the Python API
(``kql.connect(progress="off").execute``), where ``str(error)`` must equal the
message, and through the ``kql -c`` command (``kql.repl.main``), which must
print ``error: <message>`` (plus the caret lines for a parse error) on stderr
and exit with status 1. The shell must also keep going after every one of
them. Messages are part of the interface (kql/errors.py): change one only
together with its case here.

Everything runs on tiny bound models and a 16x20 image, in a temporary
directory so paths in messages are short; the only torchvision model built is
squeezenet1_0 (for ImageNet labels and weights files), which is fast.
"""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import kql
from kql.errors import ExecutionError, KqlError, ParseError, PlanError, SettingError
from kql.repl import main
from kql.settings import Settings
from helpers import rand_image

IMAGE = rand_image(16, 20)
WELCOME_END = "quit leaves.\n"


def tiny(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


class Branchy(nn.Module):
    """Python control flow on tensor values in its own forward: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Nested(nn.Module):
    """Traceable itself, but its submodule ``gate`` is not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def _torch_error(fn) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    raise AssertionError("expected a RuntimeError")


# torch's own words for BatchOfOne's failure ("addmm: mat1 and mat2 ..." in some
# releases, without "addmm: " in others): the test is about how KQL reports it.
LINEAR_1x16_4x2 = _torch_error(lambda: nn.functional.linear(torch.zeros(1, 16), torch.zeros(2, 4)))


class BatchOfOne(nn.Module):
    """Traces and runs on one image, fails on a batch of several (x.view(1, -1))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).view(1, -1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Files the cases name: a corrupt image, weights files, a directory."""
    d = tmp_path_factory.mktemp("errors")
    (d / "x.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (d / "adir.png").mkdir()
    torch.manual_seed(0)
    squeeze = torchvision.models.squeezenet1_0(num_classes=10).eval()
    state = squeeze.state_dict()
    torch.save(state, d / "sq.pth")
    keys = dict(state)
    del keys["features.0.weight"]
    keys["extra.weight"] = torch.zeros(2)
    torch.save(keys, d / "keys.pth")
    shapes = dict(state)
    shapes["features.0.weight"] = torch.zeros(96, 3, 5, 5)
    torch.save(shapes, d / "shapes.pth")
    torch.save(squeeze, d / "whole.pth")             # a pickled module: needs code to load
    return d


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


@pytest.fixture(scope="module")
def con():
    c = kql.connect(progress="off")
    c.register_image("img", IMAGE)
    c.register_model("net", tiny())
    c.register_model("pets", tiny(), labels=["cat", "dog", "tabby cat"])
    c.register_model("branchy", Branchy())
    c.register_model("nested", Nested())
    c.register_model("batchofone", BatchOfOne())
    return c


@dataclass
class Case:
    query: str
    error: type
    message: str
    caret: Optional[str] = None      # for a ParseError: the line and the "^" under the column

    def printed(self, end: str = ";") -> str:
        """What the shell prints on stderr when the query's line ends with ``end``."""
        if not self.caret:
            return f"error: {self.message}\n"
        line, marker = self.caret.split("\n")
        return f"error: {self.message}\n{line}{end}\n{marker}\n"


def select(clauses: str, source: str = "img", model: str = "net") -> str:
    return f"SELECT HEATMAP FROM {source} USING {model} {clauses}"


REGION_RULE = "(REGION takes (x0, y0, x1, y1) with 0 <= x0 < x1 <= 20 and 0 <= y0 < y1 <= 16)"
EMPTY_REGION = ("is empty: REGION takes (x0, y0, x1, y1), the left, top, right and bottom edges, "
                "with x0 < x1 and y0 < y1")
PICKLED_WEIGHTS = ("weights 'whole.pth' hold pickled code (torchvision.models.squeezenet.SqueezeNet); "
                   "loading them would run code from the file. Save a state dict instead "
                   "(torch.save(model.state_dict(), ...)), or use LOAD MODEL 'whole.pth' AS <name> "
                   "TRUSTED if you trust it")
SETTINGS = sorted(f.name for f in dataclasses.fields(Settings))   # the message lists them all
FX_CONTROL_FLOW = ("symbolically traced variables cannot be used as inputs to control flow (KQL plans "
                   "over a torch.fx trace: replace Python if/for on tensor values in that module with "
                   "tensor ops such as torch.where)")

CASES = {
    # ---- syntax
    "unknown keyword": Case(
        "SELEKT HEATMAP FROM img USING net PATCH 4 STRIDE 4", ParseError,
        "line 1, column 1: unexpected 'SELEKT' (did you mean SELECT?); expected one of DESCRIBE, "
        "EXPLAIN, HELP, LOAD, SELECT, SET, SHOW or TUNE",
        "SELEKT HEATMAP FROM img USING net PATCH 4 STRIDE 4\n^"),
    "unknown clause": Case(
        select("PATCH 4 STRIDE 4 COLOUR BLACK"), ParseError,
        "line 1, column 52: unexpected 'COLOUR' (did you mean COLOR?); expected one of APPROX, BATCH, "
        "COLOR, DRILLDOWN, EXACT, GATES, INTO, LABEL, ..., ';' or end of input",
        select("PATCH 4 STRIDE 4 COLOUR BLACK") + "\n" + " " * 51 + "^"),
    "missing PATCH": Case(
        select("STRIDE 4"), ParseError, "line 1, column 43: missing PATCH clause (e.g. PATCH 16)",
        select("STRIDE 4") + "\n" + " " * 42 + "^"),
    "missing STRIDE": Case(
        select("PATCH 4"), ParseError, "line 1, column 42: missing STRIDE clause (e.g. STRIDE 4)",
        select("PATCH 4") + "\n" + " " * 41 + "^"),
    "missing PATCH and STRIDE": Case(
        "SELECT HEATMAP FROM img USING net", ParseError,
        "line 1, column 34: missing PATCH and STRIDE clauses (e.g. PATCH 16 STRIDE 4)",
        "SELECT HEATMAP FROM img USING net\n" + " " * 33 + "^"),
    "missing USING": Case(
        "SELECT HEATMAP FROM img PATCH 4 STRIDE 4", ParseError,
        "line 1, column 25: unexpected 'PATCH'; expected USING",
        "SELECT HEATMAP FROM img PATCH 4 STRIDE 4\n" + " " * 24 + "^"),
    "clause twice": Case(
        select("PATCH 4 STRIDE 4 PATCH 2"), ParseError, "line 1, column 52: PATCH is given twice",
        select("PATCH 4 STRIDE 4 PATCH 2") + "\n" + " " * 51 + "^"),
    "fractional patch": Case(
        select("PATCH 4.5 STRIDE 4"), ParseError,
        "line 1, column 41: unexpected '4.5'; expected an integer or a size like 16x8",
        select("PATCH 4.5 STRIDE 4") + "\n" + " " * 40 + "^"),
    # ---- patch, stride, region
    "patch larger than image": Case(
        select("PATCH 40 STRIDE 4"), PlanError, "patch 40x40 does not fit image 16x20"),
    "patch taller than image": Case(
        select("PATCH 17x4 STRIDE 4"), PlanError, "patch 17x4 does not fit image 16x20"),
    "patch larger than region": Case(
        select("PATCH 8 STRIDE 4 REGION (0, 0, 6, 10)"), PlanError, "patch 8x8 does not fit region 10x6"),
    "patch 0": Case(select("PATCH 0 STRIDE 4"), PlanError, "patch must be at least 1x1, got 0x0"),
    "stride 0": Case(select("PATCH 4 STRIDE 0"), PlanError, "stride must be at least 1, got 0"),
    "negative stride": Case(select("PATCH 4 STRIDE 4x-2"), PlanError, "stride must be at least 1, got -2"),
    "region outside": Case(
        select("PATCH 4 STRIDE 4 REGION (0, 0, 30, 10)"), PlanError,
        f"region (0, 0, 30, 10) does not lie inside the image 16x20 {REGION_RULE}"),
    "region negative": Case(
        select("PATCH 4 STRIDE 4 REGION (-1, 0, 5, 10)"), PlanError,
        f"region (-1, 0, 5, 10) does not lie inside the image 16x20 {REGION_RULE}"),
    "region inverted": Case(
        select("PATCH 4 STRIDE 4 REGION (10, 0, 5, 10)"), PlanError, f"region (10, 0, 5, 10) {EMPTY_REGION}"),
    "region empty": Case(
        select("PATCH 4 STRIDE 4 REGION (5, 5, 15, 5)"), PlanError, f"region (5, 5, 15, 5) {EMPTY_REGION}"),
    "batch 0": Case(select("PATCH 4 STRIDE 4 BATCH 0"), PlanError, "BATCH must be at least 1, got 0"),
    "color out of range": Case(
        select("PATCH 4 STRIDE 4 COLOR (1, 2, 300)"), PlanError,
        "COLOR (1, 2, 300) is out of range: 300 is not in 0-255"),
    # ---- models
    "unknown model": Case(
        select("PATCH 4 STRIDE 4", model="nosuchnet"), PlanError,
        "unknown model 'nosuchnet' (SHOW MODELS lists them)"),
    "misspelt model": Case(
        select("PATCH 4 STRIDE 4", model="resnt18"), PlanError,
        "unknown model 'resnt18'; did you mean 'resnet18'? (SHOW MODELS lists them)"),
    "untraceable model": Case(
        select("PATCH 4 STRIDE 4", model="branchy"), PlanError,
        f"cannot trace model: top-level module (Branchy) failed: {FX_CONTROL_FLOW}"),
    "untraceable submodule": Case(
        select("PATCH 4 STRIDE 4", model="nested"), PlanError,
        f"cannot trace model: module 'gate' (Gate) failed: {FX_CONTROL_FLOW}"),
    "model fails on a batch": Case(
        select("PATCH 4 STRIDE 4 NAIVE BATCH 4", model="batchofone"), ExecutionError,
        f"model 'batchofone' failed on a batch of 4 occluded images: RuntimeError: {LINEAR_1x16_4x2} "
        "(it ran on one image while planning: if its forward assumes a batch of one, add BATCH 1)"),
    "model fails on a batch in exact mode": Case(
        select("PATCH 4 STRIDE 4 EXACT BATCH 4", model="batchofone"), ExecutionError,
        f"model 'batchofone' failed on a batch of 4 occluded images: RuntimeError: {LINEAR_1x16_4x2} "
        "(it ran on one image while planning: if its forward assumes a batch of one, add BATCH 1)"),
    # ---- labels
    "label index out of range (1000 classes)": Case(
        select("PATCH 224 STRIDE 224 LABEL 5000", model="squeezenet1_0"), PlanError,
        "label 5000 is out of range: squeezenet1_0 has 1000 classes (0-999)"),
    "negative label": Case(
        select("PATCH 4 STRIDE 4 LABEL -1"), PlanError, "label -1 is out of range: net has 3 classes (0-2)"),
    "unknown ImageNet class name": Case(
        select("PATCH 224 STRIDE 224 LABEL 'tabby kat'", model="squeezenet1_0"), PlanError,
        "unknown label 'tabby kat' for squeezenet1_0; did you mean 'tabby cat'?"),
    "unknown class name": Case(
        select("PATCH 4 STRIDE 4 LABEL 'dgo'", model="pets"), PlanError,
        "unknown label 'dgo' for pets; did you mean 'dog'?"),
    "class name without names": Case(
        select("PATCH 4 STRIDE 4 LABEL 'cat'"), PlanError, "model 'net' has no class names: use LABEL <index>"),
    # ---- images
    "unknown image": Case(
        select("PATCH 4 STRIDE 4", source="nosuch"), PlanError,
        "unknown image 'nosuch': not a bound name, a LOAD IMAGE name or a sample image (SHOW IMAGES "
        "lists them; quote a file path: FROM 'nosuch.png')"),
    "misspelt image": Case(
        select("PATCH 4 STRIDE 4", source="cofee"), PlanError,
        "unknown image 'cofee': not a bound name, a LOAD IMAGE name or a sample image; did you mean "
        "'coffee'? (SHOW IMAGES lists them; quote a file path: FROM 'cofee.png')"),
    "missing image file": Case(
        select("PATCH 4 STRIDE 4", source="'missing.png'"), PlanError, "image file not found: 'missing.png'"),
    "corrupt image file": Case(
        select("PATCH 4 STRIDE 4", source="'x.png'"), PlanError,
        "cannot read image 'x.png': not a valid image file"),
    "image is a directory": Case(
        "LOAD IMAGE 'adir.png' AS a", PlanError,
        "cannot read image 'adir.png': it is a directory, not an image file"),
    "LOAD IMAGE corrupt": Case(
        "LOAD IMAGE 'x.png' AS x", PlanError, "cannot read image 'x.png': not a valid image file"),
    # ---- weights files
    "weights with wrong keys": Case(
        select("PATCH 4 STRIDE 4", model="squeezenet1_0 WEIGHTS 'keys.pth'"), PlanError,
        "weights 'keys.pth' do not fit squeezenet1_0: missing keys features.0.weight; unexpected keys "
        "extra.weight"),
    "weights with wrong shapes": Case(
        select("PATCH 4 STRIDE 4", model="squeezenet1_0 WEIGHTS 'shapes.pth'"), PlanError,
        "weights 'shapes.pth' do not fit squeezenet1_0: shape mismatch for features.0.weight: "
        "file (96, 3, 5, 5) vs model (96, 3, 7, 7)"),
    "weights for another architecture": Case(
        "LOAD MODEL 'sq.pth' AS r ARCHITECTURE resnet18", PlanError,
        "weights 'sq.pth' do not fit resnet18: missing keys conv1.weight, bn1.weight, bn1.bias (+99 more); "
        "unexpected keys features.0.weight, features.0.bias, features.3.squeeze.weight (+49 more)"),
    "weights holding pickled code": Case(
        select("PATCH 4 STRIDE 4", model="squeezenet1_0 WEIGHTS 'whole.pth'"), PlanError, PICKLED_WEIGHTS),
    "weights file missing": Case(
        select("PATCH 4 STRIDE 4", model="squeezenet1_0 WEIGHTS 'nothere.pth'"), PlanError,
        "weights file not found: 'nothere.pth'"),
    "weights not a torch file": Case(
        select("PATCH 4 STRIDE 4", model="squeezenet1_0 WEIGHTS 'x.png'"), PlanError,
        "cannot read weights 'x.png': not a PyTorch file (write it with torch.save)"),
    "WEIGHTS on a session model": Case(
        select("PATCH 4 STRIDE 4", model="net WEIGHTS 'sq.pth'"), PlanError,
        "WEIGHTS applies to built-in architectures; 'net' is a model of this session and has its own weights"),
    "LOAD MODEL pickled without TRUSTED": Case(
        "LOAD MODEL 'whole.pth' AS whole", PlanError,
        "'whole.pth' holds a pickled module; loading it would run code from the file. Add TRUSTED if you "
        "trust it, or save a state dict and load it with ARCHITECTURE <name>"),
    "LOAD MODEL state dict without ARCHITECTURE": Case(
        "LOAD MODEL 'sq.pth' AS s", PlanError,
        "'sq.pth' holds a state dict, not a model: add ARCHITECTURE <name> to say which architecture it "
        "is for (SHOW MODELS lists them)"),
    "LOAD MODEL missing file": Case(
        "LOAD MODEL 'nothere.pt' AS m", PlanError, "model file not found: 'nothere.pt'"),
    # ---- SET
    "unknown setting": Case(
        "SET nosuch = 1", SettingError, f"unknown setting 'nosuch'; settings are {', '.join(SETTINGS)}"),
    "negative batch_size": Case(
        "SET batch_size = -1", SettingError, "batch_size takes a whole number (0 = sized from memory_limit), got -1"),
    "text batch_size": Case(
        "SET batch_size = 'big'", SettingError,
        "batch_size takes a whole number (0 = sized from memory_limit), got 'big'"),
    "bad memory_limit": Case(
        "SET memory_limit = 'lots'", SettingError, "memory_limit takes a size such as '2GB' or '512MiB', got 'lots'"),
    "zero memory_limit": Case("SET memory_limit = 0", SettingError, "memory_limit must be positive, got 0"),
    "bad progress": Case("SET progress = maybe", SettingError, "progress takes on, off or auto, got 'maybe'"),
    "bad mode": Case("SET mode = fast", SettingError, "mode takes auto, exact or naive, got 'fast'"),
    "bad device": Case("SET device = tpu", SettingError, "device takes 'cpu' or 'cuda', got 'tpu'"),
    # ---- output paths
    "INTO .jpg": Case(
        select("PATCH 4 STRIDE 4 INTO 'out.jpg'"), PlanError,
        "cannot write 'out.jpg': INTO takes a .png or .npy file, or .nii / .nii.gz for a volume"),
    "INTO without extension": Case(
        select("PATCH 4 STRIDE 4 INTO 'heatmap'"), PlanError,
        "cannot write 'heatmap': INTO takes a .png or .npy file, or .nii / .nii.gz for a volume"),
    "INTO missing directory": Case(
        select("PATCH 4 STRIDE 4 INTO 'nodir/out.png'"), PlanError,
        "cannot write 'nodir/out.png': directory 'nodir' does not exist (create it first)"),
    "INTO a directory": Case(
        select("PATCH 4 STRIDE 4 INTO 'adir.png'"), PlanError, "cannot write 'adir.png': it is a directory"),
    # ---- DESCRIBE, HELP
    "DESCRIBE without INPUT": Case(
        "DESCRIBE net", PlanError, "model 'net' takes images of any size: give one with INPUT <h>x<w>"),
    "DESCRIBE patch too large": Case(
        "DESCRIBE net INPUT 8x8 PATCH 10 STRIDE 2", PlanError, "patch 10x10 does not fit image 8x8"),
    "DESCRIBE stride 0": Case(
        "DESCRIBE net INPUT 8x8 PATCH 4 STRIDE 0", PlanError,
        "patch and stride must be at least 1, got PATCH 4x4 STRIDE 0x0"),
    "unknown HELP topic": Case(
        "HELP nope", KqlError,
        "unknown HELP topic 'NOPE'; topics: APPROX, BATCH, CALIBRATIONS, COLOR, DESCRIBE, DRILLDOWN, EXACT, "
        "EXPLAIN, GATES, HELP, INTO, LABEL, LOAD, NAIVE, NORMALIZE, ON, PATCH, REGION, RESAMPLE, SELECT, SET, SHOW, "
        "SSIM, STRIDE, TAU, TUNE, VOLUMES, WEIGHTS, WINDOW"),
}

if not torch.cuda.is_available():
    CASES["ON CUDA without CUDA"] = Case(
        select("PATCH 4 STRIDE 4 ON CUDA"), PlanError, "ON CUDA: CUDA is not available on this machine; use ON CPU")


def repl(con, argv, stdin: str = ""):
    """(exit status, stdout, stderr) of ``kql <argv>`` on connection ``con``."""
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, connection=con, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- the table, two ways

@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_api_error(con, case):
    with pytest.raises(KqlError) as info:
        con.execute(case.query)
    assert type(info.value) is case.error
    # a ParseError's str() is the shell's text: the message, the line and the caret
    assert str(info.value) == case.message + (f"\n{case.caret}" if case.caret else "")
    if case.caret is not None:
        assert info.value.caret == case.caret


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_command_error(con, case):
    # Each case is followed by a statement that must not run: the first error stops `kql -c`.
    status, out, err = repl(con, ["-c", case.query + ";\nHELP select"])
    assert (status, out, err) == (1, "", case.printed())


def test_shell_keeps_going_after_every_error(con):
    """One interactive session runs every case, then a statement that works."""
    statements = [case.query + ";" for case in CASES.values()] + ["HELP patch;"]
    status, out, err = repl(con, ["-i"], "\n".join(statements) + "\n")
    assert status == 0
    assert err == "".join(case.printed() for case in CASES.values())
    assert out.endswith(WELCOME_END + "kql> " * len(statements) + con.execute("HELP patch") + "\nkql> ")
    # A failed SET changed nothing.
    assert dict(con.settings.rows())["batch_size"] == "0 (from memory_limit)"


def test_kql_command_exits_non_zero():
    """The installed entry point, in a real process: status 1 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "kql", "-c",
                           "SELECT HEATMAP FROM 'missing.png' USING resnet18 PATCH 16 STRIDE 8"],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "error: image file not found: 'missing.png'\n")


# ---------------------------------------------------------------- details

def test_parse_error_position_caret_and_expected(con):
    query = "SELECT HEATMAP FROM img USING net\n  PATCH 4 STRIDE 4\n\tLABEL 'cat' COLOUR 3"
    with pytest.raises(ParseError) as info:
        con.execute(query)
    e = info.value
    assert (e.line, e.column) == (3, 14)
    assert e.source_line == "\tLABEL 'cat' COLOUR 3"
    assert e.caret == "\tLABEL 'cat' COLOUR 3\n\t            ^"      # a tab stays a tab, so the ^ lines up
    assert e.expected == ("APPROX", "BATCH", "COLOR", "DRILLDOWN", "EXACT", "GATES", "INTO", "LABEL", "NAIVE",
                          "NORMALIZE", "ON", "PATCH", "REGION", "RESAMPLE", "STRIDE", "WEIGHTS", "WINDOW",
                          "','", "';'", "end of input")
    assert e.message == ("unexpected 'COLOUR' (did you mean COLOR?); expected one of APPROX, BATCH, COLOR, "
                         "DRILLDOWN, EXACT, GATES, INTO, LABEL, ..., ',', ';' or end of input")
    assert str(e) == f"line 3, column 14: {e.message}\n{e.caret}"     # str() shows where, as the shell does


def test_missing_clause_lists_expected(con):
    with pytest.raises(ParseError) as info:
        con.execute("SELECT HEATMAP FROM img USING net")
    assert info.value.expected == ("PATCH", "STRIDE")


def test_errors_from_bindings(con):
    """Names bound for one query that are the wrong kind of thing."""
    cases = [
        (dict(img2=[1, 2]), select("PATCH 4 STRIDE 4", source="img2"),
         "cannot use a list as an image: pass a file path, a numpy array, a PIL image or a torch tensor"),
        (dict(img2=np.zeros((3, 16, 16))), select("PATCH 4 STRIDE 4", source="img2"),
         "unsupported image shape (3, 16, 16) for array: expected HxW, HxWx1, HxWx3 or HxWx4; it looks "
         "channel-first: use a.transpose(1, 2, 0)"),
        (dict(img2=np.full((16, 16, 3), 255.0)), select("PATCH 4 STRIDE 4", source="img2"),
         "array has float values from 255 to 255; float images must be in [0, 1] (divide 0-255 data by 255, "
         "or pass it as uint8)"),
        (dict(m=IMAGE), select("PATCH 4 STRIDE 4", model="m"),
         "'m' is bound to an object of type ndarray, not a model: USING takes a torch.nn.Module"),
        (dict(m=tiny()), select("PATCH 4 STRIDE 4", source="m", model="m"),
         "'m' is bound to a model (Sequential), not an image: FROM takes an image (array, PIL image, "
         "tensor or file path)"),
        (dict(m=nn.Conv2d(4, 2, 3)), select("PATCH 4 STRIDE 4", model="m"),
         "model 'm' takes 4 input channels; KQL feeds images with 1 (gray) or 3 (RGB) channels"),
    ]
    for bindings, query, message in cases:
        with pytest.raises(PlanError) as info:
            con.execute(query, **bindings)
        assert str(info.value) == message


def test_explain_of_a_non_select(con):
    with pytest.raises(PlanError) as info:
        con.explain("SHOW MODELS")
    assert str(info.value) == "EXPLAIN takes a SELECT statement, not SHOW MODELS"


def test_output_path_is_checked_before_any_work(con):
    """A bad INTO fails before the model is even traced (branchy cannot be)."""
    with pytest.raises(PlanError) as info:
        con.execute(select("PATCH 4 STRIDE 4 INTO 'out.jpg'", model="branchy"))
    assert str(info.value) == ("cannot write 'out.jpg': INTO takes a .png or .npy file, or .nii / .nii.gz "
                               "for a volume")


def test_pickled_model_loads_when_trusted(con, workdir):
    assert con.execute("LOAD MODEL 'whole.pth' AS whole TRUSTED") == (
        "model 'whole' loaded from 'whole.pth' (pickled module 'whole.pth' (TRUSTED))")
    assert isinstance(con.catalog.models["whole"].module, torchvision.models.SqueezeNet)
    assert sorted(os.listdir(workdir)) == ["adir.png", "keys.pth", "shapes.pth", "sq.pth", "whole.pth", "x.png"]
