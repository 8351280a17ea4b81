"""kql.kernels: gather / paste on the CPU, every implementation against a naive oracle.

The oracle is the definition itself, one cell at a time in plain Python. Each case
of the tables runs through the Numba kernel, both torch strategies and the public
front door, and must match it exactly (these are copies: no rounding is allowed).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kql.kernels as K
from kql.kernels import gather_cpu, gather_cuda, reference

NEG_INF = float("-inf")


# ---------------------------------------------------------------- the oracle

def naive_gather(base, wy, wx, wh, ww, patch=None, py=None, px=None, pad=0.0):
    C, H, W = base.shape
    B = len(wy)
    out = np.empty((B, C, wh, ww), dtype=np.float32)
    for b in range(B):
        for c in range(C):
            for i in range(wh):
                for j in range(ww):
                    y, x = int(wy[b]) + i, int(wx[b]) + j
                    if patch is not None and 0 <= y - py[b] < patch.shape[2] \
                            and 0 <= x - px[b] < patch.shape[3]:
                        out[b, c, i, j] = patch[b, c, y - py[b], x - px[b]]
                    elif 0 <= y < H and 0 <= x < W:
                        out[b, c, i, j] = base[c, y, x]
                    else:
                        out[b, c, i, j] = pad
    return out


def naive_paste(base, patch, py, px):
    C, H, W = base.shape
    out = np.repeat(base[None], len(py), axis=0)
    for b in range(len(py)):
        for i in range(patch.shape[2]):
            for j in range(patch.shape[3]):
                y, x = int(py[b]) + i, int(px[b]) + j
                if 0 <= y < H and 0 <= x < W:
                    out[b, :, y, x] = patch[b, :, i, j]
    return out


# ---------------------------------------------------------------- implementations

GATHERS = {
    "numba": lambda *a, **k: gather_cpu.gather(*a, parallel=True, **k),
    "numba-1-thread": lambda *a, **k: gather_cpu.gather(*a, parallel=False, **k),
    "torch-looped": reference.gather_looped,
    "torch-vectorised": reference.gather_vectorised,
    "front-torch": lambda *a, **k: K.gather(*a, backend="torch", **k),
    "front-numba": lambda *a, **k: K.gather(*a, backend="numba", **k),
    "front-auto": lambda *a, **k: K.gather(*a, backend="auto", **k),
}
PASTES = {
    "numba": lambda *a: gather_cpu.paste(*a, parallel=True),
    "numba-1-thread": lambda *a: gather_cpu.paste(*a, parallel=False),
    "torch": reference.paste,
    "front-torch": lambda *a: K.paste(*a, backend="torch"),
    "front-numba": lambda *a: K.paste(*a, backend="numba"),
}


# ---------------------------------------------------------------- gather cases
# name: (C, H, W, win_h, win_w, win_y0, win_x0, (ph, pw) or None, patch_y0, patch_x0, pad)
GATHER_CASES = {
    "inside, patch centred":        (3, 9, 9, 5, 5, [1, 2, 4], [0, 3, 4], (3, 3), [2, 3, 5], [1, 4, 5], 0.0),
    "window past top-left":         (2, 6, 7, 5, 5, [-2, -4], [-3, 0], (2, 2), [-1, -3], [-2, 1], 0.0),
    "window past bottom-right":     (2, 6, 7, 5, 5, [3, 4], [5, 6], (2, 2), [4, 5], [6, 7], 0.0),
    "window fully outside":         (2, 5, 5, 3, 3, [7, -9], [0, -2], None, None, None, 0.0),
    "window bigger than base":      (2, 3, 4, 7, 8, [-2, -1], [-2, -3], (2, 2), [0, 1], [1, 2], 0.0),
    "patch partly outside window":  (2, 8, 8, 4, 4, [2, 2, 2, 2], [2, 2, 2, 2], (3, 3),
                                     [0, 5, 4, 1], [1, 4, 0, 5], 0.0),
    "patch covers window":          (2, 8, 8, 3, 3, [2], [2], (7, 7), [0], [0], 0.0),
    "patch disjoint from window":   (2, 8, 8, 3, 3, [0, 5], [0, 5], (2, 2), [5, 0], [5, 0], 0.0),
    "patch over the padding":       (2, 5, 5, 4, 4, [-2, 3], [-2, 3], (2, 3), [-2, 4], [-1, 3], 0.0),
    "B=1":                          (3, 7, 7, 4, 4, [1], [2], (2, 2), [2], [3], 0.0),
    "window 1x1":                   (2, 4, 4, 1, 1, [0, 3, -1, 2], [0, 3, 2, 4], (1, 1),
                                     [0, 0, -1, 2], [0, 0, 2, 4], 0.0),
    "C=1":                          (1, 6, 6, 3, 4, [-1, 4], [2, -1], (2, 2), [0, 4], [3, 0], 0.0),
    "-inf padding (max pooling)":   (2, 5, 6, 4, 4, [-1, 3, -2], [-1, 4, 2], (2, 2),
                                     [0, 3, -2], [0, 4, 2], NEG_INF),
    "no patch":                     (3, 6, 6, 4, 3, [-1, 4, 1], [-2, 1, 5], None, None, None, 0.5),
    "empty patch 0x2":              (2, 6, 6, 3, 3, [0, 1], [1, 2], (0, 2), [0, 1], [1, 2], 0.0),
    "empty batch":                  (2, 5, 5, 3, 3, [], [], (2, 2), [], [], 0.0),
    "empty base (H=0)":             (2, 0, 3, 2, 2, [0, -1], [1, 2], (1, 1), [0, 0], [1, 1], -1.0),
    "full-width windows":           (2, 4, 5, 6, 5, [-1, 0, -3], [0, 0, 0], (2, 2), [0, 3, -3], [3, -1, 0], 0.0),
    "wide rows":                    (2, 5, 40, 3, 33, [-1, 3], [-4, 10], (2, 20), [0, 3], [0, 12], 0.0),
}


def make_case(C, H, W, wh, ww, wy, wx, pshape, py, px, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, H, W, generator=g)
    B = len(wy)
    args = dict(base=base, win_y0=torch.tensor(wy, dtype=torch.int64),
                win_x0=torch.tensor(wx, dtype=torch.int64), win_h=wh, win_w=ww)
    if pshape is not None:
        args.update(patch=torch.randn(B, C, *pshape, generator=g) + 100.0,
                    patch_y0=torch.tensor(py, dtype=torch.int64),
                    patch_x0=torch.tensor(px, dtype=torch.int64))
    args["pad_value"] = pad
    return args


def expected_gather(a):
    p = a.get("patch")
    return naive_gather(a["base"].numpy(), a["win_y0"].tolist(), a["win_x0"].tolist(),
                        a["win_h"], a["win_w"], None if p is None else p.numpy(),
                        None if p is None else a["patch_y0"].tolist(),
                        None if p is None else a["patch_x0"].tolist(), a["pad_value"])


def run_gather(impl, a, out=None):
    return GATHERS[impl](a["base"], a["win_y0"], a["win_x0"], a["win_h"], a["win_w"],
                         a.get("patch"), a.get("patch_y0"), a.get("patch_x0"),
                         pad_value=a["pad_value"], out=out)


def assert_same(got, want):
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("impl", GATHERS)
@pytest.mark.parametrize("case", GATHER_CASES)
def test_gather_matches_oracle(case, impl):
    a = make_case(*GATHER_CASES[case])
    assert_same(run_gather(impl, a), expected_gather(a))


@pytest.mark.parametrize("impl", GATHERS)
@pytest.mark.parametrize("seed", range(12))
def test_gather_random(seed, impl):
    """Random geometry around the borders: windows and patches anywhere near the base."""
    rng = np.random.default_rng(seed)
    C, H, W = rng.integers(1, 5), rng.integers(1, 12), rng.integers(1, 12)
    wh, ww = rng.integers(1, 9), rng.integers(1, 9)
    ph, pw = rng.integers(1, 7), rng.integers(1, 7)
    B = int(rng.integers(1, 6))
    wy, wx = rng.integers(-wh - 1, H + 2, B), rng.integers(-ww - 1, W + 2, B)
    py, px = wy + rng.integers(-ph, wh + 1, B), wx + rng.integers(-pw, ww + 1, B)
    pad = [0.0, NEG_INF, -1.5][seed % 3]
    a = make_case(C, H, W, wh, ww, wy.tolist(), wx.tolist(), (ph, pw), py.tolist(), px.tolist(),
                  pad, seed)
    assert_same(run_gather(impl, a), expected_gather(a))


@pytest.mark.parametrize("impl", ["numba", "numba-1-thread", "torch-looped", "torch-vectorised",
                                  "front-auto"])
def test_gather_writes_into_out(impl):
    a = make_case(*GATHER_CASES["window past top-left"])
    out = torch.full((2, 2, 5, 5), 42.0)
    got = run_gather(impl, a, out=out)
    assert got is out
    assert_same(out, expected_gather(a))


@pytest.mark.parametrize("impl", ["numba", "numba-1-thread", "torch-looped", "torch-vectorised",
                                  "front-numba", "front-torch"])
def test_gather_non_contiguous_inputs(impl):
    """Strided views (a transposed base, a sliced patch, every other position) give the
    same result: torch reads them as they are, Numba copies them contiguous first."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 9, 8, generator=g).transpose(1, 2)  # (3, 8, 9), not contiguous
    patch = torch.randn(8, 3, 5, 6, generator=g)[::2, :, 1:4, ::2]  # (4, 3, 3, 3)
    wy = torch.tensor([-1, 0, 2, 0, 5, 0, 6, 0])[::2]
    wx = torch.tensor([-2, 0, 3, 0, 7, 0, 0, 0])[::2]
    py, px = wy + 1, wx + torch.tensor([1, 0, 2, -1])
    assert not (base.is_contiguous() or patch.is_contiguous() or wy.is_contiguous())
    a = dict(base=base, win_y0=wy, win_x0=wx, win_h=4, win_w=5, patch=patch, patch_y0=py,
             patch_x0=px, pad_value=NEG_INF)
    assert_same(run_gather(impl, a), expected_gather(a))


