"""Time the input-preparation kernels on typical layer shapes: torch vs Numba on the CPU.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_kernels.py            # layer table
    .venv/bin/python benchmarks/bench_kernels.py --sweep    # crossover for the auto rule

Each row is one call for a batch of B occlusion positions of one layer, placed as
the executor places them: a patch-sized changed region every ``stride`` cells in
row-major order from the top-left corner (so batches touch the borders), read
through a window of the patch plus a one-cell context, reaching into the padding.
Times are the median of ``--repeats`` calls after warm-up, in milliseconds; each
call allocates its output as the executor's calls do (``out=`` saves that).
Other processes on the machine skew the numbers: compare columns of one run.
"""
from __future__ import annotations

import argparse
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


def positions(H, W, patch, stride, B):
    """Top-left corners of B consecutive patch positions of a row-major scan."""
    ys = range(0, H - patch + 1, stride)
    xs = range(0, W - patch + 1, stride)
    grid = [(y, x) for y in ys for x in xs]
    grid = (grid * (B // len(grid) + 1))[:B]
    py = torch.tensor([p[0] for p in grid], dtype=torch.int64)
    px = torch.tensor([p[1] for p in grid], dtype=torch.int64)
    return py, px


CLOCK = time.perf_counter


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times) * 1e3


def gather_row(name, C, H, W, patch, ctx, stride, B, pad, repeats):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(C, H, W, generator=g)
    py, px = positions(H, W, patch, stride, B)
    upd = torch.randn(B, C, patch, patch, generator=g)
    wy, wx, win = py - ctx, px - ctx, patch + 2 * ctx
    args = (base, wy, wx, win, win, upd, py, px, pad)
    want = reference.gather_vectorised(*args)
    out = torch.empty_like(want)
    fns = {
        "torch loop": lambda: reference.gather_looped(*args),
        "torch vec": lambda: reference.gather_vectorised(*args),
        "numba": lambda: gather_cpu.gather(*args),
        "numba out=": lambda: gather_cpu.gather(*args, out=out),
    }
    for f in fns.values():
        assert torch.equal(f(), want)
    times = {k: median_ms(f, repeats) for k, f in fns.items()}
    cells = B * C * win * win
    return name, f"{win}x{win}", cells, times, K.auto_backend(base, cells)


def paste_row(name, C, H, W, patch, stride, B, repeats):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(C, H, W, generator=g)
    py, px = positions(H, W, patch, stride, B)
    upd = torch.randn(B, C, patch, patch, generator=g)
    want = reference.paste(base, upd, py, px)
    out = torch.empty_like(want)
    fns = {
        "torch loop": lambda: reference.gather_looped(base, py * 0, px * 0, H, W, upd, py, px),
        "torch vec": lambda: reference.gather_vectorised(base, py * 0, px * 0, H, W, upd, py, px),
        "numba": lambda: gather_cpu.paste(base, upd, py, px),
        "numba out=": lambda: gather_cpu.paste(base, upd, py, px, out=out),
    }
    for f in fns.values():
        assert torch.equal(f(), want)
    times = {k: median_ms(f, repeats) for k, f in fns.items()}
    cells = B * C * H * W
    return name, f"paste {patch}x{patch}", cells, times, K.auto_backend(base, cells)


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


def sweep(repeats):
    """Where Numba overtakes torch (NUMBA_MIN_CELLS) and its thread pool pays
    (gather_cpu.PARALLEL_MIN_CELLS), on windows of a 28x28 map."""
    print(f"{'B':>3s} {'C':>4s} {'win':>4s} {'cells':>8s} {'torch':>8s} {'1 thread':>8s} "
          f"{'all':>8s} {'torch/best numba':>17s}")
    for B, C, win in [(1, 1, 3), (1, 4, 3), (2, 8, 3), (4, 8, 4), (4, 16, 4), (4, 16, 8),
                      (8, 32, 4), (8, 32, 8), (8, 64, 8), (16, 64, 8), (16, 128, 8),
                      (64, 64, 6), (64, 128, 10)]:
        H = W = 28
        g = torch.Generator().manual_seed(0)
        base = torch.randn(C, H, W, generator=g)
        py, px = positions(H, W, win - 2, 1, B)
        upd = torch.randn(B, C, win - 2, win - 2, generator=g)
        args = (base, py - 1, px - 1, win, win, upd, py, px)
        t_torch = min(median_ms(lambda: reference.gather_looped(*args), repeats),
                      median_ms(lambda: reference.gather_vectorised(*args), repeats))
        t_one = median_ms(lambda: gather_cpu.gather(*args, parallel=False), repeats)
        t_all = median_ms(lambda: gather_cpu.gather(*args, parallel=True), repeats)
        cells = B * C * win * win
        print(f"{B:3d} {C:4d} {win:4d} {cells:8d} {t_torch:8.3f} {t_one:8.3f} "
              f"{t_all:8.3f} {t_torch / min(t_one, t_all):16.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="crossover sweep for auto rule")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and numba (default: theirs, all cores)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the calling thread, blind to other "
                             "processes taking the cores (needs --threads 1)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
        __import__("numba").set_num_threads(opts.threads)
    if opts.clock == "thread":
        if opts.threads != 1:
            parser.error("--clock thread measures one thread: add --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba threads {__import__('numba').get_num_threads()}, "
          f"NUMBA_MIN_CELLS={K.NUMBA_MIN_CELLS}, PARALLEL_MIN_CELLS={gather_cpu.PARALLEL_MIN_CELLS}; "
          f"{opts.clock} time in ms, median of {opts.repeats}\n")
    for parallel in (False, True):  # compile (or load from cache) before timing
        gather_cpu.gather(torch.zeros(1, 1, 1), np.zeros(1, np.int64), np.zeros(1, np.int64), 1, 1,
                          parallel=parallel)
    if opts.sweep:
        sweep(opts.repeats)
        return
    rows = [gather_row(*layer, opts.repeats) for layer in LAYERS]
    rows += [paste_row(*p, opts.repeats) for p in PASTES]
    print_table(rows)


if __name__ == "__main__":
    main()
