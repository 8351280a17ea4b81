"""The answer to a SELECT HEATMAP query: :class:`HeatmapResult`.

The heatmap lives on the *position grid*: ``heatmap[i, j]`` is the probability
of the label when the patch's top-left corner is at ``(ys[i], xs[j])`` in the
model-input image; on a volume ``heatmap[k, i, j]`` has the patch's first
corner at ``(zs[k], ys[i], xs[j])``. :meth:`HeatmapResult.pixel_map` spreads
it back onto pixels (voxels).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kql import files
from kql.ast import Region
from kql.errors import ExecutionError, PlanError
from kql.planner.plan import format_seconds

__all__ = ["HeatmapResult", "check_output_path", "write_atomic"]

_FORMATS = (".png", ".npy", ".nii", ".nii.gz")
MAX_PANELS = 12  # labels a PNG shows (the first ones); the .npy holds them all
MAX_VOLUME_ROWS = 4  # labels a volume's PNG shows (a row of three slices each)


def output_format(path: str | os.PathLike) -> str:
    """The lower-cased extension of an output file, ``.nii.gz`` counted whole.

    >>> output_format("heat.NII.GZ"), output_format("a.png"), output_format("b")
    ('.nii.gz', '.png', '')
    """
    shown = os.fspath(path)
    if shown.lower().endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(shown)[1].lower()


def check_output_path(path: str | os.PathLike, volume: Optional[bool] = None) -> str:
    """Check that ``INTO '<path>'`` can be written, before any work is done.

    Args:
        path: the output file; its extension picks the format.
        volume: whether the heatmap is a volume's (NIfTI needs one); ``None``
            when not known yet.

    Returns:
        The lower-cased extension, ``".png"``, ``".npy"``, ``".nii"`` or ``".nii.gz"``.

    Raises:
        PlanError: "cannot write 'x.jpg': INTO takes a .png or .npy file",
            NIfTI for an image, the directory does not exist, or the path is a
            directory.

    >>> check_output_path("heatmap.NPY")
    '.npy'
    """
    shown = os.fspath(path)
    ext = output_format(shown)
    if ext not in _FORMATS:
        raise PlanError(f"cannot write '{shown}': INTO takes a .png or .npy file, or .nii / .nii.gz "
                        f"for a volume")
    if volume is False and ext in (".nii", ".nii.gz"):
        raise PlanError(f"cannot write '{shown}': NIfTI holds volumes; an image's heatmap goes to "
                        f".png or .npy")
    if os.path.isdir(shown):
        raise PlanError(f"cannot write '{shown}': it is a directory")
    parent = os.path.dirname(shown) or "."
    if not os.path.isdir(parent):
        raise PlanError(f"cannot write '{shown}': directory '{parent}' does not exist (create it first)")
    return ext


def write_atomic(path: str, data: bytes) -> None:
    """:func:`kql.files.write_atomic`, with a failure as a one-line error.

    Raises:
        ExecutionError: writing failed (disk full, permissions...).
    """
    try:
        files.write_atomic(path, data)
    except OSError as e:
        raise ExecutionError(f"cannot write '{path}': {e.strerror or e}") from e


@dataclass(repr=False)
class HeatmapResult:
    """An occlusion heatmap and everything needed to read it.

    Attributes:
        heatmap: float32 ``(rows, cols)``: the label's probability with the
            patch at each grid position (with several labels: the first's).
        label: the class index the heatmap is for.
        label_name: its display name, or ``None`` when the model has no names.
        p_original: the label's probability on the unoccluded image.
        ys, xs: int arrays, the top-left row of each grid row and the left
            column of each grid column, in model-input pixels. The last one may
            be closer than a stride to its neighbour: the grid always reaches
            the region's far edge.
        patch, stride: ``(h, w)`` in pixels; ``(d, h, w)`` on a volume.
        region: the occluded crop of the model input (``kql.ast.Region``), or
            ``None`` for the whole image.
        image: the display image, float ``HxWx3`` in ``[0, 1]`` (the model
            input before normalisation); on a volume a
            :class:`kql.sources.volumes.ScanView` (or a float ``(D, H, W)``
            array in ``[0, 1]``).
        model: the model's name.
        mode: how it was computed ("naive", "exact", ...).
        timings: stage name -> seconds; ``"total"``, when present, is the
            query's wall time.
        plan: the plan that ran (any object), or ``None``.
        plan_text: the EXPLAIN text, or ``""``.
        warnings: things the user should know (e.g. random weights).
        output_path: where :meth:`save` last wrote, or ``None``.
        peak_memory: bytes the occlusion stage added at its highest point
            (views, batches, activations), or ``None`` if not measured.
        tau: the projective-field threshold of an approximate heatmap, else
            ``None``.
        computed: with DRILLDOWN, a boolean ``(rows, cols)`` mask of the
            positions whose probability was computed (stage one's coarse
            grid and stage two's selection); the others hold stage one's
            interpolated estimate. ``None`` otherwise (everything computed).
        stage_positions: with DRILLDOWN, positions run by stage one and
            stage two.
        estimated_ssim: with adaptive refinement (``APPROX SSIM``), the SSIM
            against exact the run-time check estimated when it stopped
            (``computed`` is then the mask of positions it computed exactly).
        refine_stages: with adaptive refinement, per stage: ``{"stage",
            "positions", "computed", "estimated_ssim"}``.
        maps: float32 ``(labels, rows, cols)``, one grid per label of
            ``labels`` (``LABEL TOP k``, ``LABEL ALL``, a list; the tensor
            API's targets); ``heatmap``, ``label``, ``label_name`` and
            ``p_original`` are the first label's. Given one label, built from
            ``heatmap``.
        labels, label_names, originals: per map, the class index, its name
            (or None) and its score on the unoccluded input.
        score: what the maps hold: ``"probability"`` (the language), or the
            tensor API's ``"softmax"``, ``"sigmoid"``, ``"logits"``,
            ``"custom"``.
        zs: on a volume, the first depth (slice, frame) of each grid layer;
            ``None`` on an image. The heatmap is then ``(layers, rows, cols)``.
    """
    heatmap: np.ndarray
    label: int
    label_name: Optional[str]
    p_original: float
    ys: np.ndarray
    xs: np.ndarray
    patch: tuple[int, int]
    stride: tuple[int, int]
    region: Optional[Region]
    image: np.ndarray
    model: str
    mode: str
    timings: dict[str, float] = field(default_factory=dict)
    plan: Any = None
    plan_text: str = ""
    warnings: list[str] = field(default_factory=list)
    output_path: Optional[str] = None
    peak_memory: Optional[int] = None
    tau: Optional[float] = None
    computed: Optional[np.ndarray] = None
    stage_positions: Optional[tuple[int, int]] = None
    estimated_ssim: Optional[float] = None
    refine_stages: Optional[list] = None
    maps: Optional[np.ndarray] = None
    labels: Optional[list[int]] = None
    label_names: Optional[list[Optional[str]]] = None
    originals: Optional[np.ndarray] = None
    score: str = "probability"
    zs: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.maps is None:  # one label: its map is the heatmap
            self.maps = np.asarray(self.heatmap, dtype=np.float32)[None]
            self.labels, self.label_names = [self.label], [self.label_name]
            self.originals = np.array([self.p_original], dtype=np.float32)
        else:                  # several labels: the first one's map is the heatmap
            self.maps = np.asarray(self.maps, dtype=np.float32)
            self.labels = [int(v) for v in self.labels]
            self.label_names = list(self.label_names) if self.label_names is not None \
                else [None] * len(self.labels)
            self.originals = np.asarray(self.originals, dtype=np.float32).reshape(-1)
            if self.maps.ndim != self.ndim + 1 or not (len(self.maps) == len(self.labels) == len(self.label_names)
                                                       == len(self.originals)) or not len(self.labels):
                raise ValueError(f"HeatmapResult: maps {self.maps.shape} must be (labels, *grid) with "
                                 f"one entry of labels, label_names and originals per map")
            self.heatmap, self.label = self.maps[0], self.labels[0]
            self.label_name, self.p_original = self.label_names[0], float(self.originals[0])
        self.heatmap = np.asarray(self.heatmap, dtype=np.float32)
        self.ys = np.asarray(self.ys, dtype=np.int64).reshape(-1)
        self.xs = np.asarray(self.xs, dtype=np.int64).reshape(-1)
        self.label = int(self.label)
        self.p_original = float(self.p_original)
        if self.zs is not None:
            self.zs = np.asarray(self.zs, dtype=np.int64).reshape(-1)
        self.patch = tuple(int(v) for v in self.patch)
        self.stride = tuple(int(v) for v in self.stride)
        if len(self.patch) != self.ndim or len(self.stride) != self.ndim:
            raise ValueError(f"HeatmapResult: patch {self.patch} and stride {self.stride} must have "
                             f"{self.ndim} axes")
        grid = tuple(len(s) for s in self.starts)
        if self.heatmap.shape != grid:
            raise ValueError(f"HeatmapResult: heatmap shape {self.heatmap.shape} does not match the "
                             f"grid {'x'.join(map(str, grid))} (len(zs) x len(ys) x len(xs), without zs on "
                             f"an image)")
        if self.ndim == 2 and np.asarray(self.image).ndim != 3:
            raise ValueError(f"HeatmapResult: image must be HxWx3, got shape {np.shape(self.image)}")
        if self.ndim == 3 and len(self.voxel_shape) != 3:
            raise ValueError(f"HeatmapResult: a volume's image must be a ScanView or (D, H, W), got shape "
                             f"{np.shape(self.image)}")

    # -- axes -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Spatial axes: 2 for an image, 3 for a volume."""
        return 2 if self.zs is None else 3

    @property
    def starts(self) -> tuple[np.ndarray, ...]:
        """The grid's first corner per axis: ``(ys, xs)``, or ``(zs, ys, xs)``."""
        return (self.ys, self.xs) if self.zs is None else (self.zs, self.ys, self.xs)

    @property
    def voxel_shape(self) -> tuple[int, ...]:
        """The model input's spatial shape: ``(H, W)`` or ``(D, H, W)``."""
        if self.ndim == 2:
            return tuple(np.asarray(self.image).shape[:2])
        image = getattr(self.image, "image", self.image)
        return tuple(np.shape(image))

    @property
    def scan(self) -> np.ndarray:
        """A volume's display scan, float ``(D, H, W)`` in ``[0, 1]``."""
        return np.asarray(getattr(self.image, "image", self.image), dtype=np.float32)

    # -- several labels -------------------------------------------------------
    def map(self, label: int) -> np.ndarray:
        """The position grid of one of the result's labels (a class index).

        Raises:
            KeyError: the result has no map for ``label``.
        """
        return self.maps[self._index(label)]

    def select(self, label: int) -> "HeatmapResult":
        """This result restricted to one of its labels (a class index)."""
        import dataclasses
        i = self._index(label)
        one = dataclasses.replace(self, heatmap=self.maps[i], label=self.labels[i],
                                  label_name=self.label_names[i], p_original=float(self.originals[i]),
                                  maps=None, labels=None, label_names=None, originals=None,
                                  warnings=list(self.warnings))
        one._coverage_count = self._coverage_cache()   # same grid, patch and image: same count
        return one

    def _index(self, label: int) -> int:
        try:
            return self.labels.index(int(label))
        except ValueError:
            raise KeyError(f"no map for label {label}: this result has labels {self.labels}") from None

    def attribution(self, label: Optional[int] = None) -> np.ndarray:
        """Captum's per-pixel occlusion attribution for one label (default
        the first): the mean, over the patch positions covering each pixel,
        of how much occluding it lowers the score, ``original - occluded``.
        NaN where no patch covers a pixel (outside the region).

        ``captum.attr.Occlusion`` returns the same values (expanded over the
        channels) for the same windows: ``kql.occlusion(..., grid='clip')``.

        Returns:
            float32 ``(H, W)``.
        """
        one = self if label is None or len(self.labels) == 1 and int(label) == self.label \
            else self.select(label)
        drop = np.float64(one.p_original) - one.heatmap.astype(np.float64)
        return one._pixel_mean(drop).astype(np.float32)

    # -- derived views --------------------------------------------------------
    @property
    def drop(self) -> np.ndarray:
        """``p_original - heatmap``: how much occluding each position lowers the
        label's probability (high = important)."""
        return np.float32(self.p_original) - self.heatmap

    @property
    def label_text(self) -> str:
        """The label for people: its name, or ``class <index>``."""
        return self.label_name if self.label_name is not None else f"class {self.label}"

    def pixel_map(self) -> np.ndarray:
        """The heatmap on the image's pixels (a volume's voxels).

        Each pixel gets the mean heatmap value over all patch positions whose
        patch covers it, and NaN where no patch does (outside the region).
        Computed with N-D prefix sums: each position adds its value at its
        patch's first corner and adds or subtracts it past the other corners
        (inclusion-exclusion), so the cost is O(positions + pixels), not
        O(positions x patch volume).

        Returns:
            float32 array ``(H, W)`` of the display image's size, or
            ``(D, H, W)`` on a volume.

        >>> r = HeatmapResult(np.array([[1.0, 3.0]]), 0, None, 1.0, [0], [0, 1], (1, 2), (1, 1),
        ...                   None, np.zeros((1, 3, 3)), "m", "naive")
        >>> r.pixel_map().tolist()
        [[1.0, 2.0, 3.0]]
        """
        return self._pixel_mean(self.heatmap).astype(np.float32)

    def _pixel_mean(self, grid: np.ndarray) -> np.ndarray:
        """Per pixel, the float64 mean of ``grid`` (rows x cols) over the
        positions whose patch covers it; NaN where none does."""
        total = self._spread(np.asarray(grid, dtype=np.float64))
        count = self._coverage()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def _coverage(self) -> np.ndarray:
        """Per pixel, how many patches cover it (read-only float64).

        It depends on the grid, the patch and the input's shape, not on any
        map's values, so it is computed once for a result and the results
        :meth:`select` derives from it (LABEL ALL: a thousand maps, one
        count). The key it is kept with notices a changed grid, patch or image.
        """
        key = (self.voxel_shape, self.patch, tuple(s.tobytes() for s in self.starts))
        cache = self._coverage_cache()
        if cache.get("key") != key:
            # Prefix sums leave tiny residues (~1e-16) in uncovered pixels: round counts.
            count = np.rint(self._spread(np.ones(tuple(len(s) for s in self.starts))))
            count.flags.writeable = False
            cache.clear()
            cache.update(key=key, count=count)
        return cache["count"]

    def _coverage_cache(self) -> dict:
        """The dict :meth:`_coverage` keeps its count in: an attribute, not a
        field (no part of equality or repr), shared with :meth:`select`'s results."""
        if not hasattr(self, "_coverage_count"):
            self._coverage_count = {}
        return self._coverage_count

    def _spread(self, weights: np.ndarray) -> np.ndarray:
        """Per pixel, the float64 sum of ``weights`` (one per grid position)
        over the positions whose patch covers it, by N-D prefix sums."""
        shape = self.voxel_shape
        # Clip patches to the input; a patch wholly outside contributes nothing.
        first = [np.clip(s, 0, n) for s, n in zip(self.starts, shape)]
        past = [np.clip(s + p, 0, n) for s, p, n in zip(self.starts, self.patch, shape)]
        acc = np.zeros([n + 1 for n in shape], dtype=np.float64)
        for corner in itertools.product((0, 1), repeat=len(shape)):
            at = np.meshgrid(*[(past if c else first)[a] for a, c in enumerate(corner)], indexing="ij")
            np.add.at(acc, tuple(at), -weights if sum(corner) % 2 else weights)
        for axis in range(len(shape)):
            acc = acc.cumsum(axis=axis)
        return acc[tuple(slice(0, n) for n in shape)]

    # -- output ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the result: ``.png`` a figure, ``.npy`` the heatmap array;
        on a volume also ``.nii`` / ``.nii.gz`` (:meth:`voxel_volume`).

        The PNG shows the image with the pixel map overlaid (perceptual
        colormap ``inferno``, semi-transparent), the region outlined when it is
        not the whole image, a colorbar labelled ``P(<label>)`` with the
        unoccluded probability marked, and the title ``<model>: <label>
        (p=0.908)``. The ``.npy`` file holds ``heatmap`` (rows x cols, float32).

        The file appears atomically: it is written to a temporary file in the
        same directory and renamed over ``path``, so a failure never leaves a
        partial file (and never clobbers an existing one).

        Args:
            path: the output file.

        Returns:
            ``path`` as a string (also stored in ``output_path``).

        Raises:
            PlanError: the extension is not ``.png``/``.npy`` or the directory
                does not exist (see :func:`check_output_path`).
            ExecutionError: writing failed (disk full, permissions...).
        """
        shown = os.fspath(path)
        ext = check_output_path(shown, volume=self.ndim == 3)
        write_atomic(shown, self.to_bytes(ext))
        self.output_path = shown
        return shown

    def to_bytes(self, fmt: str) -> bytes:
        """The contents :meth:`save` writes for ``fmt`` ``".png"`` or ``".npy"``.

        >>> r = HeatmapResult(np.zeros((1, 1)), 0, None, 1.0, [0], [0], (1, 1), (1, 1),
        ...                   None, np.zeros((1, 1, 3)), "m", "naive")
        >>> np.load(__import__("io").BytesIO(r.to_bytes(".npy"))).dtype
        dtype('float32')
        """
        import io
        buf = io.BytesIO()
        if self.ndim == 3 and fmt in (".npy", ".nii", ".nii.gz"):
            return self._volume_bytes(fmt)
        if fmt == ".npy":
            np.save(buf, self.heatmap if len(self.labels) == 1 else self.maps)
        elif fmt == ".png":
            figure = self._figure() if self.ndim == 2 else self._volume_figure()
            figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        else:
            raise ValueError(f"to_bytes takes '.png' or '.npy' ('.nii', '.nii.gz' on a volume), got {fmt!r}")
        return buf.getvalue()

    # -- volumes ----------------------------------------------------------------
    def voxel_volume(self) -> tuple[np.ndarray, np.ndarray]:
        """A volume's heatmap in the input's own voxel grid, and its affine.

        The voxel map (:meth:`pixel_map`, NaN outside the region) of each
        label, resampled back to the grid the volume had before RESAMPLE
        (trilinear), with the source's 4x4 voxel-to-world matrix (identity
        for a volume without one, e.g. from ``.npy``): what ``INTO
        '....nii.gz'`` and ``INTO '....npy'`` write.

        Returns:
            ``(maps, affine)``: float32 ``(D, H, W)`` for one label,
            ``(D, H, W, labels)`` for several (NIfTI's 4th axis); float64 4x4.
        """
        if self.ndim != 3:
            raise ValueError("voxel_volume is for a volume's heatmap")
        from kql.sources.volumes import resample_to
        target = tuple(getattr(self.image, "original_shape", self.voxel_shape))
        maps = np.stack([self._pixel_mean(m) for m in self.maps]).astype(np.float32)
        maps = resample_to(maps, target)
        affine = getattr(self.image, "affine", None)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        out = maps[0] if len(maps) == 1 else np.moveaxis(maps, 0, -1)
        return np.ascontiguousarray(out, dtype=np.float32), affine

    def _volume_bytes(self, fmt: str) -> bytes:
        import io
        maps, affine = self.voxel_volume()
        if fmt == ".npy":
            buf = io.BytesIO()
            np.save(buf, maps)
            return buf.getvalue()
        import nibabel as nib
        image = nib.Nifti1Image(maps, affine)
        image.header.set_xyzt_units("mm")
        image.header["descrip"] = f"KQL occlusion {self.score} {self.label_text}"[:79].encode()
        data = image.to_bytes()
        if fmt == ".nii.gz":
            import gzip
            data = gzip.compress(data, compresslevel=6, mtime=0)
        return data

    def most_sensitive_voxel(self, label: Optional[int] = None) -> tuple[int, ...]:
        """The voxel (pixel) where occlusion lowers the score most: the
        minimum of the voxel map (the first one, in C order, on ties)."""
        one = self if label is None else self.select(label)
        return _argmin_voxel(one.pixel_map())

    def _volume_figure(self):
        """Three orthogonal slices through the most sensitive voxel, the map
        over the scan, a colour bar: one row per label (the first
        :data:`MAX_VOLUME_ROWS`)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure

        scan = np.clip(self.scan, 0.0, 1.0)
        spacing = getattr(self.image, "spacing", (1.0, 1.0, 1.0))   # a ScanView's, on the model's grid
        n = min(len(self.labels), MAX_VOLUME_ROWS)
        fig = Figure(figsize=(12.5, 4.2 * n), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(n, 3, squeeze=False)
        for row in range(n):
            one = self if len(self.labels) == 1 else self.select(self.labels[row])
            pixels = one.pixel_map()
            d, h, w = _argmin_voxel(pixels)
            lo, hi = float(np.nanmin(one.heatmap)), float(np.nanmax(one.heatmap))
            if hi - lo < 1e-6:
                lo, hi = lo - 0.5e-3, hi + 0.5e-3
            views = [("axial", f"depth {d}", scan[d], pixels[d], (spacing[1], spacing[2]), (w, h)),
                     ("coronal", f"row {h}", scan[:, h], pixels[:, h], (spacing[0], spacing[2]), (w, d)),
                     ("sagittal", f"column {w}", scan[:, :, w], pixels[:, :, w], (spacing[0], spacing[1]), (h, d))]
            overlay = None
            for ax, (name, where, base, heat, (sy, sx), (cx, cy)) in zip(axes[row], views):
                ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=sy / sx)
                overlay = ax.imshow(np.ma.masked_invalid(heat), cmap="inferno", alpha=0.55, vmin=lo, vmax=hi,
                                    interpolation="nearest", aspect=sy / sx)
                ax.axhline(cy, color="cyan", linewidth=0.8, alpha=0.7)
                ax.axvline(cx, color="cyan", linewidth=0.8, alpha=0.7)
                ax.set_title(f"{name} ({where})", fontsize=10)
                ax.set_axis_off()
            bar = fig.colorbar(ScalarMappable(norm=overlay.norm, cmap=overlay.cmap), ax=list(axes[row]),
                               fraction=0.03, pad=0.02)
            bar.set_label(f"P({one.label_text})" if self.score == "probability"
                          else f"{self.score}({one.label_text})")
            if lo <= one.p_original <= hi:
                bar.ax.axhline(one.p_original, color="cyan", linewidth=1.5)
            what = "p" if self.score == "probability" else self.score
            heading = (f"{self.model}: {one.label_text} ({what}={one.p_original:.3f}); "
                       f"most sensitive voxel (d, h, w) = ({d}, {h}, {w})")
            if n == 1:
                fig.suptitle(heading)
            else:
                axes[row][1].set_title(f"{heading}\n{axes[row][1].get_title()}", fontsize=10)
        if len(self.labels) > n:
            fig.suptitle(f"the first {n} of {len(self.labels)} labels")
        return fig

    def _figure(self):
        """The PNG figure (object-oriented matplotlib: no pyplot global state):
        one panel per label, up to :data:`MAX_PANELS` (the first ones)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        image = np.clip(np.asarray(self.image, dtype=np.float32), 0.0, 1.0)
        H, W = image.shape[:2]
        n = min(len(self.labels), MAX_PANELS)
        cols = min(n, 4)
        rows = -(-n // cols)
        scale = 6.0 / max(H, W) if n == 1 else 3.5 / max(H, W)
        pw_, ph_ = max(W * scale, 2.5) + 1.4, max(H * scale, 2.5) + (0 if n == 1 else 0.5)
        fig = Figure(figsize=(pw_ * cols, ph_ * rows), layout="constrained" if n > 1 else None)
        FigureCanvasAgg(fig)
        for i in range(n):
            one = self if n == 1 else self.select(self.labels[i])
            one._panel(fig, fig.add_subplot(rows, cols, i + 1), image)
        if len(self.labels) > n:
            fig.suptitle(f"the first {n} of {len(self.labels)} labels")
        return fig

    def _panel(self, fig, ax, image) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.patches import Rectangle
        H, W = image.shape[:2]
        pixels = self.pixel_map()
        lo, hi = float(np.min(self.heatmap)), float(np.max(self.heatmap))
        if hi - lo < 1e-6:  # a flat map still needs a visible colour range
            lo, hi = lo - 0.5e-3, hi + 0.5e-3
        ax.imshow(image, interpolation="nearest")
        overlay = ax.imshow(np.ma.masked_invalid(pixels), cmap="inferno", alpha=0.55,
                            vmin=lo, vmax=hi, interpolation="nearest")
        if self.region is not None and not _is_whole(self.region, H, W):
            r = self.region
            ax.add_patch(Rectangle((r.x0 - 0.5, r.y0 - 0.5), r.x1 - r.x0, r.y1 - r.y0, fill=False,
                                   edgecolor="cyan", linewidth=1.5, linestyle="--"))
        ax.set_axis_off()
        what = "p" if self.score == "probability" else self.score
        ax.set_title(f"{self.model}: {self.label_text} ({what}={self.p_original:.3f})")
        # An opaque twin of the overlay's mappable, so the colorbar shows true colours.
        bar = fig.colorbar(ScalarMappable(norm=overlay.norm, cmap=overlay.cmap), ax=ax,
                           fraction=0.046, pad=0.04)
        bar.set_label(f"P({self.label_text})" if self.score == "probability"
                      else f"{self.score}({self.label_text})")
        if lo <= self.p_original <= hi:
            bar.ax.axhline(self.p_original, color="cyan", linewidth=1.5)

    # -- notebooks ------------------------------------------------------------
    def _repr_png_(self) -> bytes:
        """Jupyter shows a result as its figure (overlay and colour bar)."""
        return self.to_bytes(".png")

    def _repr_html_(self) -> str:
        import base64
        import html
        png = base64.b64encode(self._repr_png_()).decode("ascii")
        return (f"<div><pre>{html.escape(str(self))}</pre>"
                f"<img src=\"data:image/png;base64,{png}\" alt=\"heatmap\"/></div>")

    # -- text -----------------------------------------------------------------
    def __str__(self) -> str:
        n = int(self.heatmap.size)
        what = f"'{self.label_name}' (label {self.label}, " if self.label_name is not None \
            else f"label {self.label} ("
        p = "p" if self.score == "probability" else self.score
        what += f"{p}={self.p_original:.3f})"
        if len(self.labels) > 1:
            what = f"{len(self.labels)} labels, the first {what}"
        mode = self.mode if self.tau is None else f"{self.mode} τ={self.tau:g}"
        text = f"heatmap {'x'.join(map(str, self.heatmap.shape))} of {what} by {self.model}, {mode}: " \
               f"{n} position{'s' if n != 1 else ''}"
        if self.stage_positions is not None:
            one, two = self.stage_positions
            text += f" (drill-down: {one} coarse + {two} fine computed)"
        if self.estimated_ssim is not None:
            text += (f" (refined: {int(self.computed.sum())} computed, estimated SSIM vs exact "
                     f"{self.estimated_ssim:.3f})")
        seconds = self.timings.get("total")
        if seconds is None and self.timings:
            seconds = sum(self.timings.values())
        if seconds is not None:
            text += f" in {format_seconds(seconds)} ({_per_position(seconds, n)})"
        if self.output_path:
            text += f" -> {self.output_path}"
        for w in self.warnings:
            text += f"\nwarning: {w}"
        return text

    def __repr__(self) -> str:
        return f"<HeatmapResult {str(self).splitlines()[0]}>"


def _argmin_voxel(pixels: np.ndarray) -> tuple[int, ...]:
    """Where a voxel (pixel) map is smallest, the first in C order on ties; its
    centre when nothing is covered (all NaN)."""
    if np.isnan(pixels).all():
        return tuple(n // 2 for n in pixels.shape)
    return tuple(int(i) for i in np.unravel_index(np.nanargmin(pixels), pixels.shape))


def _is_whole(region: Region, H: int, W: int) -> bool:
    return region.x0 <= 0 and region.y0 <= 0 and region.x1 >= W and region.y1 >= H


def _per_position(s: float, n: int) -> str:
    ms = s * 1000 / max(n, 1)
    return f"{ms:.1f} ms/position" if ms >= 1 else f"{ms:.3f} ms/position"
