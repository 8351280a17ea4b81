"""Small CNNs really trained on real data, for tests and quality benchmarks.

Approximate occlusion heatmaps must be judged on trained networks: a random
network's heatmap is noise, so "close to exact" would mean nothing. Both
networks here are trained on Fashion-MNIST (:mod:`kql.datasets`, from the
Debian package ``dataset-fashion-mnist``) on the CPU, deterministically:

- a 2-D CNN on the 28x28 images, in about 15 CPU-seconds, about 87% test
  accuracy (:func:`trained_fmnist_net`);
- a 3-D CNN on 16x16x16 volumes made from them (:func:`fmnist_volumes`: the
  image, shrunk to 16x16, fills a slab of slices whose depth and thickness
  vary from volume to volume, so the network must find it along every axis),
  in about 20 CPU-seconds, about 80% (:func:`trained_fmnist3d_net`).

Training takes seconds, so the example is skipped in doctests (tests/test_fmnist.py runs it):

>>> import kql
>>> from kql import datasets, zoo
>>> net = zoo.trained_fmnist_net("/tmp/kql-zoo")     # trains once, then loads  # doctest: +SKIP
>>> con = kql.connect(progress="off")
>>> con.register_model("fmnist", net, **zoo.FMNIST_SPEC)                          # doctest: +SKIP
>>> images, labels = datasets.load_fashion_mnist("test")
>>> r = con.execute("SELECT HEATMAP FROM img USING fmnist PATCH 4 STRIDE 2",
...                 img=images[0])                                               # doctest: +SKIP
>>> r.label_name, r.heatmap.shape                                                # doctest: +SKIP
('Ankle boot', (13, 13))
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kql import files
from kql.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from kql.errors import PlanError

__all__ = ["FMNIST_MEAN", "FMNIST_STD", "FMNIST_SPEC", "FMNIST_RECIPE", "FMNIST_SE_RECIPE", "fmnist_cnn",
           "fmnist_se_cnn", "fmnist_input", "train_fmnist", "evaluate_fmnist", "trained_fmnist_net",
           "FMNIST3D_RECIPE", "FMNIST3D_SIZE", "fmnist3d_cnn", "fmnist_volumes", "train_fmnist3d",
           "evaluate_fmnist3d", "trained_fmnist3d_net"]

# Pixel mean and standard deviation of the 60,000 training images, pixels in [0, 1].
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

# The keyword arguments of Connection.register_model for a Fashion-MNIST network:
# images are resized to 28x28 and converted to one luminance channel, as in training.
FMNIST_SPEC = {"input_size": (28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD,
               "labels": FASHION_MNIST_CLASSES, "channels": 1}

# Names the cached weights: change it whenever fmnist_cnn() or the training defaults change.
FMNIST_RECIPE = "cnn8-16-32_e1_b64_s0_v1"
# The same for fmnist_se_cnn().
FMNIST_SE_RECIPE = "se8-16-32_e1_b64_s0_v1"


def fmnist_cnn() -> nn.Sequential:
    """The untrained Fashion-MNIST network: 1x28x28 in, 10 logits out.

    Three 3x3 convolutions (8, 16, 32 channels, padding 1) with ReLU, a 2x2 max
    pool after the first two, then flatten and one linear layer. Five local
    layers (conv, pool, conv, pool, conv) let a patch's projective field grow to
    most of the 7x7 last feature map, the regime approximate heatmaps must handle.
    21,578 parameters.

    >>> fmnist_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 28 -> 14
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 14 -> 7
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, len(FASHION_MNIST_CLASSES)),
    )


