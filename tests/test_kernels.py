"""kql.kernels: gather / paste on the CPU, every implementation against a naive oracle.

The oracle is the definition itself, one cell at a time in plain Python. Each case
of the tables runs through the Numba kernel, both torch strategies and the public
front door, and must match it exactly (these are copies: no rounding is allowed).
"""
from __future__ import annotations

import itertools
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


def test_auto_dispatch_rule_for_volumes():
    """Volumes: Numba on the CPU at any size (bench_kernels.py --volumes --sweep)."""
    assert K.NUMBA_MIN_CELLS_VOLUME == 0 and K.numba_min_cells(3) == 0
    assert K.numba_min_cells(2) == K.NUMBA_MIN_CELLS
    assert K.auto_backend(torch.zeros(1, 1, 1, 1), 1) == "numba"
    assert K.choose_backend("cpu", 27, n_axes=3) == "numba"
    assert K.choose_backend("cpu", 27, n_axes=2) == "torch"
    assert K.choose_backend("cuda", 10 ** 6, 3) == ("cuda" if "cuda" in K.available_backends() else "torch")
    assert K.choose_backend("mps", 10 ** 6, 3) == "torch"


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


# ================================================================ N spatial axes
# gather_nd / paste_nd: volumes (C, D, H, W) through the N-D kernels, images (C, H, W)
# through the 2-D ones above. The oracle is the definition over any number of axes.

def naive_gather_nd(base, starts, sizes, patch=None, patch_starts=None, pad=0.0):
    C, *S = base.shape
    B = len(starts[0])
    out = np.empty((B, C, *sizes), dtype=np.float32)
    for b in range(B):
        for cell in itertools.product(*(range(n) for n in sizes)):
            s = [int(starts[k][b]) + i for k, i in enumerate(cell)]
            q = None if patch is None else [s[k] - int(patch_starts[k][b]) for k in range(len(s))]
            if q is not None and all(0 <= qk < m for qk, m in zip(q, patch.shape[2:])):
                out[(b, slice(None), *cell)] = patch[(b, slice(None), *q)]
            elif all(0 <= sk < n for sk, n in zip(s, S)):
                out[(b, slice(None), *cell)] = base[(slice(None), *s)]
            else:
                out[(b, slice(None), *cell)] = pad
    return out


def naive_paste_nd(base, patch, patch_starts):
    zeros = [[0] * len(patch_starts[0])] * len(patch_starts)
    return naive_gather_nd(base, zeros, base.shape[1:], patch, patch_starts)


GATHERS_ND = {
    "numba": lambda *a, **k: gather_cpu.gather_nd(*a, parallel=True, **k),
    "numba-1-thread": lambda *a, **k: gather_cpu.gather_nd(*a, parallel=False, **k),
    "front-numba": lambda *a, **k: K.gather_nd(*a, backend="numba", **k),
    "torch-looped": reference.gather_looped_nd,
    "torch-vectorised": reference.gather_vectorised_nd,
    "front-torch": lambda *a, **k: K.gather_nd(*a, backend="torch", **k),
    "front-auto": lambda *a, **k: K.gather_nd(*a, backend="auto", **k),
}
PASTES_ND = {
    "numba": lambda *a: gather_cpu.paste_nd(*a, parallel=True),
    "numba-1-thread": lambda *a: gather_cpu.paste_nd(*a, parallel=False),
    "front-numba": lambda *a, **k: K.paste_nd(*a, backend="numba", **k),
    "torch": reference.paste_nd,
    "front-torch": lambda *a, **k: K.paste_nd(*a, backend="torch", **k),
    "front-auto": lambda *a, **k: K.paste_nd(*a, backend="auto", **k),
}