def test_gather_accepts_numpy_and_list_positions():
    a = make_case(*GATHER_CASES["window past bottom-right"])
    want = expected_gather(a)
    for backend in ("torch", "numba"):
        got = K.gather(a["base"], a["win_y0"].numpy().astype(np.int32), a["win_x0"].tolist(), 5, 5,
                       a["patch"], a["patch_y0"].numpy(), tuple(a["patch_x0"].tolist()),
                       backend=backend)
        assert_same(got, want)


def test_numba_one_thread_call_restores_the_thread_count():
    import numba
    before = numba.get_num_threads()
    a = make_case(*GATHER_CASES["B=1"])
    gather_cpu.gather(a["base"], a["win_y0"], a["win_x0"], 4, 4, parallel=False)
    assert numba.get_num_threads() == before


def test_numba_result_shares_the_kernel_buffer():
    """The Numba wrapper hands back torch.from_numpy of its output: no copy after the kernel."""
    a = make_case(*GATHER_CASES["B=1"])
    got = run_gather("numba", a)
    view = got.numpy()
    view[0, 0, 0, 0] = 123.0
    assert got[0, 0, 0, 0].item() == 123.0


# ---------------------------------------------------------------- paste cases
# name: (C, H, W, (ph, pw), patch_y0, patch_x0)
PASTE_CASES = {
    "inside":              (2, 6, 7, (2, 3), [0, 2, 4], [0, 3, 4]),
    "clipped every side":  (2, 5, 5, (3, 3), [-1, 3, -2, 4], [-2, 4, 1, -1]),
    "fully outside":       (2, 4, 4, (2, 2), [-2, 4, 0], [0, 1, 9]),
    "larger than base":    (1, 3, 4, (6, 7), [-1], [-2]),
    "B=1, C=1, 1x1":       (1, 1, 1, (1, 1), [0], [0]),
    "empty batch":         (2, 3, 3, (2, 2), [], []),
}


