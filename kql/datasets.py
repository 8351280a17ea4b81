"""Data for tests, benchmarks and examples: real image data sets that install
offline (Fashion-MNIST), and the synthetic sample volume `phantom`.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; 70,000 28x28 grayscale photos of
clothes in 10 classes) comes from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``), which puts the original four gzipped
IDX files in ``/usr/share/datasets/fashion-mnist``. Nothing here downloads.

>>> images, labels = load_fashion_mnist("test")
>>> images.shape, images.dtype, FASHION_MNIST_CLASSES[labels[0]]
((10000, 28, 28), dtype('uint8'), 'Ankle boot')
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from kql.errors import PlanError

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_PACKAGE", "FASHION_MNIST_CLASSES", "load_fashion_mnist",
           "fashion_mnist_available", "phantom", "phantom_affine", "PHANTOM_SHAPE", "PHANTOM_SPACING"]

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Label i is FASHION_MNIST_CLASSES[i] (the data set's README, "Labels").
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}

# IDX magic numbers: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


def fashion_mnist_available(root: Union[str, os.PathLike, None] = None) -> bool:
    """Whether all four Fashion-MNIST files are in ``root`` (default the Debian package's folder)."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    return all((folder / name).is_file() for *names, _ in _FILES.values() for name in names)


def load_fashion_mnist(split: str = "train",
                       root: Union[str, os.PathLike, None] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's training or test set as numpy arrays.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: the folder holding the gzipped IDX files; default
            ``/usr/share/datasets/fashion-mnist``, where the Debian package
            ``dataset-fashion-mnist`` puts them.

    Returns:
        ``(images, labels)``: ``images`` uint8 ``(N, 28, 28)``, 0 = black
        background, 255 = white; ``labels`` uint8 ``(N,)`` in 0-9, the index of
        the class name in :data:`FASHION_MNIST_CLASSES`. Both are new arrays.

    Raises:
        PlanError: ``split`` is unknown, a file is missing (the message names
            the apt package to install) or is not the IDX file it should be.
    """
    if split not in _FILES:
        raise PlanError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    images_name, labels_name, count = _FILES[split]
    images = _read_idx(folder / images_name, _IMAGES_MAGIC, root is None)
    labels = _read_idx(folder / labels_name, _LABELS_MAGIC, root is None)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise PlanError(f"Fashion-MNIST {split} set in '{folder}' has images {images.shape} and labels "
                        f"{labels.shape}; expected ({count}, 28, 28) and ({count},)")
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise PlanError(f"'{folder / labels_name}' has label {int(labels.max())}; Fashion-MNIST's "
                        f"labels are 0-{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


def _read_idx(path: Path, magic: int, default_root: bool) -> np.ndarray:
    """One gzipped IDX file (big-endian header: magic, then one uint32 per dimension; then the bytes)."""
    if not path.is_file():
        where = (f"install the Debian package: apt-get install {FASHION_MNIST_PACKAGE}" if default_root
                 else f"the folder must hold the gzipped IDX files of the package {FASHION_MNIST_PACKAGE}")
        raise PlanError(f"Fashion-MNIST file not found: '{path}'; {where}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PlanError(f"cannot read '{path}': not a complete gzip file ({e})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise PlanError(f"'{path}' is not an IDX file of {ndim}-D unsigned bytes: header {found}, "
                        f"expected {magic:08x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise PlanError(f"'{path}' holds {len(data) - header} bytes of data; its header "
                        f"{'x'.join(map(str, shape))} needs {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


# ---------------------------------------------------------------- the sample volume

PHANTOM_SHAPE = (64, 64, 64)
PHANTOM_SPACING = (1.5, 1.5, 1.5)


def phantom(shape: Sequence[int] = PHANTOM_SHAPE, seed: int = 0) -> np.ndarray:
    """A synthetic CT-like volume (not a scan of anything): the bundled
    sample volume ``phantom`` (``FROM phantom``).

    Air (-1000 HU) around a body (an ellipsoid of soft tissue, 40 HU) that
    holds two lungs (-800 HU), a spine (bone, 700 HU) and a small bright
    lesion (120 HU) in one lung, plus Gaussian noise (15 HU). The same
    ``shape`` and ``seed`` always give the same array; shapes need not be
    cubes (axes are (D, H, W)).

    Args:
        shape: ``(D, H, W)``, each at least 8.
        seed: the noise's seed.

    Returns:
        float32 ``(D, H, W)`` in Hounsfield units.

    >>> v = phantom((16, 24, 24))
    >>> v.shape, v.dtype, bool((phantom((16, 24, 24)) == v).all())
    ((16, 24, 24), dtype('float32'), True)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise PlanError(f"phantom shape must be (D, H, W) with every size at least 8, got {shape}")
    # normalised coordinates in [-1, 1] per axis (voxel centres)
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) / n * 2 - 1 for n in shape], indexing="ij")

    def ellipsoid(cz, cy, cx, rz, ry, rx):
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

    vol = np.full(shape, -1000.0)
    vol[ellipsoid(0, 0, 0, 0.9, 0.7, 0.85)] = 40.0                 # body, soft tissue
    vol[ellipsoid(0.05, -0.05, -0.38, 0.6, 0.4, 0.28)] = -800.0    # right lung
    vol[ellipsoid(0.05, -0.05, 0.38, 0.6, 0.4, 0.28)] = -800.0     # left lung
    vol[ellipsoid(0, 0.45, 0, 0.85, 0.14, 0.14)] = 700.0           # spine
    vol[ellipsoid(0.2, -0.15, 0.4, 0.14, 0.12, 0.12)] = 120.0      # lesion in the left lung
    noise = np.random.default_rng(seed).normal(0.0, 15.0, shape)
    return (vol + noise).astype(np.float32)


def phantom_affine(spacing: Sequence[float] = PHANTOM_SPACING) -> np.ndarray:
    """The phantom's voxel-to-world matrix: ``spacing`` mm per axis, origin 0."""
    return np.diag([*map(float, spacing), 1.0])