# name: (C, (D, H, W), window sizes, window starts per axis, patch shape or None,
#        patch starts per axis, pad)
GATHER3_CASES = {
    "inside, patch centred":       (2, (7, 8, 9), (4, 4, 5), ([1, 2], [0, 3], [2, 4]), (2, 2, 3),
                                    ([2, 3], [1, 4], [3, 5]), 0.0),
    "past the low corner":         (2, (5, 6, 7), (4, 4, 4), ([-2, -1], [-3, 0], [-1, -3]), (2, 2, 2),
                                    ([-1, 0], [-2, 1], [0, -2]), 0.0),
    "past the high corner":        (2, (5, 6, 7), (4, 4, 4), ([3, 4], [4, 5], [5, 6]), (2, 2, 2),
                                    ([4, 5], [5, 6], [6, 7]), 0.0),
    "past one face (depth only)":  (1, (4, 6, 6), (3, 3, 3), ([-2, 3, 0], [1, 1, 3], [1, 2, 3]), (1, 2, 2),
                                    ([-2, 5, 0], [2, 1, 3], [1, 3, 4]), 0.0),
    "fully outside":               (2, (4, 4, 4), (2, 3, 2), ([6, -9, 0], [0, 0, 7], [0, -3, 0]), None,
                                    None, 0.0),
    "window bigger than base":     (2, (2, 3, 4), (5, 6, 7), ([-1, -2], [-2, -1], [-2, -3]), (1, 2, 2),
                                    ([0, 1], [0, 1], [1, 2]), 0.0),
    "patch partly outside window": (2, (6, 6, 6), (3, 4, 4), ([1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]),
                                    (2, 3, 3), ([0, 3, 2, 1], [0, 5, 4, 1], [1, 4, 0, 5]), 0.0),
    "patch covers window":         (2, (6, 6, 6), (2, 3, 2), ([2], [2], [2]), (6, 7, 6), ([0], [0], [0]), 0.0),
    "patch disjoint from window":  (1, (6, 6, 6), (2, 2, 2), ([0, 4], [0, 4], [0, 4]), (2, 2, 2),
                                    ([4, 0], [0, 4], [0, 4]), 0.0),
    "patch over the padding":      (2, (4, 5, 5), (3, 4, 4), ([-2, 2], [-2, 3], [-2, 3]), (2, 2, 3),
                                    ([-2, 3], [-2, 4], [-1, 3]), 0.0),
    "-inf padding (max pooling)":  (2, (4, 5, 6), (3, 3, 3), ([-1, 2, 0], [-1, 3, -2], [-1, 4, 2]), (2, 2, 2),
                                    ([0, 2, 0], [0, 3, -2], [0, 4, 2]), NEG_INF),
    "no patch":                    (3, (5, 6, 4), (2, 4, 3), ([-1, 4, 1], [-1, 4, 1], [-2, 1, 2]), None,
                                    None, 0.5),
    "B=1, window 1x1x1":           (1, (3, 3, 3), (1, 1, 1), ([2], [-1], [0]), (1, 1, 1), ([2], [-1], [0]), 0.0),
    "empty patch (0 deep)":        (2, (4, 4, 4), (2, 2, 2), ([0, 1], [1, 2], [0, 0]), (0, 2, 2),
                                    ([0, 1], [1, 2], [0, 0]), 0.0),
    "empty batch":                 (2, (4, 4, 4), (2, 2, 2), ([], [], []), (1, 1, 1), ([], [], []), 0.0),
    "whole-volume windows":        (2, (3, 4, 5), (3, 4, 5), ([0, 0, 0], [0, 0, 0], [0, 0, 0]), (2, 2, 2),
                                    ([-1, 1, 2], [0, 3, -1], [4, 1, 0]), 0.0),
    "full-width, full-height":     (2, (5, 4, 5), (3, 4, 5), ([-1, 3, 0], [0, 0, 0], [0, 0, 0]), (2, 2, 2),
                                    ([0, 4, -1], [1, 3, 2], [3, -1, 0]), -1.0),
    "long rows":                   (1, (2, 3, 40), (2, 2, 33), ([0, 1], [-1, 2], [-4, 10]), (1, 2, 20),
                                    ([1, 1], [0, 2], [0, 12]), 0.0),
}


def make_case_nd(C, S, sizes, starts, pshape, patch_starts, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, *S, generator=g)
    B = len(starts[0])
    args = dict(base=base, starts=[torch.tensor(s, dtype=torch.int64) for s in starts],
                sizes=tuple(sizes))
    if pshape is not None:
        args.update(patch=torch.randn(B, C, *pshape, generator=g) + 100.0,
                    patch_starts=[torch.tensor(s, dtype=torch.int64) for s in patch_starts])
    args["pad_value"] = pad
    return args