@pytest.mark.parametrize("impl", PASTES)
@pytest.mark.parametrize("case", PASTE_CASES)
def test_paste_matches_oracle(case, impl):
    C, H, W, (ph, pw), py, px = PASTE_CASES[case]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(C, H, W, generator=g)
    patch = torch.randn(len(py), C, ph, pw, generator=g) + 100.0
    py, px = torch.tensor(py, dtype=torch.int64), torch.tensor(px, dtype=torch.int64)
    got = PASTES[impl](base, patch, py, px)
    assert_same(got, naive_paste(base.numpy(), patch.numpy(), py.tolist(), px.tolist()))
    assert got.data_ptr() != base.data_ptr() or got.numel() == 0


def test_paste_writes_into_out():
    base, patch = torch.randn(2, 4, 4), torch.randn(3, 2, 2, 2)
    py, px = torch.tensor([-1, 1, 3]), torch.tensor([0, 3, 1])
    want = naive_paste(base.numpy(), patch.numpy(), py.tolist(), px.tolist())
    for backend in ("torch", "numba"):
        out = torch.empty(3, 2, 4, 4)
        assert K.paste(base, patch, py, px, backend=backend, out=out) is out
        assert_same(out, want)


def test_paste_equals_whole_base_gather():
    base, patch = torch.randn(3, 5, 6), torch.randn(4, 3, 3, 2)
    py, px = torch.tensor([-1, 0, 3, 4]), torch.tensor([5, -1, 2, 0])
    zeros = torch.zeros(4, dtype=torch.int64)
    for backend in ("torch", "numba"):
        assert torch.equal(K.paste(base, patch, py, px, backend=backend),
                           K.gather(base, zeros, zeros, 5, 6, patch, py, px, backend=backend))


