"""Time the input-preparation kernels on typical layer shapes: torch vs Numba on the CPU.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_kernels.py            # layer table
    .venv/bin/python benchmarks/bench_kernels.py --sweep    # crossover for the auto rule
    .venv/bin/python benchmarks/bench_kernels.py --volumes  # the 3-D table (and sweep) only

Each row is one call for a batch of B occlusion positions of one layer, placed as
the executor places them: a patch-sized changed region every ``stride`` cells in
row-major order from the top-left corner (so batches touch the borders), read
through a window of the patch plus a one-cell context, reaching into the padding.
Times are the median of ``--repeats`` calls after warm-up, in milliseconds, the
contenders of a row called in turn (interleaved) so that load from other processes
falls on all of them alike; each call allocates its output as the executor's calls
do (``out=`` saves that). Volumes (3-D CNNs, ``(C, D, H, W)``) have their own table:
a patch box every ``stride`` cells in each axis, read through a window of the box
plus its context, batches of 16 positions (3-D views are large).
Other processes on the machine skew the numbers: compare columns of one run.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch

import kql.kernels as K
from kql.kernels import gather_cpu, reference

# name, C, H, W, patch (square), context each side, stride, B, pad
LAYERS = [
    ("VGG16 conv1_2 (64x224x224)", 64, 224, 224, 18, 1, 4, 64, 0.0),
    ("VGG16 pool1 (64x224x224, -inf)", 64, 224, 224, 18, 1, 4, 64, float("-inf")),
    ("VGG16 conv2_2 (128x112x112)", 128, 112, 112, 10, 1, 2, 64, 0.0),
    ("VGG16 conv3_3 (256x56x56)", 256, 56, 56, 8, 1, 1, 64, 0.0),
    ("VGG16 conv5_3 (512x14x14)", 512, 14, 14, 4, 1, 1, 64, 0.0),
    ("ResNet18 layer2 (128x28x28)", 128, 28, 28, 9, 1, 1, 64, 0.0),
    ("ResNet18 layer4 (512x7x7)", 512, 7, 7, 3, 1, 1, 64, 0.0),
    ("small batch (64x56x56, B=4)", 64, 56, 56, 6, 1, 1, 4, 0.0),
    ("tiny (16x14x14, B=2)", 16, 14, 14, 2, 1, 1, 2, 0.0),
]
# name, C, H, W, patch, stride, B   (paste feeds a flatten / linear layer)
PASTES = [
    ("VGG16 pool5 -> fc6 (512x7x7)", 512, 7, 7, 3, 1, 64),
    ("ResNet18 layer4 -> pool (512x7x7)", 512, 7, 7, 2, 1, 64),
    ("AlexNet-ish (256x13x13)", 256, 13, 13, 4, 1, 64),
]

# Volumes: name, C, (D, H, W), patch box (pd, ph, pw), context each side, stride, B, pad.
# Shapes of MONAI DenseNet121-3D / ResNet18-3D on a 64^3 scan and of torchvision's
# r3d_18 on a 16x112x112 clip (patch 8, stride 4 at the input).
VOLUME_LAYERS = [
    ("scan input (1x64^3)", 1, (64, 64, 64), (8, 8, 8), 1, 4, 64, 0.0),
    ("DenseNet121-3D conv0 (64x32^3)", 64, (32, 32, 32), (5, 5, 5), 3, 2, 16, 0.0),
    ("DenseNet121-3D pool0 (64x32^3, -inf)", 64, (32, 32, 32), (5, 5, 5), 1, 2, 16, float("-inf")),
    ("DenseNet121-3D block1 (128x16^3)", 128, (16, 16, 16), (3, 3, 3), 1, 1, 16, 0.0),
    ("ResNet18-3D layer1 (64x16^3)", 64, (16, 16, 16), (3, 3, 3), 1, 1, 16, 0.0),
    ("ResNet18-3D layer3 (256x4^3)", 256, (4, 4, 4), (2, 2, 2), 1, 1, 16, 0.0),
    ("r3d_18 stem (64x16x56x56)", 64, (16, 56, 56), (3, 6, 6), 1, 2, 16, 0.0),
    ("small batch (32x16^3, B=2)", 32, (16, 16, 16), (3, 3, 3), 1, 1, 2, 0.0),
]
# name, C, (D, H, W), patch box, stride, B   (paste feeds a global pooling / linear layer)
VOLUME_PASTES = [
    ("ResNet18-3D layer4 -> pool (512x2^3)", 512, (2, 2, 2), (1, 1, 1), 1, 16),
    ("DenseNet121-3D block4 (1024x2^3)", 1024, (2, 2, 2), (1, 1, 1), 1, 16),
    ("ResNet18-3D layer3 -> ... (256x4^3)", 256, (4, 4, 4), (2, 2, 2), 1, 16),
]


def positions_nd(S, patch, stride, B):
    """First corners of B consecutive patch boxes of a scan in C order, one (B,) per axis."""
    axes = [range(0, s - p + 1, stride) for s, p in zip(S, patch)]
    grid = list(itertools.product(*axes))
    grid = (grid * (B // len(grid) + 1))[:B]
    return [torch.tensor([g[k] for g in grid], dtype=torch.int64) for k in range(len(S))]


CLOCK = time.perf_counter


def interleaved_ms(fns, repeats, warmup=3):
    """Median ms per function, the functions called in turn on every repeat."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def row(name, window, base, want, fns, repeats):
    """One table row: every contender checked against ``want``, then timed interleaved."""
    for f in fns.values():
        assert torch.equal(f(), want)
    return name, window, want.numel(), interleaved_ms(fns, repeats), \
        K.auto_backend(base, want.numel())