def expected_gather_nd(a):
    p = a.get("patch")
    return naive_gather_nd(a["base"].numpy(), [s.tolist() for s in a["starts"]], a["sizes"],
                           None if p is None else p.numpy(),
                           None if p is None else [s.tolist() for s in a["patch_starts"]],
                           a["pad_value"])


def run_gather_nd(impl, a, out=None):
    return GATHERS_ND[impl](a["base"], a["starts"], a["sizes"], a.get("patch"),
                            a.get("patch_starts"), pad_value=a["pad_value"], out=out)


@pytest.mark.parametrize("impl", GATHERS_ND)
@pytest.mark.parametrize("case", GATHER3_CASES)
def test_gather_3d_matches_oracle(case, impl):
    a = make_case_nd(*GATHER3_CASES[case])
    assert_same(run_gather_nd(impl, a), expected_gather_nd(a))


@pytest.mark.parametrize("impl", GATHERS_ND)
@pytest.mark.parametrize("seed", range(10))
def test_gather_3d_random(seed, impl):
    """Random non-cubic geometry around every border, batch sizes 1 to 6."""
    rng = np.random.default_rng(100 + seed)
    C = int(rng.integers(1, 4))
    S = tuple(int(v) for v in rng.integers(1, 8, 3))
    sizes = tuple(int(v) for v in rng.integers(1, 6, 3))
    P = tuple(int(v) for v in rng.integers(1, 5, 3))
    B = 1 if seed < 3 else int(rng.integers(2, 7))
    starts = [rng.integers(-n - 1, s + 2, B) for n, s in zip(sizes, S)]
    pstarts = [w + rng.integers(-m, n + 1, B) for w, m, n in zip(starts, P, sizes)]
    pad = [0.0, NEG_INF, -1.5][seed % 3]
    a = make_case_nd(C, S, sizes, [w.tolist() for w in starts], P, [p.tolist() for p in pstarts],
                     pad, seed)
    assert_same(run_gather_nd(impl, a), expected_gather_nd(a))


@pytest.mark.parametrize("impl", GATHERS_ND)
@pytest.mark.parametrize("case", ["window past top-left", "patch partly outside window",
                                  "-inf padding (max pooling)", "no patch", "empty batch"])
def test_gather_nd_on_images_equals_gather(case, impl):
    """Two axes: the N-D entry points (and the generic torch functions) give gather's result."""
    a = make_case(*GATHER_CASES[case])
    nd = dict(base=a["base"], starts=[a["win_y0"], a["win_x0"]], sizes=(a["win_h"], a["win_w"]),
              pad_value=a["pad_value"])
    if "patch" in a:
        nd.update(patch=a["patch"], patch_starts=[a["patch_y0"], a["patch_x0"]])
    want = expected_gather(a)
    assert_same(run_gather_nd(impl, nd), want)
    np.testing.assert_array_equal(want, expected_gather_nd(nd))  # the two oracles agree


def test_gather_nd_on_images_runs_the_2d_torch_functions(monkeypatch):
    """On torch, two axes go to reference.gather / paste (written for two axes, less Python
    per position), three to the N-D ones. (Numba and CUDA have one kernel for both.)"""
    calls = []
    for name in ("gather", "gather_nd", "paste", "paste_nd"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _n=name, **k:
                            calls.append(_n) or _real(*a, **k))
    a = make_case(*GATHER_CASES["inside, patch centred"])
    K.gather_nd(a["base"], [a["win_y0"], a["win_x0"]], (5, 5), a["patch"],
                [a["patch_y0"], a["patch_x0"]], backend="torch")
    K.paste_nd(a["base"], a["patch"], [a["patch_y0"], a["patch_x0"]], backend="torch")
    v = make_case_nd(*GATHER3_CASES["inside, patch centred"])
    K.gather_nd(v["base"], v["starts"], v["sizes"], v["patch"], v["patch_starts"], backend="torch")
    K.paste_nd(v["base"], v["patch"], v["patch_starts"], backend="torch")
    # (paste is a gather of whole-base windows, on either side)
    assert calls == ["gather", "paste", "gather", "gather_nd", "paste_nd", "gather_nd"]


@pytest.mark.parametrize("impl", ["numba", "numba-1-thread", "torch-looped", "torch-vectorised",
                                  "front-auto"])