# ---------------------------------------------------------------- backends and dispatch

def test_available_backends_on_this_machine():
    names = K.available_backends()
    assert names[:2] == ["torch", "numba"]
    assert ("cuda" in names) == (torch.cuda.is_available() and gather_cuda.is_available())


def test_auto_dispatch_rule():
    cpu = torch.zeros(1, 1, 1)
    assert K.auto_backend(cpu, K.NUMBA_MIN_CELLS - 1) == "torch"
    assert K.auto_backend(cpu, K.NUMBA_MIN_CELLS) == "numba"
    assert K.auto_backend(cpu, 64 * 64 * 20 * 20) == "numba"  # VGG16 conv1, B=64


def test_gather_cuda_module_imports_without_gpu():
    """Building the kernel is deferred to the first launch, so this never touches CUDA."""
    assert gather_cuda._gather_kernel.cache_info().currsize == 0 or torch.cuda.is_available()


# ---------------------------------------------------------------- validation (exact messages)

def _ok():
    return dict(base=torch.zeros(2, 5, 5), win_y0=torch.tensor([0, 1]), win_x0=torch.tensor([0, 1]),
                win_h=3, win_w=3, patch=torch.zeros(2, 2, 2, 2), patch_y0=torch.tensor([0, 1]),
                patch_x0=torch.tensor([0, 1]))


