"""SSIM calibrations of the projective-field threshold τ, and where they live.

``TUNE`` measures, on sample images, how similar the heatmap of
``APPROX TAU t`` is to the exact one (SSIM) for a grid of thresholds, and
fits SSIM as a degree-2 polynomial of τ (Krypton section 4.4). ``APPROX SSIM
s`` then runs at the smallest *tuned* τ at which, and at every tuned τ above
it, at least :data:`COVERAGE` (80 %) of the sample images reached SSIM ``s``
(:meth:`Calibration.tau_for`).

Why not Krypton's rule (the τ where the fitted curve meets ``s``): the fit is
of the *mean* SSIM, so about half of the images fall short of ``s`` at that τ
(Krypton reports "more than 50 %"); and SSIM is a step function of τ, not a
smooth one, because each layer's cap ``round(τ · size)`` is an integer: on
small feature maps (7x7, 14x14) a τ between two tuned values behaves like the
lower one, and a curve fitted through the steps can put τ in the middle of a
cliff. Picking among the tuned thresholds, by the share of images that reach
the target, promises only what was measured. The fit is kept: it summarises
the curve and gives the SSIM predicted for any τ (EXPLAIN shows it).

A calibration holds for one model with one set of weights, one input size
and one patch size: the key is ``(model name, weights fingerprint, input
h x w, patch h x w)``. The fingerprint is taken from the parameters
themselves (:func:`kql.sources.models.weights_fingerprint`, the fingerprint
multi-image jobs use too), so a calibration made with one checkpoint is never
applied to another under the same name.

Two stores are read, the user's first:

- the user store, a JSON file written by ``TUNE``:
  ``$KQL_DATA_DIR/calibrations.json``, by default
  ``$XDG_DATA_HOME/kql/calibrations.json`` (``~/.local/share/kql/...``);
- the calibrations shipped with KQL (``kql/calibrations/*.json``, made by
  ``scripts/calibrate_efficientnet.py``), read-only.

Files are written atomically (a temporary file in the same folder, then
``os.replace``), so a crash never leaves half a store; a file that cannot be
read is reported, not silently dropped.
"""
from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kql import files
from kql.errors import KqlError
from kql.sources.models import weights_fingerprint  # noqa: F401  (the one rule; calibrations are keyed by it)

#: Format version of the JSON files; bumped when a field changes meaning.
#: Fields added later are optional and read as absent from older files
#: (``refine``, ``exact_maps``, ``gates``: a calibration without them has
#: those strategies unmeasured), so their addition keeps the version.
FORMAT = 1

#: APPROX SSIM s picks a τ at which at least this share of the sample images reached s.
COVERAGE = 0.8

BUILTIN_DIR = Path(__file__).with_name("calibrations")