def test_gather_3d_writes_into_out(impl):
    a = make_case_nd(*GATHER3_CASES["past the low corner"])
    out = torch.full((2, 2, 4, 4, 4), 42.0)
    assert run_gather_nd(impl, a, out=out) is out
    assert_same(out, expected_gather_nd(a))


def test_gather_3d_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 6, 5, 7, generator=g).transpose(1, 3)  # (2, 7, 5, 6)
    patch = torch.randn(6, 2, 4, 3, 5, generator=g)[::2, :, 1:3]  # (3, 2, 2, 3, 5)
    starts = [torch.tensor([-1, 0, 3, 0, 5, 0])[::2], torch.tensor([0, 2, 4]),
              torch.tensor([-2, 3, 2])]
    pstarts = [s + 1 for s in starts]
    a = dict(base=base, starts=starts, sizes=(3, 4, 3), patch=patch, patch_starts=pstarts,
             pad_value=NEG_INF)
    for impl in GATHERS_ND:
        assert_same(run_gather_nd(impl, a), expected_gather_nd(a))


def test_gather_nd_accepts_numpy_and_list_positions():
    a = make_case_nd(*GATHER3_CASES["past the high corner"])
    want = expected_gather_nd(a)
    s, p = a["starts"], a["patch_starts"]
    for backend in ("torch", "numba"):
        got = K.gather_nd(a["base"], (s[0].numpy().astype(np.int32), s[1].tolist(), tuple(s[2].tolist())),
                          [4, 4, 4], a["patch"], [p[0].numpy(), p[1].tolist(), p[2]], backend=backend)
        assert_same(got, want)


# name: (C, (D, H, W), patch shape, patch starts per axis)
PASTE3_CASES = {
    "inside":              (2, (4, 5, 6), (2, 2, 3), ([0, 2], [1, 3], [0, 3])),
    "clipped every side":  (2, (4, 4, 4), (3, 2, 3), ([-1, 3, -2, 2], [-1, 3, 1, -1], [-2, 2, 1, -1])),
    "fully outside":       (1, (3, 3, 3), (2, 2, 2), ([-2, 3, 0], [0, 1, 9], [0, 0, 0])),
    "larger than base":    (1, (2, 3, 4), (4, 6, 7), ([-1], [-2], [-1])),
    "B=1, C=1, 1x1x1":     (1, (1, 1, 1), (1, 1, 1), ([0], [0], [0])),
    "empty batch":         (2, (3, 3, 3), (2, 2, 2), ([], [], [])),
}


@pytest.mark.parametrize("impl", PASTES_ND)
@pytest.mark.parametrize("case", PASTE3_CASES)
def test_paste_3d_matches_oracle(case, impl):
    C, S, P, starts = PASTE3_CASES[case]
    g = torch.Generator().manual_seed(2)
    base = torch.randn(C, *S, generator=g)
    patch = torch.randn(len(starts[0]), C, *P, generator=g) + 100.0
    ps = [torch.tensor(s, dtype=torch.int64) for s in starts]
    got = PASTES_ND[impl](base, patch, ps)
    assert_same(got, naive_paste_nd(base.numpy(), patch.numpy(), starts))
    assert got.data_ptr() != base.data_ptr() or got.numel() == 0


def test_paste_nd_on_images_equals_paste():
    base, patch = torch.randn(2, 5, 4), torch.randn(3, 2, 2, 3)
    py, px = torch.tensor([-1, 2, 4]), torch.tensor([0, 3, -2])
    for backend in ("torch", "numba", "auto"):
        assert torch.equal(K.paste_nd(base, patch, [py, px], backend=backend),
                           K.paste(base, patch, py, px, backend="torch"))


def test_paste_3d_writes_into_out():
    base, patch = torch.randn(2, 3, 4, 4), torch.randn(3, 2, 2, 2, 2)
    ps = [torch.tensor([-1, 1, 2]), torch.tensor([0, 3, 1]), torch.tensor([2, -1, 0])]
    for backend in ("torch", "numba"):
        out = torch.empty(3, 2, 3, 4, 4)
        assert K.paste_nd(base, patch, ps, backend=backend, out=out) is out
        assert_same(out, naive_paste_nd(base.numpy(), patch.numpy(), [p.tolist() for p in ps]))


# ---------------------------------------------------------------- N-D validation (exact messages)