BAD_GATHER = [
    (dict(base=np.zeros((2, 5, 5), np.float32)), "base must be a torch tensor, got ndarray"),
    (dict(base=torch.zeros(1, 2, 5, 5)),
     "base must have shape (C, H, W), got (1, 2, 5, 5): it is the materialized tensor shared "
     "by all positions, without a batch dimension"),
    (dict(base=torch.zeros(2, 5, 5, dtype=torch.float64)), "base must be float32, got torch.float64"),
    (dict(win_y0=torch.tensor([0.0, 1.0])), "win_y0 must hold integers, got torch.float32"),
    (dict(win_y0=torch.tensor([[0, 1]])), "win_y0 must have shape (B,), got (1, 2)"),
    (dict(win_x0=torch.tensor([0, 1, 2])), "win_x0 has 3 positions but win_y0 has 2"),
    (dict(win_h=0), "win_h must be a positive int, got 0"),
    (dict(win_w=2.0), "win_w must be a positive int, got 2.0"),
    (dict(patch=torch.zeros(3, 2, 2, 2)), "patch has 3 positions but win_y0 has 2"),
    (dict(patch=torch.zeros(2, 3, 2, 2)), "patch has 3 channels but base has 2"),
    (dict(patch=torch.zeros(2, 2, 2)), "patch must have shape (B, C, ph, pw), got (2, 2, 2)"),
    (dict(patch=torch.zeros(2, 2, 2, 2, dtype=torch.float16)), "patch must be float32, got torch.float16"),
    (dict(patch_x0=None), "a patch needs patch_y0 and patch_x0 (its top-left corner per position)"),
    (dict(patch=None), "patch_y0 / patch_x0 given without a patch: pass the patch too, or neither"),
    (dict(patch_y0=torch.tensor([0])), "patch_y0 has 1 positions but win_y0 has 2"),
    (dict(pad_value="zero"), "pad_value must be a number, got 'zero'"),
    (dict(out=torch.zeros(2, 2, 3, 4)), "out must have shape (2, 2, 3, 3), got (2, 2, 3, 4)"),
    (dict(out=torch.zeros(2, 2, 3, 3).transpose(2, 3)),
     "out must be contiguous: the kernels write it in place"),
    (dict(backend="gpu"), "unknown backend 'gpu': choose one of auto, torch, numba, cuda"),
]


@pytest.mark.parametrize("change,message", BAD_GATHER, ids=[m[:40] for _, m in BAD_GATHER])
def test_gather_rejects(change, message):
    a = {**_ok(), **change}
    with pytest.raises(ValueError) as err:
        K.gather(**a)
    assert str(err.value) == message


def test_cuda_backend_on_cpu_tensors_is_refused():
    message = ("backend 'cuda' is not available here (available: torch, numba)"
               if "cuda" not in K.available_backends() else
               "backend 'cuda' needs CUDA tensors but base is on cpu: use backend='numba' or 'torch'")
    with pytest.raises(ValueError) as err:
        K.gather(**_ok(), backend="cuda")
    assert str(err.value) == message


BAD_PASTE = [
    (dict(patch=None), "paste needs a patch (B, C, ph, pw); for plain copies use base.expand(B, C, H, W)"),
    (dict(patch_x0=torch.tensor([0])), "patch_x0 has 1 positions but patch_y0 has 2"),
    (dict(patch=torch.zeros(1, 2, 2, 2)), "patch has 1 positions but patch_y0 has 2"),
    (dict(out=torch.zeros(2, 2, 5, 5, dtype=torch.float64)), "out must be float32, got torch.float64"),
]


@pytest.mark.parametrize("change,message", BAD_PASTE, ids=[m[:40] for _, m in BAD_PASTE])
def test_paste_rejects(change, message):
    a = dict(base=torch.zeros(2, 5, 5), patch=torch.zeros(2, 2, 2, 2),
             patch_y0=torch.tensor([0, 1]), patch_x0=torch.tensor([0, 1]))
    with pytest.raises(ValueError) as err:
        K.paste(**{**a, **change})
    assert str(err.value) == message