@dataclass
class Calibration:
    """One fitted SSIM(τ) curve.

    Attributes:
        model: model name (as after USING).
        weights: the weights' description (``ModelSpec.weights``).
        fingerprint: :func:`weights_fingerprint` of the parameters.
        input_hw, patch: model input size and patch size, ``(h, w)``.
        stride, color: the grid and the patch colour the heatmaps used.
        taus: the thresholds measured.
        ssim: per image, the SSIM at each of ``taus``: ``{image: [..]}``.
        coefficients: ``(a, b, c)`` of the fit ``SSIM = a τ² + b τ + c``.
        created: ISO date and time of the TUNE.
    """
    model: str
    weights: str
    fingerprint: str
    input_hw: tuple[int, int]
    patch: tuple[int, int]
    stride: tuple[int, int]
    color: str
    taus: list[float]
    ssim: dict[str, list[float]]
    coefficients: tuple[float, float, float]
    created: str = ""
    source: str = field(default="user", compare=False)  # "user" or "built-in"; not stored
    # Adaptive refinement (planner.refine), measured by TUNE on the same images:
    # {"step", "batch", "stride", "trajectories": {image: [[share, estimated SSIM, SSIM], ...]}}
    refine: Optional[dict] = None
    # The exact heatmaps of the tuning images (rounded), for replaying plans
    # that compute exact values only (drill-down): {image: [[...], ...]}
    exact_maps: Optional[dict] = None
    # Gate freezing (GATES LOCAL / FROZEN), measured by TUNE on a model with
    # squeeze-and-excitation gates, alone (τ 1) and with each tuned τ:
    # {"count": gates in the model, "taus": [...], "ssim": {mode: {image: [SSIM at each τ]}},
    #  "share": {mode: [work as a share of the exact plan's at each τ]}}.
    # None: the model has no gates, or the calibration predates gate
    # measurements (older files load so; the planner tells a gated model's
    # user to TUNE again).
    gates: Optional[dict] = None

    @property
    def key(self) -> tuple:
        return (self.model, self.fingerprint, tuple(self.input_hw), tuple(self.patch))

    @property
    def n_images(self) -> int:
        return len(self.ssim)

    def predict(self, tau: float) -> float:
        """Fitted SSIM at ``tau`` (clipped to [0, 1])."""
        return float(np.clip(np.polyval(self.coefficients, tau), 0.0, 1.0))

    def reached(self, tau: float, quantile: float = 1 - 0.8) -> float:
        """The ``quantile`` of the sample images' SSIM at tuned threshold ``tau``
        (by default the 20th percentile: 80 % of the images reached it)."""
        i = [round(t, 9) for t in self.taus].index(round(float(tau), 9))
        return float(np.quantile([v[i] for v in self.ssim.values()], quantile))

    def tau_for(self, target: float) -> float:
        """The τ ``APPROX SSIM target`` runs at: the smallest tuned τ at which,
        and at every tuned τ above it, at least :data:`COVERAGE` of the sample
        images reached ``target``; 1.0 (exact) when none qualifies.

        >>> c = Calibration("m", "w", "f", (28, 28), (4, 4), (2, 2), "gray", [1.0, 0.7, 0.5],
        ...                 {"a": [1.0, 0.97, 0.80], "b": [1.0, 0.93, 0.91]}, (0.0, 0.0, 1.0))
        >>> c.tau_for(0.9), c.tau_for(0.95), c.tau_for(0.99)
        (0.7, 1.0, 1.0)
        """
        chosen = 1.0
        for tau in sorted(self.taus, reverse=True):
            if tau < 1 and self.reached(tau, 1 - COVERAGE) < target:
                break
            chosen = tau
        return float(min(chosen, 1.0))

    def coverage_text(self) -> str:
        """Which share of which images a prediction is over."""
        return f"{100 * COVERAGE:.0f} % of the {self.n_images} tuning images"

    def refine_margin(self, target: float, margins=None) -> Optional[tuple[float, float]]:
        """``(margin, share)`` for adaptive refinement at SSIM ``target``: the
        smallest margin at which refinement, stopping at estimated SSIM ≥
        ``target + margin``, reached ``target`` plus a small cushion
        (:data:`kql.planner.refine.CUSHION`) on *every* tuning image, and the
        median share of positions it computed then. None: not measured, or no
        margin worked.
        """
        if not self.refine or not self.refine.get("trajectories"):
            return None
        from kql.planner.refine import CUSHION, MARGINS, stop_point
        need = min(target + CUSHION, 1.0)
        for m in (MARGINS if margins is None else margins):
            stops = [stop_point(t, target + m) for t in self.refine["trajectories"].values()]
            if all(true >= need - 1e-12 for _, true in stops):
                return float(m), float(np.median([share for share, _ in stops]))
        return None

    def gate_reached(self, mode: str, tau: float, quantile: Optional[float] = 1 - COVERAGE) -> Optional[float]:
        """The ``quantile`` of the tuning images' SSIM with gates ``mode``
        (``local`` or ``frozen``) at tuned threshold ``tau`` (1: gates alone),
        by default what 80 % of them reached (``quantile=None``: their mean);
        None: not measured."""
        i = self._gate_index("ssim", mode, tau)
        if i is None:
            return None
        values = [v[i] for v in self.gates["ssim"][mode].values()]
        return float(np.mean(values) if quantile is None else np.quantile(values, quantile))

    def gate_tau_for(self, mode: str, target: float) -> Optional[float]:
        """The τ a plan with gates ``mode`` runs at for ``target``, by the rule
        of :meth:`tau_for`: the smallest tuned τ at which, and at every tuned τ
        above it (gates alone, τ 1, included), at least :data:`COVERAGE` of
        the tuning images reached ``target``; 1.0 when only gates alone do,
        None when not even they do (or not measured).

        >>> c = Calibration("m", "w", "f", (28, 28), (4, 4), (2, 2), "gray", [1.0, 0.7, 0.5],
        ...                 {"a": [1, 1, 1]}, (0.0, 0.0, 1.0), gates={"count": 2, "taus": [1.0, 0.7, 0.5],
        ...                 "ssim": {"local": {"a": [0.99, 0.95, 0.85], "b": [1.0, 0.93, 0.8]}}})
        >>> c.gate_tau_for("local", 0.8), c.gate_tau_for("local", 0.9), c.gate_tau_for("local", 0.999)
        (0.5, 0.7, None)
        """
        if not self.gates or mode not in self.gates.get("ssim", {}):
            return None
        chosen = None
        for tau in sorted(self.gates["taus"], reverse=True):
            if self.gate_reached(mode, tau) < target:
                break
            chosen = float(tau)
        return chosen

    def gate_share(self, mode: str, tau: float) -> Optional[float]:
        """The work share TUNE's cost model gave gates ``mode`` at ``tau``
        (shown by SHOW CALIBRATIONS; the planner computes it for each query's grid)."""
        i = self._gate_index("share", mode, tau)
        return None if i is None else float(self.gates["share"][mode][i])

    def _gate_index(self, field: str, mode: str, tau: float) -> Optional[int]:
        """Where ``tau`` is among the gate measurements' thresholds; None when
        ``field`` (``ssim`` or ``share``) holds nothing for ``mode`` or ``tau``
        was not tuned."""
        if not self.gates or mode not in self.gates.get(field, {}):
            return None
        taus = [round(float(t), 9) for t in self.gates["taus"]]
        key = round(float(tau), 9)
        return taus.index(key) if key in taus else None

    def drilldown_ssim(self, fraction: float, stride_one, stride) -> Optional[float]:
        """Predicted SSIM of Krypton's drill-down with ``fraction`` and stage-one
        stride ``stride_one`` for a query at ``stride`` (the ratio is what
        matters: it is replayed at the same ratio on the tuning grid): the
        share :data:`COVERAGE` of the tuning images reached (None: no exact
        heatmaps kept)."""
        if not self.exact_maps:
            return None
        from kql.planner.drilldown import replay
        from kql.tune import heatmap_ssim
        ratio = tuple(max(1, a // b) for a, b in zip(stride_one, stride))
        out = []
        for m in self.exact_maps.values():
            exact = np.asarray(m, dtype=np.float64)
            if min(exact.shape) < 3 or np.ptp(exact) <= 0:
                continue
            out.append(heatmap_ssim(exact, replay(exact, ratio, fraction)))
        return float(np.quantile(out, 1 - COVERAGE)) if out else None

    def fit_text(self, short: bool = False) -> str:
        """The fitted curve as text: ``SSIM ≈ -0.8τ² +1.9τ -0.1``."""
        a, b, c = self.coefficients
        text = f"{a:.3f}τ² {b:+.3f}τ {c:+.3f}"
        return text if short else f"SSIM ≈ {text}"

    def describe(self) -> str:
        a, b, c = self.coefficients
        return (f"{self.source} calibration of {self.created[:10] or 'unknown date'} "
                f"({self.n_images} images, SSIM ≈ {a:.3f}τ² {b:+.3f}τ {c:+.3f})")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "user") -> "Calibration":
        return cls(model=d["model"], weights=d["weights"], fingerprint=d["fingerprint"],
                   input_hw=tuple(d["input_hw"]), patch=tuple(d["patch"]), stride=tuple(d["stride"]),
                   color=d["color"], taus=[float(t) for t in d["taus"]],
                   ssim={k: [float(v) for v in vs] for k, vs in d["ssim"].items()},
                   coefficients=tuple(float(c) for c in d["coefficients"]), created=d.get("created", ""),
                   source=source, refine=d.get("refine"), exact_maps=d.get("exact_maps"),
                   gates=d.get("gates"))


def fit(taus: Sequence[float], ssim: dict[str, Sequence[float]]) -> tuple[float, float, float]:
    """Least-squares degree-2 fit of SSIM against τ over every image's points."""
    xs = np.concatenate([np.asarray(taus, float) for _ in ssim])
    ys = np.concatenate([np.asarray(v, float) for v in ssim.values()])
    if len(set(np.round(taus, 9))) < 3:
        raise KqlError("a degree-2 fit needs at least 3 different thresholds (TAUS)")
    a, b, c = np.polyfit(xs, ys, 2)
    return float(a), float(b), float(c)


def user_store() -> Path:
    """The user's calibration file (it may not exist yet)."""
    base = os.environ.get("KQL_DATA_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "kql")
    return Path(base) / "calibrations.json"


#: ``(path, source) -> (the file's bytes, its calibrations)``: every APPROX
#: query looks its calibration up, and the shipped store, which keeps the exact
#: heatmaps of the tuning images, takes milliseconds to parse; a file is parsed
#: again only when its bytes change (TUNE, another process, an edit).
_PARSED: dict[tuple[Path, str], tuple[bytes, list[Calibration]]] = {}


def _read(path: Path, source: str) -> list[Calibration]:
    """The calibrations in ``path`` (none if it does not exist). Each call
    returns new objects, so a caller may reassign their fields; the values
    they hold (lists, dicts) are shared between calls: read them only."""
    try:
        raw = path.read_bytes()
        hit = _PARSED.get((path, source))
        if hit is None or hit[0] != raw:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            hit = _PARSED[(path, source)] = (raw, [Calibration.from_json(d, source) for d in data["calibrations"]])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KqlError(f"cannot read the calibration store {path}: {e}; move it away and run TUNE again")
    return [dataclasses.replace(c) for c in hit[1]]


def load_all() -> list[Calibration]:
    """Every calibration: the user's, then the built-in ones not overridden."""
    user = _read(user_store(), "user")
    keys = {c.key for c in user}
    builtin = [c for f in sorted(BUILTIN_DIR.glob("*.json")) for c in _read(f, "built-in")]
    return user + [c for c in builtin if c.key not in keys]


def write(path: Path, calibrations: list[Calibration]) -> None:
    """Write a store atomically (:func:`dumps`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps({"format": FORMAT, "calibrations": [c.to_json() for c in calibrations]})
    files.write_atomic(path, text.encode("utf-8"))


def dumps(value, indent: int = 0) -> str:
    """JSON indented by one space per level, with each list of numbers or
    strings on one line: a row of an exact heatmap, a stage of a trajectory.
    ``json.dumps(indent=1)`` puts every number on a line of its own (a store
    with three calibrations' heatmaps was 64,000 lines). Numbers are written
    as ``json.dumps`` writes them, so a store reads back to the same values.

    >>> print(dumps({"taus": [1.0, 0.9], "maps": {"a": [[0.5, 0.25], [1, 2]]}}))
    {
     "taus": [1.0, 0.9],
     "maps": {
      "a": [
       [0.5, 0.25],
       [1, 2]
      ]
     }
    }
    """
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value)


def save(calibration: Calibration, path: Optional[Path] = None) -> Path:
    """Add ``calibration`` to the user store (or ``path``), replacing one with the same key."""
    path = path or user_store()
    kept = [c for c in _read(path, "user") if c.key != calibration.key]
    write(path, kept + [calibration])
    return path


def lookup(spec, input_hw, patch) -> Optional[Calibration]:
    """The calibration for this model (name and weights), input size and patch, or None."""
    found = [c for c in load_all() if c.model == spec.name and tuple(c.input_hw) == tuple(input_hw)
             and tuple(c.patch) == tuple(patch)]
    if not found:
        return None
    fp = weights_fingerprint(spec.module)
    return next((c for c in found if c.fingerprint == fp), None)