def torch_forms(n_axes):
    """The looped and vectorised torch gathers the executor runs for ``n_axes`` spatial
    axes (the 2-D functions for images), called as ``gather_nd``."""
    if n_axes != 2:
        return reference.gather_looped_nd, reference.gather_vectorised_nd

    def as_nd(f):
        return lambda base, starts, sizes, patch, ps, pad: f(base, *starts, *sizes, patch, *ps, pad)
    return as_nd(reference.gather_looped), as_nd(reference.gather_vectorised)


def gather_row(name, C, S, patch, ctx, stride, B, pad, repeats, paste=False):
    """A batch of B positions of one layer: windows of the patch box plus ``ctx`` each
    side, or (``paste``) whole-base copies, which is what paste computes."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(C, *S, generator=g)
    ps = positions_nd(S, patch, stride, B)
    upd = torch.randn(B, C, *patch, generator=g)
    if paste:
        starts, sizes, label = [p * 0 for p in ps], tuple(S), "paste " + "x".join(map(str, patch))
    else:
        starts, sizes = [p - ctx for p in ps], tuple(n + 2 * ctx for n in patch)
        label = "x".join(map(str, sizes))
    args = (base, starts, sizes, upd, ps, pad)
    loop, vec = torch_forms(len(S))
    want = vec(*args)
    out = torch.empty_like(want)
    fns = {
        "torch loop": lambda: loop(*args),
        "torch vec": lambda: vec(*args),
        "numba": lambda: gather_cpu.gather_nd(*args),
        "numba out=": lambda: gather_cpu.gather_nd(*args, out=out),
    }
    return row(name, label, base, want, fns, repeats)


def print_table(rows):
    cols = ["torch loop", "torch vec", "numba", "numba out="]
    head = f"{'layer':36s} {'window':>11s} {'cells':>9s} " + " ".join(f"{c:>10s}" for c in cols)
    head += f" {'torch/numba':>11s} {'auto':>6s}"
    print(head)
    print("-" * len(head))
    for name, win, cells, t, auto in rows:
        best_torch = min(t["torch loop"], t["torch vec"])
        print(f"{name:36s} {win:>11s} {cells:>9d} " + " ".join(f"{t[c]:10.3f}" for c in cols)
              + f" {best_torch / t['numba']:10.1f}x {auto:>6s}")


# The crossover sweeps, per number of spatial axes: the map, and (B, C, window side) per
# row; each window holds a patch of side - 2 plus one cell of context each side.
SWEEPS = {
    2: ((28, 28), [(1, 1, 3), (1, 4, 3), (2, 8, 3), (4, 8, 4), (4, 16, 4), (4, 16, 8),
                   (8, 32, 4), (8, 32, 8), (8, 64, 8), (16, 64, 8), (16, 128, 8),
                   (64, 64, 6), (64, 128, 10)]),
    3: ((16, 16, 16), [(1, 1, 3), (1, 4, 3), (2, 4, 3), (2, 8, 4), (4, 8, 4), (4, 16, 4),
                       (4, 16, 6), (8, 32, 4), (8, 32, 6), (16, 64, 5), (16, 128, 6)]),
}


def sweep(n_axes, repeats):
    """Where Numba overtakes torch on windows of a map with ``n_axes`` spatial axes
    (``SWEEPS``), the better torch form against Numba on one thread and on all, called
    in turn: for images NUMBA_MIN_CELLS and where Numba's thread pool pays
    (gather_cpu.PARALLEL_MIN_CELLS), for volumes NUMBA_MIN_CELLS_VOLUME."""
    print(f"{'B':>3s} {'C':>4s} {'win':>4s} {'cells':>8s} {'torch':>8s} {'1 thread':>8s} "
          f"{'all':>8s} {'torch/best numba':>17s}")
    S, rows = SWEEPS[n_axes]
    loop, vec = torch_forms(n_axes)
    for B, C, win in rows:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(C, *S, generator=g)
        patch = (win - 2,) * n_axes
        ps = positions_nd(S, patch, 1, B)
        upd = torch.randn(B, C, *patch, generator=g)
        args = (base, [p - 1 for p in ps], (win,) * n_axes, upd, ps, 0.0)
        t = interleaved_ms({
            "loop": lambda: loop(*args),
            "vec": lambda: vec(*args),
            "one": lambda: gather_cpu.gather_nd(*args, parallel=False),
            "all": lambda: gather_cpu.gather_nd(*args, parallel=True)}, repeats)
        t_torch = min(t["loop"], t["vec"])
        cells = B * C * win ** n_axes
        print(f"{B:3d} {C:4d} {win:4d} {cells:8d} {t_torch:8.3f} {t['one']:8.3f} "
              f"{t['all']:8.3f} {t_torch / min(t['one'], t['all']):16.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="crossover sweep for auto rule")
    parser.add_argument("--volumes", action="store_true", help="the 3-D (volume) cases only")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and numba (default: theirs, all cores)")
    parser.add_argument("--clock", choices=["wall", "thread", "process"], default="wall",
                        help="thread: CPU time of the calling thread, blind to other "
                             "processes taking the cores (needs --threads 1; misses work "
                             "Numba's pool runs on its worker threads); process: CPU time "
                             "of every thread of this process")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
        __import__("numba").set_num_threads(opts.threads)
    global CLOCK
    if opts.clock == "thread":
        if opts.threads != 1:
            parser.error("--clock thread measures one thread: add --threads 1")
        CLOCK = time.thread_time
    elif opts.clock == "process":
        CLOCK = time.process_time
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba threads {__import__('numba').get_num_threads()}, "
          f"NUMBA_MIN_CELLS={K.NUMBA_MIN_CELLS}, PARALLEL_MIN_CELLS={gather_cpu.PARALLEL_MIN_CELLS}; "
          f"{opts.clock} time in ms, median of {opts.repeats}\n")
    for parallel in (False, True):  # compile (or load from cache) before timing
        gather_cpu.gather(torch.zeros(1, 1, 1), np.zeros(1, np.int64), np.zeros(1, np.int64), 1, 1,
                          parallel=parallel)
        gather_cpu.gather_nd(torch.zeros(1, 1, 1, 1), [np.zeros(1, np.int64)] * 3, (1, 1, 1),
                             parallel=parallel)
    if opts.sweep:
        if not opts.volumes:
            sweep(2, opts.repeats)
            print()
        sweep(3, opts.repeats)
        return
    if not opts.volumes:
        rows = [gather_row(name, C, (H, W), (p, p), ctx, stride, B, pad, opts.repeats)
                for name, C, H, W, p, ctx, stride, B, pad in LAYERS]
        rows += [gather_row(name, C, (H, W), (p, p), 0, stride, B, 0.0, opts.repeats, paste=True)
                 for name, C, H, W, p, stride, B in PASTES]
        print_table(rows)
        print()
    rows = [gather_row(*layer, opts.repeats) for layer in VOLUME_LAYERS]
    rows += [gather_row(name, C, S, patch, 0, stride, B, 0.0, opts.repeats, paste=True)
             for name, C, S, patch, stride, B in VOLUME_PASTES]
    print("Volumes (C, D, H, W):")
    print_table(rows)


if __name__ == "__main__":
    main()
