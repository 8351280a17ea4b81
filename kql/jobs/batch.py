"""Multi-image queries: ``SELECT HEATMAP FROM '<folder or glob>' ... INTO '<folder>'``.

A :class:`BatchJob` is what ``Connection.execute`` returns for such a query:
an iterator of :class:`ImageResult`, one per image, produced as the images
finish (nothing is kept once yielded). Everything a query can get wrong is
checked when the job is made, before any image runs; the work happens while
the job is iterated.

Per image, the driver (this process) reads the file once, hashes it and
either skips it (the manifest holds a valid result for this query and this
content, :func:`kql.jobs.manifest.valid`) or hands the bytes to an
executor. An executor runs :class:`ImageExplainer` on them (decode, plan,
execute, render the overlay) and returns an :class:`Outcome`; the driver
writes the ``.npy`` and ``.png`` atomically, then appends the manifest line.
One writer, so the manifest needs no coordination, and a worker needs
neither the input files nor the output folder (a Ray cluster without a
shared file system works).

Executors: ``local`` (:func:`run_local`, in this process, the model built
and traced once) and ``ray`` (``kql.jobs.distributed``). Both run the
same :class:`ImageExplainer` with the same torch thread count, so their
heatmaps are equal bit for bit.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

from kql import ast, sources
from kql.errors import ExecutionError, KqlError, PlanError, QueryInterrupted
from kql.jobs.manifest import MANIFEST, OutputFolder, read_records, sha256_bytes, valid
from kql.planner.plan import format_seconds

__all__ = ["BatchJob", "ImageResult", "ImageExplainer", "Work", "Outcome", "query_key", "output_name"]


# ---------------------------------------------------------------- records

@dataclass
class Work:
    """One image to explain, as shipped to an executor."""
    name: str           # output base name (unique in the job)
    path: str           # the file, for messages and the manifest
    data: bytes         # its contents (hashed, decoded on the worker)
    sha256: str


@dataclass
class Outcome:
    """What an executor returns for one image."""
    name: str
    path: str
    sha256: str
    status: str                     # "ok" | "failed"
    error: Optional[str] = None
    result: Any = None              # HeatmapResult (its plan dropped) when ok
    png: Optional[bytes] = None     # the overlay (the .npy is the result's heatmap)
    mode: Optional[str] = None
    tau: Optional[float] = None
    timings: dict = field(default_factory=dict)
    worker: str = ""


@dataclass(repr=False)
class ImageResult:
    """One image of a multi-image query, as the job yields it.

    Attributes:
        path: the image file.
        name: its output base name: the heatmap is ``<name>.npy`` and the
            overlay ``<name>.png`` in the INTO folder.
        status: ``"ok"`` (explained now), ``"skipped"`` (a valid result of
            this query was already in the INTO folder) or ``"failed"``.
        error: why it failed, else ``None``.
        record: its manifest line (for a skipped image, the earlier one).
        result: the :class:`kql.result.HeatmapResult` when explained now
            (its ``plan`` is not kept), else ``None``.
        folder: the INTO folder, or ``None``.
    """
    path: str
    name: str
    status: str
    error: Optional[str]
    record: dict
    result: Any = None
    folder: Optional[str] = None

    @property
    def heatmap(self) -> Optional[np.ndarray]:
        """The heatmap array: from the result, or read back from the INTO
        folder for a skipped image; ``None`` for a failed one."""
        if self.result is not None:
            return self.result.heatmap
        if self.status == "skipped" and self.folder:
            return np.load(os.path.join(self.folder, self.record["heatmap"]))
        return None

    def __str__(self) -> str:
        if self.status == "failed":
            return f"failed  {self.path}: {self.error}"
        r = self.record
        what = f"'{r['label_name']}' (label {r['label']}, " if r.get("label_name") else f"label {r['label']} ("
        text = f"{self.status:<7} {self.path}: {what}p={r['p']:.3f})"
        if self.status == "ok":
            text += f" in {format_seconds(r['timings'].get('total', 0.0))}"
        else:
            text += ", done earlier"
        return text

    def __repr__(self) -> str:
        return f"<ImageResult {self}>"


# ---------------------------------------------------------------- keys

def query_key(select: ast.Select, spec, mode: str, device: str) -> str:
    """The key a result is valid for: every clause of the query except FROM and
    INTO (the repr of the statement, so clauses added to the language later are
    covered too), the model's fingerprint (``ModelSpec.fingerprint``), the requested mode and the device.

    Batch size, gather kernel and thread count are left out: they change how
    the floats are summed, not what is computed."""
    stmt = dataclasses.replace(select, source=None, into=None)
    return sha256_bytes(repr((stmt, spec.fingerprint(), mode, device)).encode())


def output_name(path: str, root: str) -> str:
    """The output base name of an image: its path relative to the job's root
    folder, with folders joined by ``__`` and the extension kept, so
    ``scans/a/knee.png`` from ``scans/**/*.png`` is ``a__knee.png`` (results
    ``a__knee.png.npy`` and ``a__knee.png.png``), and ``knee.png`` and
    ``knee.jpg`` do not collide.

    >>> output_name("scans/a/knee.png", "scans")
    'a__knee.png'
    """
    rel = os.path.relpath(path, root or ".")
    return "__".join(p for p in rel.split(os.sep) if p not in ("", "."))


# ---------------------------------------------------------------- the worker side

class ImageExplainer:
    """Explains one image after another with one model: the model is built
    (or received) once and traced once per input shape (``Catalog`` caches),
    each image gets its own plan. Runs in the driver (``local``) or in a Ray
    actor, identically.

    Args:
        select: the query (its FROM and INTO are ignored).
        spec: the resolved :class:`kql.sources.ModelSpec`.
        settings: the session settings (device, batch size, memory, mode...).
        threads: torch intra-op threads for every image.
        render: whether to render the overlay PNG (False without INTO).
        graphs: a ``Catalog``'s cache of traced graphs to share, or None.
    """

    def __init__(self, select: ast.Select, spec, settings, threads: int, render: bool = True,
                 graphs: Optional[dict] = None):
        from kql.catalog import Catalog
        self.catalog = Catalog()
        if graphs is not None:      # the session's traced graphs (local executor)
            self.catalog._graphs = graphs
        self.catalog.models[select.model] = spec
        self.select = dataclasses.replace(select, weights=None, into=None)  # weights are in the spec
        self.settings = settings
        self.threads = threads
        self.render = render
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def plan(self, path: str, image: np.ndarray):
        """The optimized plan of the query for one decoded image."""
        from kql.compiler import compile_select
        select = dataclasses.replace(self.select, source=ast.Source("path", path))
        self.catalog.files = {path: image}
        try:
            plan = compile_select(select, self.catalog, self.settings, {})
        finally:
            self.catalog.files = {}
        return plan

    def explain(self, work: Work) -> Outcome:
        """Decode, plan, run and render one image. A failure of this image
        (unreadable, too small for the patch, the model raising...) becomes a
        failed :class:`Outcome` with the reason; Ctrl-C propagates."""
        from kql.compiler import run
        out = Outcome(work.name, work.path, work.sha256, "failed", worker=self.worker)
        start = time.perf_counter()
        restore = set_threads(self.threads)
        try:
            image = decode(work.data, work.path)
            t_decode = time.perf_counter() - start
            plan = self.plan(work.path, image)
            result = run(plan, progress="off")
            t0 = time.perf_counter()
            out.png = result.to_bytes(".png") if self.render else None
            t_render = time.perf_counter() - t0
        except (KeyboardInterrupt, SystemExit):
            raise
        except KqlError as e:
            out.error = str(e)
            out.timings = {"total": time.perf_counter() - start}
            return out
        except Exception as e:  # a bug or an odd model: record it, go on with the next image
            out.error = f"internal error: {type(e).__name__}: {e}"
            out.timings = {"total": time.perf_counter() - start}
            return out
        finally:
            restore()
        out.status = "ok"
        out.mode = plan.mode
        out.tau = None if plan.tau is None else float(plan.tau)
        result.plan = None          # the plan holds the model and the graph: not shipped, not kept
        out.result = result
        out.timings = {"decode": t_decode, **{k: v for k, v in result.timings.items() if k != "total"},
                       "render": t_render, "total": time.perf_counter() - start}
        return out


def decode(data: bytes, path: str):
    """An image file's bytes as ``sources.decode_image`` decodes them, or a
    volume's (``.npy``, ``.nii``, ``.nii.gz``) as ``kql.sources.volumes.load_volume``
    reads the file: written to a temporary file of the same extension, so a
    worker that cannot see the input reads the very bytes the driver hashed."""
    from kql.sources import volumes
    if not volumes.is_volume_path(path):
        return sources.decode_image(data, path)
    import tempfile
    suffix = ".nii.gz" if path.lower().endswith(".nii.gz") else os.path.splitext(path)[1]
    with tempfile.TemporaryDirectory(prefix="kql-volume-") as folder:
        tmp = os.path.join(folder, "volume" + suffix)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            volume = volumes.load_volume(tmp)
            volume.description = f"file '{path}'"
            return volume
        except PlanError as e:
            raise PlanError(str(e).replace(tmp, path)) from None


def set_threads(n: int):
    """Run torch and Numba with ``n`` threads; returns a function that restores
    the previous counts.

    torch's count fixes how its CPU kernels split their sums, so every executor
    computes the same floats. Numba's (the exact mode's gather kernels) keeps
    several workers on one machine from each starting a thread per core."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        import numba

        import kql.kernels.gather_cpu  # noqa: F401  (picks Numba's threading layer before it starts)
        numba_previous = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        numba = None

    def restore() -> None:
        torch.set_num_threads(previous)
        if numba is not None:
            numba.set_num_threads(numba_previous)
    return restore


