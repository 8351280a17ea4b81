"""Would lower precision be an approximate strategy? efficientnet_lite0's occlusion map in bfloat16.

This machine's CPU has AMX (bfloat16 tiles): oneDNN's bfloat16 convolutions in
channels-last layout run several times faster than float32 ones. An
approximate plan could compute positions in bfloat16 if the heatmap kept its
quality. This probe answers that question on a tuning photo (scikit-image's;
never an evaluation photo): the naive occlusion map (patch 16 filled with 0 in
model space, stride ``--stride``) of the predicted class,
computed in float32 (NCHW), float32 channels-last and bfloat16 channels-last
(``torch.autocast``), each map's time, and the SSIM of the bfloat16 map
against the float32 one (``kql.planner.refine.heatmap_ssim``, the contract's
measure), plus a single-convolution timing of each layout and precision.

    .venv/bin/python benchmarks/precision_probe.py --photo coffee --stride 8

Measured (2026-12-03, the machine loaded by other jobs, load 10-12: times are
indicative, the SSIMs are not), stride 8 (27x27 positions):

  photo    map range  bfloat16 max |d|  SSIM   float32 / f32 channels-last / bf16 channels-last
  coffee   0.026      0.0138            0.767  383 s / 73 s / 41 s
  chelsea  0.0098     0.0016            0.980  208 s / 97 s / 88 s
  rocket   0.0096     0.0015            0.981  176 s / 121 s / 92 s

float32 channels-last equals float32 to 2e-7. bfloat16's rounding of the
logits is as large as the occlusion's effect on some photos (coffee: SSIM
0.77), and the whole network in bfloat16 gained only 1.1-1.3x over float32
channels-last (autocast's conversions, depthwise convolutions that AMX does
not speed up much): not a strategy an SSIM 0.9 contract can rely on.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def occlusion_map(net, x, cls, patch, stride, mode, batch=64):
    n = (x.shape[-1] - patch) // stride + 1
    cells = [(i, j) for i in range(n) for j in range(n)]
    out = np.zeros((n, n))
    t0 = time.perf_counter()
    for b in range(0, len(cells), batch):
        part = cells[b:b + batch]
        xb = x.repeat(len(part), 1, 1, 1)
        for k, (i, j) in enumerate(part):
            xb[k, :, i * stride:i * stride + patch, j * stride:j * stride + patch] = 0.0
        if mode != "fp32":
            xb = xb.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            p = net(xb).float().softmax(1)[:, cls].numpy()
        for k, (i, j) in enumerate(part):
            out[i, j] = p[k]
    return out, time.perf_counter() - t0


def conv_times(reps=5):
    """One 1x1 and one depthwise 5x5 convolution of lite0's sizes, best of ``reps``."""
    def best(f):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)
    rows = []
    for c, o, h, k, g in [(40, 240, 28, 1, 1), (240, 240, 28, 5, 240), (672, 112, 14, 1, 1)]:
        x, w = torch.randn(64, c, h, h), torch.randn(o, c // g, k, k)
        xl = x.to(memory_format=torch.channels_last)
        xb, wb = xl.bfloat16(), w.bfloat16()
        with torch.no_grad():
            t = [best(lambda a=a, b=b: F.conv2d(a, b, padding=k // 2, groups=g))
                 for a, b in ((x, w), (xl, w), (xb, wb))]
        rows.append(f"conv {c}->{o} {k}x{k} groups {g} at {h}x{h}, batch 64: float32 {1e3 * t[0]:.1f} ms, "
                    f"float32 channels-last {1e3 * t[1]:.1f} ms, bfloat16 channels-last {1e3 * t[2]:.1f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photo", default="coffee", help="a scikit-image sample photo (a tuning photo)")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--patch", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import skimage.data

    from kql.planner.refine import heatmap_ssim
    from kql.sources import load_model
    from kql.sources.preprocess import preprocess

    for row in conv_times():
        print(row, flush=True)
    spec = load_model("efficientnet_lite0")
    net = spec.module.eval()
    x, _ = preprocess(getattr(skimage.data, args.photo)(), spec)
    x = x[None] if x.dim() == 3 else x
    with torch.no_grad():
        cls = int(net(x).argmax())
    ref, t32 = occlusion_map(net, x, cls, args.patch, args.stride, "fp32")
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    cl, tcl = occlusion_map(net_cl, x, cls, args.patch, args.stride, "cl")
    bf, tbf = occlusion_map(net_cl, x, cls, args.patch, args.stride, "bf16")
    print(f"{args.photo}, patch {args.patch}, stride {args.stride} ({ref.shape[0]}x{ref.shape[1]}): "
          f"float32 {t32:.1f} s, float32 channels-last {tcl:.1f} s, bfloat16 channels-last {tbf:.1f} s; "
          f"map range {np.ptp(ref):.4f}; channels-last max |d| {np.abs(cl - ref).max():.2e}; "
          f"bfloat16 max |d| {np.abs(bf - ref).max():.4f}, SSIM {heatmap_ssim(ref, bf):.3f}")


if __name__ == "__main__":
    main()