def _ok_nd():
    return dict(base=torch.zeros(2, 4, 5, 5), starts=[torch.tensor([0, 1])] * 3, sizes=(2, 3, 3),
                patch=torch.zeros(2, 2, 1, 2, 2), patch_starts=[torch.tensor([0, 1])] * 3)


BAD_GATHER_ND = [
    (dict(base=np.zeros((2, 4, 5, 5), np.float32)), "base must be a torch tensor, got ndarray"),
    (dict(base=torch.zeros(1, 2, 4, 5, 5)),
     "base must have shape (C, H, W) or (C, D, H, W), got (1, 2, 4, 5, 5): it is the materialized "
     "tensor shared by all positions, without a batch dimension"),
    (dict(base=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), "base must be float32, got torch.float64"),
    (dict(starts=torch.zeros(3, 2, dtype=torch.int64)),
     "starts must be a sequence of 3 position tensors, one per spatial axis, got Tensor"),
    (dict(starts=[torch.tensor([0, 1])] * 2), "starts has 2 axes but base has 3 spatial axes"),
    (dict(starts=[torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1])]),
     "starts[1] must hold integers, got torch.float32"),
    (dict(starts=[torch.tensor([[0, 1]])] * 3), "starts[0] must have shape (B,), got (1, 2)"),
    (dict(starts=[torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0])]),
     "starts[2] has 1 positions but starts[0] has 2"),
    (dict(sizes=4), "sizes must be a sequence of 3 positive ints, one per spatial axis, got 4"),
    (dict(sizes=(2, 3)), "sizes has 2 axes but base has 3 spatial axes"),
    (dict(sizes=(2, 0, 3)), "sizes[1] must be a positive int, got 0"),
    (dict(sizes=(2, 3, 3.0)), "sizes[2] must be a positive int, got 3.0"),
    (dict(patch=torch.zeros(3, 2, 1, 2, 2)), "patch has 3 positions but starts[0] has 2"),
    (dict(patch=torch.zeros(2, 3, 1, 2, 2)), "patch has 3 channels but base has 2"),
    (dict(patch=torch.zeros(2, 2, 2, 2)), "patch must have shape (B, C, pd, ph, pw), got (2, 2, 2, 2)"),
    (dict(patch=torch.zeros(2, 2, 1, 2, 2, dtype=torch.float16)), "patch must be float32, got torch.float16"),
    (dict(patch_starts=None),
     "a patch needs patch_starts (its first corner per position, one (B,) per spatial axis)"),
    (dict(patch=None), "patch_starts given without a patch: pass the patch too, or neither"),
    (dict(patch_starts=[torch.tensor([0, 1])] * 2), "patch_starts has 2 axes but base has 3 spatial axes"),
    (dict(patch_starts=[torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1])]),
     "patch_starts[1] has 1 positions but starts[0] has 2"),
    (dict(pad_value="zero"), "pad_value must be a number, got 'zero'"),
    (dict(out=torch.zeros(2, 2, 2, 3, 4)), "out must have shape (2, 2, 2, 3, 3), got (2, 2, 2, 3, 4)"),
    (dict(backend="gpu"), "unknown backend 'gpu': choose one of auto, torch, numba, cuda"),
]


@pytest.mark.parametrize("change,message", BAD_GATHER_ND, ids=[m[:40] for _, m in BAD_GATHER_ND])
def test_gather_nd_rejects(change, message):
    with pytest.raises(ValueError) as err:
        K.gather_nd(**{**_ok_nd(), **change})
    assert str(err.value) == message


def test_gather_nd_on_images_names_its_own_arguments():
    with pytest.raises(ValueError) as err:
        K.gather_nd(torch.zeros(1, 4, 4), [[0], [0.5]], (2, 2))
    assert str(err.value) == "starts[1] must hold integers, got torch.float64"
    with pytest.raises(ValueError) as err:
        K.gather_nd(torch.zeros(1, 4, 4), [[0], [0]], (2, 2), torch.zeros(1, 1, 1, 1, 1), [[0], [0]])
    assert str(err.value) == "patch must have shape (B, C, ph, pw), got (1, 1, 1, 1, 1)"


