"""Small CNNs really trained on real data, for tests and quality benchmarks.

Approximate occlusion heatmaps must be judged on trained networks: a random
network's heatmap is noise, so "close to exact" would mean nothing. The one
network here is trained on Fashion-MNIST (:mod:`kql.datasets`, from the Debian
package ``dataset-fashion-mnist``) on the CPU, deterministically, in about 15
CPU-seconds, and reaches about 87% test accuracy.

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
           "fmnist_se_cnn", "fmnist_input", "train_fmnist", "evaluate_fmnist", "trained_fmnist_net"]

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
    if architecture not in ARCHITECTURES:
        raise PlanError(f"unknown Fashion-MNIST architecture {architecture!r}: {', '.join(ARCHITECTURES)}")
    if not (epochs > 0 and batch_size >= 1 and threads >= 1):
        raise PlanError(f"train_fmnist needs epochs > 0, batch_size >= 1 and threads >= 1, got "
                        f"epochs={epochs}, batch_size={batch_size}, threads={threads}")
    images, labels = load_fashion_mnist("train", root)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels).long()
    n = len(x_all)
    steps = max(1, int(epochs * n) // batch_size)
    with torch.random.fork_rng(devices=[]), _threads(threads):
        torch.manual_seed(seed)
        net = ARCHITECTURES[architecture][0]()
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
                loss = F.cross_entropy(net(fmnist_input(x_all[idx])), y_all[idx])
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
    if architecture not in ARCHITECTURES:
        raise PlanError(f"unknown Fashion-MNIST architecture {architecture!r}: {', '.join(ARCHITECTURES)}")
    make, recipe = ARCHITECTURES[architecture]
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fmnist_{recipe}.pt"
    with _file_lock(folder / f"fmnist_{recipe}.lock"):
        net = _load_cached(path, make)
        if net is None:
            net = train_fmnist(threads=threads, root=root, architecture=architecture)
            buf = io.BytesIO()
            torch.save(net.state_dict(), buf)
            files.write_atomic(path, buf.getvalue())
    return net


def _load_cached(path: Path, make=fmnist_cnn) -> Optional[nn.Sequential]:
    if not path.is_file():
        return None
    net = make()
    try:
        net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception:   # truncated or from an older recipe: train again
        return None
    return net.eval()


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