def fmnist_se_cnn() -> nn.Sequential:
    """:func:`fmnist_cnn` with a squeeze-and-excitation gate after each conv
    (torchvision's ``SqueezeExcitation``, squeeze to a quarter of the
    channels): the network gate approximation (``GATES LOCAL`` / ``FROZEN``)
    is measured on.

    >>> fmnist_se_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    from torchvision.ops import SqueezeExcitation
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), SqueezeExcitation(8, 2), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), SqueezeExcitation(16, 4), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), SqueezeExcitation(32, 8),
        nn.Flatten(), nn.Linear(32 * 7 * 7, len(FASHION_MNIST_CLASSES)),
    )


#: architecture name -> (the untrained network, the name of its cached weights)
ARCHITECTURES = {"cnn": (fmnist_cnn, FMNIST_RECIPE), "se": (fmnist_se_cnn, FMNIST_SE_RECIPE)}


def _architecture(name: str):
    """``(build, recipe)`` of a name in :data:`ARCHITECTURES`, checked once
    for every function that takes ``architecture``."""
    if name not in ARCHITECTURES:
        raise PlanError(f"unknown Fashion-MNIST architecture {name!r}: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def fmnist_input(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 images ``(N, 28, 28)`` as the network's float32 input ``(N, 1, 28, 28)``.

    The same numbers KQL feeds a model registered with :data:`FMNIST_SPEC`
    (pixels / 255, then ``(x - mean) / std``), up to float rounding.

    >>> fmnist_input(np.full((1, 28, 28), 255, np.uint8)).shape
    torch.Size([1, 1, 28, 28])
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise PlanError(f"fmnist_input takes uint8 images (N, 28, 28), got {x.dtype} "
                        f"{tuple(x.shape)}")
    return x.unsqueeze(1).float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_fmnist(*, epochs: float = 1.0, batch_size: int = 64, seed: int = 0, threads: int = 1,
                 max_lr: float = 3e-3, root: Union[str, os.PathLike, None] = None,
                 architecture: str = "cnn") -> nn.Sequential:
    """Train :func:`fmnist_cnn` (or another of :data:`ARCHITECTURES`) on the
    Fashion-MNIST training set, on the CPU.

    Adam with a one-cycle learning-rate schedule, no augmentation. Deterministic
    for a given ``seed`` and ``threads`` on one machine and torch version: the
    initial weights and the batch order come from ``seed``. The global RNG and
    the caller's thread count are left as they were. With the defaults it takes
    about 15 CPU-seconds and reaches about 87% test accuracy.

    Args:
        epochs: passes over the 60,000 training images (fractions allowed).
        batch_size: images per optimizer step.
        seed: seeds the initial weights and the batch order.
        threads: torch intra-op threads while training. One thread is the
            default: the result does not depend on the machine's core count,
            and a test worker under ``pytest -n 2`` does not oversubscribe.
        max_lr: the peak learning rate of the one-cycle schedule.
        root: the data folder (see :func:`kql.datasets.load_fashion_mnist`).
        architecture: ``cnn`` (:func:`fmnist_cnn`) or ``se`` (:func:`fmnist_se_cnn`).

    Returns:
        The trained network, in eval mode.

    Raises:
        PlanError: the data set is not installed (the message names the apt
            package), or an argument is out of range.
    """
    build, _ = _architecture(architecture)
    images, labels = load_fashion_mnist("train", root)
    x_all = torch.from_numpy(images)
    return _train("train_fmnist", build, lambda idx: fmnist_input(x_all[idx]), labels,
                  epochs=epochs, batch_size=batch_size, seed=seed, threads=threads, max_lr=max_lr)


def _train(what: str, build, inputs, labels: np.ndarray, *, epochs: float, batch_size: int, seed: int,
           threads: int, max_lr: float) -> nn.Module:
    """Train ``build()`` on ``inputs(index tensor) -> batch`` and ``labels``:
    Adam, one-cycle schedule, the batch order and initial weights from ``seed``
    (see :func:`train_fmnist`)."""
    if not (epochs > 0 and batch_size >= 1 and threads >= 1):
        raise PlanError(f"{what} needs epochs > 0, batch_size >= 1 and threads >= 1, got "
                        f"epochs={epochs}, batch_size={batch_size}, threads={threads}")
    y_all = torch.from_numpy(labels).long()
    n = len(y_all)
    steps = max(1, int(epochs * n) // batch_size)
    with torch.random.fork_rng(devices=[]), _threads(threads):
        torch.manual_seed(seed)
        net = build()
        order = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=max_lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
        net.train()
        step = 0
        while step < steps:
            perm = torch.randperm(n, generator=order)
            for start in range(0, n - batch_size + 1, batch_size):   # drop the ragged last batch
                if step == steps:
                    break
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(net(inputs(idx)), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                step += 1
    return net.eval()


def evaluate_fmnist(net: nn.Module, count: Optional[int] = None,
                    root: Union[str, os.PathLike, None] = None) -> float:
    """Top-1 accuracy of ``net`` on the first ``count`` test images (all 10,000 by default)."""
    images, labels = load_fashion_mnist("test", root)
    if count is not None:
        images, labels = images[:count], labels[:count]
    was_training = net.training
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            logits = net(fmnist_input(images[start:start + 1000]))
            correct += int((logits.argmax(1).numpy() == labels[start:start + 1000]).sum())
    net.train(was_training)
    return correct / len(images)


def trained_fmnist_net(cache_dir: Union[str, os.PathLike], *, threads: int = 1,
                       root: Union[str, os.PathLike, None] = None, architecture: str = "cnn") -> nn.Sequential:
    """The trained Fashion-MNIST network, trained at most once per cache folder.

    The first call trains with :func:`train_fmnist`'s defaults and saves the
    state dict as ``<cache_dir>/fmnist_<recipe>.pt`` (the architecture's
    recipe name in :data:`ARCHITECTURES`, written to a
    temporary file, then renamed into place, so a reader never sees half a
    file); later calls load it with ``torch.load(..., weights_only=True)``.
    Concurrent callers, in threads or processes (``pytest -n 2``), serialise on
    an exclusive ``flock`` of a lock file beside it, so only one trains and the
    others wait, then load. An unreadable cached file is trained again.

    Args:
        cache_dir: the folder for the weights; created if missing.
        threads: torch threads if it has to train (see :func:`train_fmnist`).
        root: the data folder (see :func:`kql.datasets.load_fashion_mnist`).
        architecture: which network (see :func:`train_fmnist`).

    Returns:
        A new network in eval mode on every call (callers may change it freely).
    """
    make, recipe = _architecture(architecture)
    return _cached(Path(cache_dir) / f"fmnist_{recipe}", make,
                   lambda: train_fmnist(threads=threads, root=root, architecture=architecture))


def _cached(stem: Path, build, train) -> nn.Module:
    """``<stem>.pt`` loaded into ``build()``, or ``train()`` saved there first
    (under ``<stem>.lock``; see :func:`trained_fmnist_net`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_name(stem.name + ".pt")
    with _file_lock(stem.with_name(stem.name + ".lock")):
        net = _load_cached(path, build)
        if net is None:
            net = train()
            buf = io.BytesIO()
            torch.save(net.state_dict(), buf)
            files.write_atomic(path, buf.getvalue())
    return net


def _load_cached(path: Path, build) -> Optional[nn.Module]:
    if not path.is_file():
        return None
    net = build()
    try:
        net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception:   # truncated or from an older recipe: train again
        return None
    return net.eval()


# -- the 3-D network ------------------------------------------------------------------------

#: The side of :func:`fmnist_volumes`' cubes.
FMNIST3D_SIZE = 16

# Names the cached weights: change it whenever fmnist3d_cnn(), fmnist_volumes() or the
# training defaults change.
FMNIST3D_RECIPE = "cnn3d4-8-16_v16_e0.25_b32_s0_v1"


def fmnist3d_cnn() -> nn.Sequential:
    """The untrained 3-D network: ``1x16x16x16`` in, 10 logits out.

    :func:`fmnist_cnn` in three dimensions, narrower: three 3x3x3
    convolutions (4, 8, 16 channels, padding 1) with ReLU, a 2x2x2 max pool
    after the first two, flatten, one linear layer. 6,722 parameters.

    >>> fmnist3d_cnn()(torch.zeros(2, 1, 16, 16, 16)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),      # 16 -> 8
        nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),      # 8 -> 4
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4 * 4, len(FASHION_MNIST_CLASSES)),
    )


def fmnist_volumes(images: Union[np.ndarray, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """uint8 images ``(N, 28, 28)`` as the 3-D network's input ``(N, 1, 16, 16, 16)``.

    Each image is shrunk to 16x16 (area averaging) and fills the slices ``z0
    .. z0 + t - 1`` of an otherwise empty volume, with thickness ``t`` in 3..8
    and depth ``z0`` drawn for each volume from ``seed`` (image ``i`` of the
    same array and seed always gives the same volume); then normalised as
    :func:`fmnist_input` normalises images.

    >>> v = fmnist_volumes(np.full((2, 28, 28), 255, np.uint8))
    >>> v.shape, int((v[0, 0].amax(dim=(1, 2)) > 0).sum()) in range(3, 9)
    (torch.Size([2, 1, 16, 16, 16]), True)
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise PlanError(f"fmnist_volumes takes uint8 images (N, 28, 28), got {x.dtype} {tuple(x.shape)}")
    n, S = len(x), FMNIST3D_SIZE
    small = F.adaptive_avg_pool2d(x.unsqueeze(1).float().div_(255), S)        # (N, 1, 16, 16)
    g = np.random.default_rng(seed)
    thick = g.integers(3, 9, n)
    start = (g.random(n) * (S - thick + 1)).astype(np.int64)
    z = torch.arange(S)
    inside = (z[None] >= torch.from_numpy(start)[:, None]) & (z[None] < torch.from_numpy(start + thick)[:, None])
    volume = small.unsqueeze(2) * inside.view(n, 1, S, 1, 1)
    return volume.sub_(FMNIST_MEAN).div_(FMNIST_STD)


def train_fmnist3d(*, epochs: float = 0.25, batch_size: int = 32, seed: int = 0, threads: int = 1,
                   max_lr: float = 5e-3, root: Union[str, os.PathLike, None] = None) -> nn.Sequential:
    """Train :func:`fmnist3d_cnn` on volumes of the Fashion-MNIST training set
    (:func:`fmnist_volumes` with ``seed``), as :func:`train_fmnist` trains
    the 2-D network. With the defaults (a quarter of an epoch) about 20
    CPU-seconds, about 80% test accuracy."""
    images, labels = load_fashion_mnist("train", root)
    volumes = fmnist_volumes(images, seed)
    return _train("train_fmnist3d", fmnist3d_cnn, lambda idx: volumes[idx], labels, epochs=epochs,
                  batch_size=batch_size, seed=seed, threads=threads, max_lr=max_lr)


def evaluate_fmnist3d(net: nn.Module, count: Optional[int] = None, seed: int = 1,
                      root: Union[str, os.PathLike, None] = None) -> float:
    """Top-1 accuracy of ``net`` on volumes of the first ``count`` test images
    (:func:`fmnist_volumes` with ``seed``)."""
    images, labels = load_fashion_mnist("test", root)
    if count is not None:
        images, labels = images[:count], labels[:count]
    volumes = fmnist_volumes(images, seed)
    with torch.inference_mode():
        pred = torch.cat([net.eval()(volumes[i:i + 500]).argmax(1) for i in range(0, len(volumes), 500)])
    return float((pred.numpy() == labels).mean())


def trained_fmnist3d_net(cache_dir: Union[str, os.PathLike], *, threads: int = 1,
                         root: Union[str, os.PathLike, None] = None) -> nn.Sequential:
    """The trained 3-D network, trained at most once per cache folder (as
    :func:`trained_fmnist_net`: ``<cache_dir>/fmnist3d_<FMNIST3D_RECIPE>.pt``)."""
    return _cached(Path(cache_dir) / f"fmnist3d_{FMNIST3D_RECIPE}", fmnist3d_cnn,
                   lambda: train_fmnist3d(threads=threads, root=root))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (POSIX ``flock``; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: at worst two processes both train
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