BAD_PASTE_ND = [
    (dict(patch=None),
     "paste needs a patch (B, C, pd, ph, pw); for plain copies use base.expand(B, *base.shape)"),
    (dict(patch_starts=[torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0])]),
     "patch_starts[2] has 1 positions but patch_starts[0] has 2"),
    (dict(patch=torch.zeros(1, 2, 2, 2, 2)), "patch has 1 positions but patch_starts[0] has 2"),
    (dict(out=torch.zeros(2, 2, 4, 5, 5, dtype=torch.float64)), "out must be float32, got torch.float64"),
    (dict(base=torch.zeros(4, 5, 5, 5, 5)),
     "base must have shape (C, H, W) or (C, D, H, W), got (4, 5, 5, 5, 5): it is the materialized "
     "tensor shared by all positions, without a batch dimension"),
]


@pytest.mark.parametrize("change,message", BAD_PASTE_ND, ids=[m[:40] for _, m in BAD_PASTE_ND])
def test_paste_nd_rejects(change, message):
    a = dict(base=torch.zeros(2, 4, 5, 5), patch=torch.zeros(2, 2, 2, 2, 2),
             patch_starts=[torch.tensor([0, 1])] * 3)
    with pytest.raises(ValueError) as err:
        K.paste_nd(**{**a, **change})
    assert str(err.value) == message


def test_auto_on_a_large_volume():
    base = torch.randn(8, 12, 12, 12)
    starts = [torch.tensor([-2, 0, 5, 9])] * 3
    assert K.auto_backend(base, 4 * 8 * 6 ** 3) == "numba"
    got = K.gather_nd(base, starts, (6, 6, 6), backend="auto")
    np.testing.assert_array_equal(got.numpy(), naive_gather_nd(base.numpy(), [s.tolist() for s in starts],
                                                                (6, 6, 6)))


# ================================================================ blend
# Per-window values (classes x windows) blended per pixel, classes first, with the most
# probable class: MONAI's occlusion map. Oracle: each window's weights added to its box
# of a dense float64 grid in plain torch, every pixel divided by its total weight.

