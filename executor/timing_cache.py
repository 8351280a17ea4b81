"""The on-disk cache of measured layer timings (``planner/runtime.py`` is the
model they feed; ``kql.executor.profile`` measures them).

One JSON file per (model, layers, input size, device, threads, batch size
bucket, mode family, allocator, torch version, CPU) under ``$KQL_CACHE_DIR``
(default ``$XDG_CACHE_HOME/kql`` or ``~/.cache/kql``), written atomically; a
file that does not parse or does not match is ignored and rebuilt. A plan
that needs a (layer, state) the cached file lacks (another patch size moved
the cutoff, or another gather kernel) is profiled again on its own batches
and the file is extended. :func:`layer_timings` is the ``timings_for`` the
front end hands the planner's runtime estimate.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from kql import files
from kql.executor import profile
from kql.planner.runtime import LayerTimings, missing_states

#: Bump when the file layout or what is measured changes: older files are ignored.
CACHE_VERSION = 2
CACHE_ENV = "KQL_CACHE_DIR"


def cache_dir() -> Path:
    """Where calibrations live: ``$KQL_CACHE_DIR``, else ``$XDG_CACHE_HOME/kql``,
    else ``~/.cache/kql``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kql"


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "runtime" / f"{key['model']}-{key['family']}-{digest}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one,
    never half of one (:func:`kql.files.write_atomic`), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, text.encode("utf-8"))


_MEMO: dict = {}  # cache file -> LayerTimings, so repeated EXPLAINs read the disk once


def layer_timings(plan) -> LayerTimings:
    """The plan's calibration: from memory, from the cache, or measured now.

    A cached calibration that lacks a (layer, state) this plan needs is
    extended by calibrating on this plan's batches."""
    key = profile.timings_key(plan)
    path = _cache_path(key)
    cal = _load(path, key)
    changed = cal is None
    if cal is None:
        cal = profile.measure(plan)
    for _ in range(2):  # states the timed batches did not show: time a batch that has them
        need = missing_states(plan, cal) if plan.mode != "naive" else set()
        if not need:
            break
        cal = _merge(cal, profile.measure(plan, need=need))
        changed = True
    if plan.mode != "naive" and missing_states(plan, cal):
        _borrow(plan, cal)  # e.g. a point op the executor runs in full: its other line
        changed = True
    if changed:
        _store(path, cal)
    _MEMO[str(path)] = replace(cal, source="cache")  # later EXPLAINs: no measuring
    return cal


def _load(path: Path, key: dict) -> Optional[LayerTimings]:
    cal = _MEMO.get(str(path))
    if cal is None:
        try:
            cal = LayerTimings.from_json(path.read_text(encoding="utf-8"), key, CACHE_VERSION)
        except (OSError, UnicodeDecodeError):
            cal = None
    return cal


def is_profiled(plan) -> bool:
    """Whether the plan's estimate can be made without running the model:
    its calibration (and for DRILLDOWN its stage one's) is in memory or in
    the cache with every (layer, state) the plan needs. The web UI asks
    before an EXPLAIN that may not run a model while a job holds the engine."""
    plans = [plan] + ([plan.drilldown.stage_one] if plan.drilldown is not None else [])
    for p in plans:
        key = profile.timings_key(p)
        cal = _load(_cache_path(key), key)
        if cal is None or (p.mode != "naive" and missing_states(p, cal)):
            return False
    return True


def _store(path: Path, cal: LayerTimings) -> None:
    try:
        write_atomic(path, cal.to_json(CACHE_VERSION))
    except OSError:
        pass  # a read-only cache costs a calibration per session, not the query


def _borrow(plan, cal: LayerTimings) -> None:
    """Give each (layer, state) still missing the layer's other line, so a
    state calibration cannot produce is not calibrated again and again."""
    for name, state in missing_states(plan, cal):
        fits = cal.layers.setdefault(name, {})
        fits[state] = list(fits.get("patch") or next(iter(fits.values()), [0.0, 0.0]))


def _merge(old: LayerTimings, new: LayerTimings) -> LayerTimings:
    layers = {name: dict(states) for name, states in old.layers.items()}
    for name, states in new.layers.items():
        layers.setdefault(name, {}).update(states)
    new.layers = layers
    if old.source == "measured":  # both measured now: EXPLAIN reports the whole time
        new.seconds += old.seconds
    # Load on the machine only ever slows a measurement down: keep the faster.
    new.reference, new.materialize = min(new.reference, old.reference), min(new.materialize, old.materialize)
    new.batch = old.batch
    return new