def run_local(explainer: ImageExplainer, items: Iterable[Union[Work, ImageResult, Outcome]]
              ) -> Iterator[Union[ImageResult, Outcome]]:
    """The local executor: explain each image in this process, in order."""
    for item in items:
        yield explainer.explain(item) if isinstance(item, Work) else item


# ---------------------------------------------------------------- the job

class BatchJob:
    """A multi-image query: an iterator of :class:`ImageResult`, one per image,
    in the order images finish (file order with the local executor).

    Made by ``Connection.execute``, which checks the query first (the folder
    or glob, INTO, the model, the label, the grid for a fixed-size model), so
    a bad query fails before any image runs. Iterating runs the job; an
    abandoned iteration (``close()``, or garbage collection) stops it and
    releases the INTO folder. :meth:`run` runs it to the end.

    Attributes:
        source: the folder or glob.
        files: the image files, sorted.
        into: the output folder, or ``None`` (results are only streamed).
        executor: ``"local"`` or ``"ray"``.
        counts: images per status so far (``ok``, ``skipped``, ``failed``).
        seconds: wall time of the iteration so far.
    """

    def __init__(self, select: ast.Select, spec, settings, files: list[str], root: str,
                 progress: str = "auto", graphs: Optional[dict] = None, owner=None):
        self.select = select
        self.owner = owner          # the Connection that made the job (it shares a Ray instance KQL started)
        self.spec = spec
        self.settings = settings
        self.source = select.source.value
        self.files = files
        self.names = [output_name(f, root) for f in files]
        seen: dict[str, str] = {}
        for f, n in zip(files, self.names):
            if n in seen:
                raise PlanError(f"'{seen[n]}' and '{f}' would both write results named '{n}'; "
                                f"rename one of them")
            seen[n] = f
        self.into = select.into
        self.executor = settings.executor
        self.device = (select.device or settings.device).lower()
        import torch
        self.threads = settings.threads or torch.get_num_threads()
        self.mode_asked = select.mode or settings.mode
        self.key = query_key(select, spec, self.mode_asked, self.device)
        self.query = ast.select_text(select)
        self.progress = progress
        self._graphs = graphs
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.seconds = 0.0
        self._iter: Optional[Iterator[ImageResult]] = None

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> "BatchJob":
        return self

    def __next__(self) -> ImageResult:
        if self._iter is None:
            self._iter = self._run()
        return next(self._iter)

    def close(self) -> None:
        """Stop the job (if running) and release the INTO folder."""
        if self._iter is not None:
            self._iter.close()

    def __enter__(self) -> "BatchJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> "BatchJob":
        """Run the job to the end (results are not kept); returns the job."""
        for _ in self:
            pass
        return self

    @property
    def manifest(self) -> Optional[str]:
        """The manifest's path, or ``None`` without INTO."""
        return os.path.join(self.into, MANIFEST) if self.into else None

    def records(self) -> list[dict]:
        """Every complete line of the manifest, in order (``[]`` without INTO)."""
        return list(read_records(self.manifest)) if self.into else []

    # -- running
    def _done(self) -> dict[str, list[dict]]:
        """name -> its ok records of this query, from the manifest."""
        done: dict[str, list[dict]] = {}
        if self.into:
            for r in read_records(self.manifest):
                if r.get("status") == "ok" and r.get("query_key") == self.key:
                    done.setdefault(r.get("name"), []).append(r)
        return done

    def _scan(self, done: dict) -> Iterator[Union[Work, ImageResult, Outcome]]:
        """Read each file once: a skipped result, a failed read, or work."""
        for path, name in zip(self.files, self.names):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield Outcome(name, path, "", "failed", error=f"cannot read image '{path}': "
                                                              f"{e.strerror or e}")
                continue
            digest = sha256_bytes(data)
            earlier = next((r for r in reversed(done.get(name, []))
                            if valid(r, self.into, self.key, digest)), None)
            if earlier is not None:
                yield ImageResult(path, name, "skipped", None, earlier, folder=self.into)
                continue
            yield Work(name, path, data, digest)

    def pending(self) -> tuple[int, int]:
        """(images with a valid result already in INTO, images to run), read
        from the files and the manifest without running anything."""
        done = self._done()
        skipped = sum(1 for item in self._scan(done) if isinstance(item, ImageResult))
        return skipped, len(self.files) - skipped

    def _runner(self, explainer_args: tuple):
        """The image runner the executor setting names: local or ray."""
        if self.executor == "ray":
            from kql.jobs.distributed import run_ray
            return lambda items: run_ray(self, explainer_args, items)
        explainer = ImageExplainer(*explainer_args, graphs=self._graphs)
        return lambda items: run_local(explainer, items)

    def _run(self) -> Iterator[ImageResult]:
        from contextlib import ExitStack
        from tqdm import tqdm
        start = time.perf_counter()
        n = len(self.files)
        disable = {"on": False, "off": True}.get(self.progress, None)
        if disable is None:
            disable = not sys.stderr.isatty()
        finished = 0
        with ExitStack() as stack:
            folder = stack.enter_context(OutputFolder(self.into)) if self.into else None
            done = self._done()
            bar = stack.enter_context(tqdm(total=n, desc="images", unit="img", disable=disable,
                                           leave=False, file=sys.stderr, dynamic_ncols=True))
            run = self._runner((self.select, self.spec, self.settings, self.threads, bool(self.into)))
            try:
                for item in run(self._scan(done)):
                    if isinstance(item, Outcome):
                        item = self._commit(item, folder)
                    self.counts[item.status] += 1
                    finished += 1
                    self.seconds = time.perf_counter() - start
                    bar.set_postfix_str(os.path.basename(item.path), refresh=False)
                    bar.update(1)
                    yield item
            except KeyboardInterrupt:
                kept = f"; the finished ones are in '{self.into}': rerun the query to resume" \
                    if self.into else ""
                raise QueryInterrupted(f"interrupted after {finished} of {n} images{kept}") from None
            finally:
                self.seconds = time.perf_counter() - start

    def _commit(self, out: Outcome, folder: Optional[OutputFolder]) -> ImageResult:
        """Write an outcome's files (atomically), then its manifest line."""
        from kql.result import write_atomic
        record: dict[str, Any] = {
            "image": out.path, "name": out.name, "sha256": out.sha256, "status": out.status,
            "error": out.error,
        }
        result = out.result
        if out.status == "ok":
            record.update({
                "label": result.label, "label_name": result.label_name,
                "p": result.p_original, "grid": list(result.heatmap.shape),
            })
            if folder is not None:
                npy, png = out.name + ".npy", out.name + ".png"
                npy_bytes = result.to_bytes(".npy")
                write_atomic(folder.path(npy), npy_bytes)
                write_atomic(folder.path(png), out.png)
                record.update({"heatmap": npy, "heatmap_sha256": sha256_bytes(npy_bytes),
                               "overlay": png, "overlay_sha256": sha256_bytes(out.png)})
                result.output_path = folder.path(png)
        record.update({
            "query": self.query, "query_key": self.key, "model": self.spec.name,
            "mode": out.mode, "tau": out.tau, "device": self.device, "threads": self.threads,
            "executor": self.executor, "worker": out.worker,
            "timings": {k: round(v, 6) for k, v in out.timings.items()},
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        if folder is not None:
            folder.append(record)
        return ImageResult(out.path, out.name, out.status, out.error, record, result,
                           folder=self.into)

    # -- text
    def __str__(self) -> str:
        c = self.counts
        parts = [f"{c['ok']} explained"]
        if c["skipped"]:
            parts.append(f"{c['skipped']} done earlier")
        if c["failed"]:
            parts.append(f"{c['failed']} failed")
        total = sum(c.values())
        text = (f"{len(self.files)} images from '{self.source}' by {self.spec.name} "
                f"({self.executor}): {', '.join(parts)}")
        if total < len(self.files):
            text += f", {len(self.files) - total} not run"
        text += f" in {format_seconds(self.seconds)}"
        if self.into:
            text += f" -> {self.into} (manifest {MANIFEST})"
        return text

    def __repr__(self) -> str:
        return f"<BatchJob {self}>"