def blend_case(grid, window, stride, K, seed):
    """Windows of ``window`` every ``stride`` over ``grid`` (the last ones may hang past
    it), Gaussian-like weights, random values with two tied classes and NaNs. Returns the
    float32 values (K, W), the row-normalised CSR matrix (pixels x windows) and the dense
    float64 oracle (K, pixels); pixels no window covers (gaps, far edges) stay 0."""
    gen = torch.Generator().manual_seed(seed)
    axes = [range(0, g - w // 2, s) for g, w, s in zip(grid, window, stride)]
    corners = list(itertools.product(*axes))
    weight = torch.rand(window, generator=gen, dtype=torch.float64) + 0.1
    values = torch.rand(K, len(corners), generator=gen)
    values[4] = values[1] = values[1] + 1.0          # classes 1 and 4 tie as the maximum: 1 wins
    values[2, 0] = values[6, 0] = float("nan")       # window 0's pixels: NaN in 2 and 6, the first NaN wins
    values[0, -1] = float("-inf")
    dense = torch.zeros(math.prod(grid), len(corners), dtype=torch.float64)   # pixels x windows
    for n, c in enumerate(corners):
        box = torch.zeros(grid, dtype=torch.float64)
        src = tuple(slice(0, min(w, g - a)) for a, w, g in zip(c, window, grid))
        box[tuple(slice(a, a + w) for a, w in zip(c, window))] = weight[src]
        dense[:, n] = box.reshape(-1)
    total = dense.sum(1, keepdim=True)
    dense = torch.where(total > 0, dense / total.clamp(min=1e-300), dense)
    import scipy.sparse as sp
    placed = sp.csr_matrix(dense.float().numpy())
    want = torch.zeros(K, len(dense), dtype=torch.float64)
    for n in range(len(corners)):          # only where the window lies: 0 * NaN is no term
        at = dense[:, n] > 0
        want[:, at] += values[:, n, None].double() * dense[at, n]
    return values, placed, want


BLEND_CASES = [((13, 17), (5, 3), (3, 2), 9), ((1, 31), (1, 4), (1, 6), 8),
               ((5, 7, 9), (3, 3, 5), (2, 3, 3), 10), ((4, 6, 3), (2, 5, 3), (1, 2, 2), 7)]


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("grid,window,stride,K", BLEND_CASES)
def test_blend_matches_oracle(grid, window, stride, K, backend):
    values, placed, want = blend_case(grid, window, stride, K, seed=len(grid) + K)
    got, best = K_blend(values, placed, backend)
    assert got.shape == (K, math.prod(grid)) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-6, atol=1e-6)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert best.dtype == torch.int64 and torch.equal(best, want.argmax(0))
    covered = torch.from_numpy(np.diff(placed.indptr) > 0)
    nan = torch.isnan(got).any(0)
    assert torch.equal(best[covered & ~nan].unique(), torch.tensor([1]))      # the tie's first
    assert (best[nan] == 2).all()                                             # the first NaN
    assert (got[:, ~covered] == 0).all() and (best[~covered] == 0).all()
    assert (~covered).any() or stride[-1] <= window[-1]     # gaps between windows: pixels of none


def K_blend(values, placed, backend, **kw):
    return K.blend(values, placed.indptr, placed.indices, placed.data, backend=backend, **kw)


def test_blend_sums_as_scipy_does_bit_for_bit():
    """numba sums each pixel from zero, window by window in CSR order, in float32: the
    sums of scipy's ``placed @ values`` (what the MONAI drop-in computed before)."""
    values, placed, _ = blend_case((23, 19), (6, 4), (3, 3), 50, seed=3)
    values = values.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    got, best = K_blend(values, placed, "numba")
    want = torch.from_numpy(np.asarray(placed @ values.T.contiguous().numpy()))
    assert torch.equal(got, want.T) and torch.equal(best, want.argmax(1))


def test_blend_argmax_as_torch_on_many_classes():
    """The first maximum and the first NaN over a thousand classes, all ties."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 3, (1000, 40), generator=gen).float()       # ties everywhere
    values[700:, 5] = float("nan")
    values[900, 6] = float("nan")
    import scipy.sparse as sp
    placed = sp.random(257, 40, density=0.1, random_state=1, format="csr", dtype=np.float32)
    got, best = K_blend(values, placed, "numba")
    assert torch.equal(best, got.argmax(0))
    assert torch.equal(best, K_blend(values, placed, "torch")[0].argmax(0))


def test_blend_writes_into_out_and_takes_any_values_strides():
    values, placed, want = blend_case((9, 8), (3, 3), (2, 2), 7, seed=5)
    out = torch.full((7, 72), 7.0)
    got, _ = K_blend(values.T.contiguous().T, placed, "numba", out=out)
    assert got is out
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=2e-6, atol=1e-6)


def test_blend_without_pixels():
    got, best = K.blend(torch.ones(3, 2), [0], torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                        backend="numba")
    assert got.shape == (3, 0) and best.shape == (0,)


BAD_BLEND = [
    (dict(values=torch.zeros(3, 4, dtype=torch.float64)), "values must be float32 (K, W) with K >= 1 "
                                                          "classes, got torch.float64 (3, 4)"),
    (dict(values=torch.zeros(0, 4)),
     "values must be float32 (K, W) with K >= 1 classes, got torch.float32 (0, 4)"),
    (dict(values=[[1.0]]), "values must be a torch tensor or numpy array, got list"),
    (dict(indptr=[0, 2, 1]), "indptr must start at 0, never decrease and end at nnz = 2, got 0 ... 1"),
    (dict(indptr=[0, 1, 3]), "indptr must start at 0, never decrease and end at nnz = 2, got 0 ... 3"),
    (dict(indices=[0, 4]), "indices must lie in [0, 4) (values' windows), got [0, 4]"),
    (dict(indices=[-1, 2]), "indices must lie in [0, 4) (values' windows), got [-1, 2]"),
    (dict(weights=torch.zeros(3)), "weights must be float32 (2,) like indices, got torch.float32 (3,)"),
    (dict(out=torch.zeros(3, 3)), "out must have shape (3, 2), got (3, 3)"),
    (dict(backend="cuda"), "unknown backend 'cuda' for blend: choose auto, torch or numba"),
]


@pytest.mark.parametrize("change,message", BAD_BLEND, ids=[m[:40] for _, m in BAD_BLEND])
def test_blend_rejects(change, message):
    a = dict(values=torch.zeros(3, 4), indptr=[0, 1, 2], indices=[0, 3], weights=torch.ones(2))
    with pytest.raises(ValueError) as err:
        K.blend(**{**a, **change})
    assert str(err.value) == message
