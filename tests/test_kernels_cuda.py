"""kql.kernels.gather_cuda: the CUDA kernels, under Numba's simulator and on a real GPU.

The simulator part always runs. ``NUMBA_ENABLE_CUDASIM`` must be set before numba is
first imported and would then turn every ``numba.cuda`` of the process into the
simulator, so the cases run in one child process with that variable set; this
process (the rest of the test session) never sees it. The child reports each case's
result as JSON and one test per case checks it, so a failure names its case.

The GPU part runs the same kernels on torch CUDA tensors, zero copy, and reports
"skipped" with the reason where no GPU is visible to both torch and numba.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import kql.kernels as K
from kql.kernels import reference

NEG_INF = float("-inf")

# name: (op, mode, C, H, W, win_h, win_w, win_y0, win_x0, (ph, pw) or None, patch_y0, patch_x0, pad)
#   op: gather | paste (paste ignores the window fields)
#   mode: numpy (host arrays in, host array out) | device (numba device arrays in and out,
#         on a stream) | out (gather into a caller's numpy out)
SIM_CASES = {
    "inside":                      ("gather", "numpy", 2, 7, 7, 4, 4, [1, 3], [0, 2], (2, 2), [2, 4], [1, 3], 0.0),
    "window past top-left":        ("gather", "numpy", 2, 6, 7, 5, 5, [-2, -4], [-3, 0], (2, 2), [-1, -3], [-2, 1], 0.0),
    "window past bottom-right":    ("gather", "numpy", 2, 6, 7, 5, 5, [3, 4], [5, 6], (2, 2), [4, 5], [6, 7], 0.0),
    "window fully outside":        ("gather", "numpy", 1, 4, 4, 3, 3, [6, -5], [0, -2], None, None, None, 0.0),
    "patch partly outside window": ("gather", "numpy", 2, 8, 8, 4, 4, [2, 2, 2], [2, 2, 2], (3, 3),
                                    [0, 5, 4], [1, 4, 0], 0.0),
    "patch disjoint from window":  ("gather", "numpy", 1, 8, 8, 3, 3, [0, 5], [0, 5], (2, 2), [5, 0], [5, 0], 0.0),
    "patch over the padding":      ("gather", "numpy", 1, 5, 5, 4, 4, [-2, 3], [-2, 3], (2, 3), [-2, 4], [-1, 3], 0.0),
    "-inf padding":                ("gather", "numpy", 2, 5, 6, 4, 4, [-1, 3], [-1, 4], (2, 2), [0, 3], [0, 4], NEG_INF),
    "B=1, C=1, window 1x1":        ("gather", "numpy", 1, 3, 3, 1, 1, [2], [-1], (1, 1), [2], [-1], 0.0),
    "no patch":                    ("gather", "numpy", 2, 5, 5, 3, 3, [-1, 3], [2, -1], None, None, None, 0.5),
    "more planes than grid rows":  ("gather", "numpy", 3, 4, 4, 2, 2, [0, 1, 2, 3], [0, 1, 2, 3], (1, 1),
                                    [0, 1, 2, 3], [1, 1, 1, 1], 0.0),
    "device arrays on a stream":   ("gather", "device", 2, 6, 6, 4, 3, [-1, 3], [2, 4], (2, 2), [0, 4], [2, 5], NEG_INF),
    "into a numpy out":            ("gather", "out", 2, 6, 6, 3, 3, [-1, 4], [0, 4], (2, 2), [0, 4], [0, 5], 0.0),
    "empty batch":                 ("gather", "numpy", 2, 4, 4, 3, 3, [], [], (2, 2), [], [], 0.0),
    "paste clipped":               ("paste", "numpy", 2, 5, 5, 0, 0, [], [], (3, 3), [-1, 3, 1], [-2, 4, 1], 0.0),
    "paste on device arrays":      ("paste", "device", 1, 4, 5, 0, 0, [], [], (2, 2), [3, -1], [0, 4], 0.0),
    # batches longer than the zero starts the module keeps between launches (64 at first):
    # the buffer grows, and later cases read views of the grown one
    "batch past the kept zeros":   ("gather", "numpy", 1, 4, 4, 1, 2, [i % 6 - 1 for i in range(70)],
                                    [i % 5 - 1 for i in range(70)], None, None, None, 0.5),
    "paste past the kept zeros":   ("paste", "numpy", 1, 3, 3, 0, 0, [], [], (1, 1),
                                    [i % 5 - 1 for i in range(150)], [i % 4 - 1 for i in range(150)], 0.0),
}

# Volumes: name: (op, mode, C, (D, H, W), window sizes, window starts per axis,
#                 patch shape or None, patch starts per axis, pad)
#   op: gather3 | paste3 (paste3 ignores the window fields); mode as above
SIM3_CASES = {
    "3-D inside":                  ("gather3", "numpy", 2, (5, 6, 7), (3, 4, 4), ([1, 2], [1, 2], [0, 3]),
                                    (2, 2, 2), ([2, 3], [2, 3], [1, 4]), 0.0),
    "3-D past every border":       ("gather3", "numpy", 2, (4, 5, 5), (4, 4, 4), ([-2, 2], [-1, 3], [-3, 4]),
                                    (2, 3, 2), ([-1, 3], [-2, 4], [-2, 5]), 0.0),
    "3-D fully outside, no patch": ("gather3", "numpy", 1, (3, 3, 3), (2, 2, 2), ([5, -4], [0, 0], [0, 1]),
                                    None, None, 0.5),
    "3-D patch partly outside":    ("gather3", "numpy", 1, (6, 6, 6), (3, 3, 3), ([1, 1, 1], [1, 1, 1], [1, 1, 1]),
                                    (2, 2, 2), ([0, 3, 2], [2, 0, 3], [3, 2, 0]), 0.0),
    "3-D -inf padding":            ("gather3", "numpy", 2, (4, 4, 5), (3, 3, 3), ([-1, 2], [-1, 2], [0, 3]),
                                    (1, 2, 2), ([0, 2], [-1, 3], [0, 4]), NEG_INF),
    "3-D B=1, 1x1x1":              ("gather3", "numpy", 1, (2, 2, 2), (1, 1, 1), ([1], [-1], [0]),
                                    (1, 1, 1), ([1], [-1], [0]), 0.0),
    "3-D device arrays on a stream": ("gather3", "device", 2, (4, 5, 4), (2, 3, 3), ([-1, 3], [2, 4], [0, 2]),
                                      (2, 2, 2), ([0, 3], [2, 5], [1, 2]), NEG_INF),
    "3-D into a numpy out":        ("gather3", "out", 1, (4, 4, 4), (2, 2, 3), ([-1, 3], [0, 3], [2, -1]),
                                    (1, 1, 2), ([0, 3], [0, 4], [2, 0]), 0.0),
    "3-D empty batch":             ("gather3", "numpy", 2, (3, 3, 3), (2, 2, 2), ([], [], []), (1, 1, 1),
                                    ([], [], []), 0.0),
    "3-D paste clipped":           ("paste3", "numpy", 2, (3, 4, 4), None, None, (2, 3, 2),
                                    ([-1, 2, 1], [3, -1, 1], [-1, 3, 0]), 0.0),
    "3-D paste on device arrays":  ("paste3", "device", 1, (3, 3, 4), None, None, (2, 2, 2),
                                    ([2, -1], [0, 2], [3, 0]), 0.0),
}

# Runs in the child. Builds each case's inputs from its seed, runs the CUDA kernel under
# the simulator and the torch reference on the CPU, prints {case: {"ok", "detail"}}.
CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import numba
    from numba import cuda
    import torch
    from kql.kernels import gather_cuda, reference

    cases = json.loads(sys.stdin.read())
    results = {"__simulator__": bool(numba.config.ENABLE_CUDASIM)}
    def volume_case(rng, op, mode, C, S, sizes, wz, pshape, pz, pad):
        # a 3-D case's inputs (window and patch starts per axis) and the torch oracle
        base = rng.standard_normal((C,) + tuple(S)).astype(np.float32)
        B = len(pz[0]) if op == "paste3" else len(wz[0])
        patch = None if pshape is None else (
            rng.standard_normal((B, C) + tuple(pshape)).astype(np.float32) + 100)
        ints = lambda vs: None if vs is None else [np.asarray(v, dtype=np.int64) for v in vs]
        t = lambda vs: None if vs is None else [torch.from_numpy(v) for v in vs]
        tp = None if patch is None else torch.from_numpy(patch)
        if op == "paste3":
            want = reference.paste_nd(torch.from_numpy(base), tp, t(ints(pz))).numpy()
        else:
            want = reference.gather_nd(torch.from_numpy(base), t(ints(wz)), sizes, tp,
                                       t(ints(pz)), pad).numpy()
        return base, patch, ints(wz), ints(pz), want

    for seed, (name, case) in enumerate(sorted(cases.items())):
        if case[0] in ("gather3", "paste3"):
            op, mode, C, S, sizes, wz, pshape, pz, pad = case
            try:
                rng = np.random.default_rng(seed)
                base, patch, wz, pz, want = volume_case(rng, *case)
                kw = dict(threads_per_block=8)
                if mode == "device":
                    stream = cuda.stream()
                    dev = lambda a: cuda.to_device(a, stream=stream)
                    if op == "paste3":
                        got = gather_cuda.paste_nd(dev(base), dev(patch), [dev(v) for v in pz],
                                                   stream=stream, **kw)
                    else:
                        got = gather_cuda.gather_nd(dev(base), [dev(v) for v in wz], sizes,
                                                    dev(patch), [dev(v) for v in pz], pad,
                                                    stream=stream, **kw)
                    got_is = type(got).__name__
                    got = got.copy_to_host(stream=stream)
                    stream.synchronize()
                elif op == "paste3":
                    got = gather_cuda.paste_nd(base, patch, pz, **kw)
                    got_is = type(got).__name__
                else:
                    out = np.full(want.shape, 7.0, np.float32) if mode == "out" else None
                    got = gather_cuda.gather_nd(base, wz, sizes, patch, pz, pad, out, **kw)
                    got_is = "out" if got is out else type(got).__name__
                same = got.shape == want.shape and np.array_equal(got, want)
                results[name] = {"ok": bool(same), "returned": got_is,
                                 "detail": "" if same else f"got {got.tolist()}, want {want.tolist()}"}
            except Exception as exc:
                results[name] = {"ok": False, "returned": None,
                                 "detail": f"{type(exc).__name__}: {exc}"}
            continue
        op, mode, C, H, W, wh, ww, wy, wx, pshape, py, px, pad = case
        try:
            rng = np.random.default_rng(seed)
            base = rng.standard_normal((C, H, W)).astype(np.float32)
            B = len(py) if op == "paste" else len(wy)
            patch = None if pshape is None else (
                rng.standard_normal((B, C) + tuple(pshape)).astype(np.float32) + 100)
            ints = lambda v: np.asarray(v, dtype=np.int64)
            t = lambda a: None if a is None else torch.from_numpy(a)
            if op == "paste":
                want = reference.paste(t(base), t(patch), t(ints(py)), t(ints(px))).numpy()
            else:
                want = reference.gather(t(base), t(ints(wy)), t(ints(wx)), wh, ww, t(patch),
                                        None if patch is None else t(ints(py)),
                                        None if patch is None else t(ints(px)), pad).numpy()
            kw = dict(threads_per_block=8)  # the simulator runs one Python thread per CUDA thread
            if mode == "device":
                stream = cuda.stream()
                dev = lambda a: cuda.to_device(a, stream=stream)
                if op == "paste":
                    got = gather_cuda.paste(dev(base), dev(patch), dev(ints(py)), dev(ints(px)),
                                            stream=stream, **kw)
                else:
                    got = gather_cuda.gather(dev(base), dev(ints(wy)), dev(ints(wx)), wh, ww,
                                             dev(patch), dev(ints(py)), dev(ints(px)), pad,
                                             stream=stream, **kw)
                got_is = type(got).__name__
                got = got.copy_to_host(stream=stream)
                stream.synchronize()
            elif op == "paste":
                got = gather_cuda.paste(base, patch, ints(py), ints(px), **kw)
                got_is = type(got).__name__
            else:
                out = np.full(want.shape, 7.0, np.float32) if mode == "out" else None
                got = gather_cuda.gather(base, ints(wy), ints(wx), wh, ww, patch,
                                         None if patch is None else ints(py),
                                         None if patch is None else ints(px), pad, out, **kw)
                got_is = "out" if got is out else type(got).__name__
            same = got.shape == want.shape and np.array_equal(got, want)
            results[name] = {"ok": bool(same), "returned": got_is,
                             "detail": "" if same else f"got {got.tolist()}, want {want.tolist()}"}
        except Exception as exc:  # report, so the other cases still run
            results[name] = {"ok": False, "returned": None, "detail": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def simulated():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(ALL_SIM_CASES),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_simulator_child_ran_under_the_simulator(simulated):
    assert simulated["__simulator__"] is True


def test_simulator_variable_did_not_leak_into_this_session(simulated):
    import numba
    assert "NUMBA_ENABLE_CUDASIM" not in os.environ
    assert not numba.config.ENABLE_CUDASIM


ALL_SIM_CASES = {**SIM_CASES, **SIM3_CASES}


@pytest.mark.parametrize("case", ALL_SIM_CASES)
def test_cuda_kernel_under_simulator(simulated, case):
    result = simulated[case]
    assert result["ok"], result["detail"]
    mode = ALL_SIM_CASES[case][1]
    assert result["returned"] == {"numpy": "ndarray", "out": "out", "device": "FakeCUDAArray"}[mode]


# ---------------------------------------------------------------- real GPU

gpu = pytest.mark.skipif(
    "cuda" not in K.available_backends(),
    reason="no CUDA GPU visible to both torch and numba here; the CUDA kernels were "
           "checked under Numba's simulator only (test_cuda_kernel_under_simulator)")


def _gpu_inputs(seed=0, B=5, C=3, H=11, W=9, wh=6, ww=5, ph=3, pw=4):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, H, W, generator=g)
    wy = torch.randint(-wh, H + 1, (B,), generator=g)
    wx = torch.randint(-ww, W + 1, (B,), generator=g)
    py = wy + torch.randint(-ph, wh + 1, (B,), generator=g)
    px = wx + torch.randint(-pw, ww + 1, (B,), generator=g)
    patch = torch.randn(B, C, ph, pw, generator=g) + 100
    return base, wy, wx, wh, ww, patch, py, px


@gpu
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pad", [0.0, NEG_INF])
def test_cuda_gather_on_torch_tensors(seed, pad):
    base, wy, wx, wh, ww, patch, py, px = _gpu_inputs(seed)
    want = reference.gather(base, wy, wx, wh, ww, patch, py, px, pad)
    dev = torch.device("cuda")
    got = K.gather(base.to(dev), wy, wx, wh, ww, patch.to(dev), py, px, pad, backend="cuda")
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)
    # the torch reference on the GPU (vectorised strategy) agrees as well
    ref_gpu = K.gather(base.to(dev), wy.to(dev), wx.to(dev), wh, ww, patch.to(dev), py.to(dev),
                       px.to(dev), pad, backend="torch")
    assert torch.equal(ref_gpu.cpu(), want)


@gpu
def test_cuda_paste_and_auto_on_a_side_stream():
    base, _, _, _, _, patch, py, px = _gpu_inputs(7, ph=4, pw=4)
    want = reference.paste(base, patch, py, px)
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        b, p = base.to(dev, non_blocking=True), patch.to(dev, non_blocking=True)
        got = K.paste(b, p, py.to(dev), px.to(dev))  # auto -> cuda, on the side stream
    stream.synchronize()
    assert K.auto_backend(b, got.numel()) == "cuda"
    assert torch.equal(got.cpu(), want)


@gpu
def test_cuda_writes_into_out_without_copies():
    base, wy, wx, wh, ww, patch, py, px = _gpu_inputs(3)
    dev = torch.device("cuda")
    out = torch.full((len(wy), base.shape[0], wh, ww), 7.0, device=dev)
    got = K.gather(base.to(dev), wy, wx, wh, ww, patch.to(dev), py, px, backend="cuda", out=out)
    assert got is out
    assert torch.equal(out.cpu(), reference.gather(base, wy, wx, wh, ww, patch, py, px))
    assert np.isfinite(out.cpu().numpy()).all()


@gpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pad", [0.0, NEG_INF])
def test_cuda_gather_and_paste_on_volumes(seed, pad):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 7, 9, 8, generator=g)
    sizes, P = (4, 5, 3), (2, 3, 2)
    starts = [torch.randint(-n, s + 1, (6,), generator=g) for n, s in zip(sizes, base.shape[1:])]
    pstarts = [w + torch.randint(-m, n + 1, (6,), generator=g) for w, m, n in zip(starts, P, sizes)]
    patch = torch.randn(6, 3, *P, generator=g) + 100
    dev = torch.device("cuda")
    want = reference.gather_nd(base, starts, sizes, patch, pstarts, pad)
    got = K.gather_nd(base.to(dev), starts, sizes, patch.to(dev), pstarts, pad_value=pad,
                      backend="cuda")
    assert torch.equal(got.cpu(), want)
    ref_gpu = K.gather_nd(base.to(dev), [s.to(dev) for s in starts], sizes, patch.to(dev),
                          [s.to(dev) for s in pstarts], pad_value=pad, backend="torch")
    assert torch.equal(ref_gpu.cpu(), want)
    assert torch.equal(K.paste_nd(base.to(dev), patch.to(dev), pstarts).cpu(),
                       reference.paste_nd(base, patch, pstarts))
