"""Session settings changed with ``SET <option> = <value>``.

Each option has one parser that validates the value and says what it accepts,
so the REPL, the Python API and the tests share one definition.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from .errors import PlanError, SettingError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(value: Any) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000 (bytes)."""
    if isinstance(value, bool):
        raise SettingError(f"memory_limit takes a size such as '2GB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _SIZE.match(str(value))
        if not m or (m.group(2) or "").lower() not in _UNITS:
            raise SettingError(f"memory_limit takes a size such as '2GB' or '512MiB', got {value!r}")
        n = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if n < 1:
        raise SettingError(f"memory_limit must be positive, got {value!r}")
    return int(n)


def _device(value: Any) -> str:
    v = str(value).lower()
    if v not in ("cpu", "cuda"):
        raise SettingError(f"device takes 'cpu' or 'cuda', got {value!r}")
    from kql.planner.binder import check_device
    try:
        return check_device(v, "CUDA is not available on this machine: use device 'cpu'")
    except PlanError as e:
        raise SettingError(str(e)) from None


def _batch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingError(f"batch_size takes a whole number (0 = sized from memory_limit), got {value!r}")
    return value


def _progress(value: Any) -> str:
    v = {True: "on", False: "off"}.get(value, str(value).lower()) if isinstance(value, bool) else str(value).lower()
    if v not in ("on", "off", "auto"):
        raise SettingError(f"progress takes on, off or auto, got {value!r}")
    return v


def _mode(value: Any) -> str:
    v = str(value).lower()
    if v not in ("auto", "exact", "naive"):
        raise SettingError(f"mode takes auto, exact or naive, got {value!r}")
    return v


def _executor(value: Any) -> str:
    v = str(value).lower()
    if v not in ("local", "ray"):
        raise SettingError(f"executor takes local or ray, got {value!r}")
    return v


def _ray_address(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str):
        raise SettingError(f"ray_address takes a quoted address such as 'auto', '10.0.0.5:6379' or "
                        f"'ray://head:10001' ('' starts a local Ray instance), got {value!r}")
    return value.strip()


def _count(option: str, zero: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingError(f"{option} takes a whole number (0 = {zero}), got {value!r}")
        return value
    return parse


def _allocator(value: Any) -> str:
    v = str(value).lower()
    if v not in ("reuse", "system"):
        raise SettingError(f"allocator takes reuse or system, got {value!r}")
    return v


def _gather_backend(value: Any) -> str:
    v = str(value).lower()
    if v not in ("auto", "torch", "numba", "cuda"):
        raise SettingError(f"gather_backend takes auto, torch, numba or cuda, got {value!r}")
    return v


@dataclass(frozen=True)
class Settings:
    """Options of one connection.

    Attributes:
        device: 'cpu' or 'cuda' (``ON CPU|CUDA`` overrides it per query).
        batch_size: positions per batch; 0 sizes batches from ``memory_limit``.
        memory_limit: bytes the occluded batch and its activations may take.
        progress: 'auto' (a bar on a terminal), 'on' or 'off'.
        mode: default mode when a query names none: 'auto' picks the fastest
            exact mode available; 'exact' or 'naive' force one.
        gather_backend: kernel that gathers read-in windows in exact mode:
            'auto' (chosen per layer by the planner), 'torch', 'numba', 'cuda'.
        executor: who runs a multi-image query: 'local' (this process) or
            'ray' (actors on a Ray cluster).
        ray_address: the Ray cluster to join ('auto', 'host:port',
            'ray://host:10001'); '' starts a local Ray instance.
        workers: Ray actors of a multi-image query; 0 = as many as the
            cluster's CPUs (GPUs with ON CUDA) allow.
        threads: torch intra-op threads per image in a multi-image query;
            0 = this process's torch default. Fixed per job so that every
            executor computes the same floats (the thread count changes how
            a convolution's sums are split, and so their last bits).
        allocator: 'reuse' keeps memory freed during a query for the next
            batch instead of returning it to the kernel (glibc; see
            ``kql.executor.allocator``); 'system' leaves malloc alone.
    """
    device: str = "cpu"
    batch_size: int = 0
    memory_limit: int = 2 * 2**30
    progress: str = "auto"
    mode: str = "auto"
    gather_backend: str = "auto"
    executor: str = "local"
    ray_address: str = ""
    workers: int = 0
    threads: int = 0
    allocator: str = "reuse"

    def with_option(self, option: str, value: Any) -> "Settings":
        """A copy with one option changed; unknown options and bad values raise
        :class:`~kql.errors.SettingError` (a PlanError and a ValueError)."""
        key = option.lower()
        if key not in _PARSERS:
            names = ", ".join(sorted(_PARSERS))
            raise SettingError(f"unknown setting '{option}'; settings are {names}")
        return replace(self, **{key: _PARSERS[key](value)})

    def rows(self) -> list[tuple[str, str]]:
        """(option, value) pairs for SHOW SETTINGS."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            out.append((f.name, _show(f.name, v)))
        return out


def _show(name: str, value: Any) -> str:
    if name == "memory_limit":
        from kql.planner.plan import format_bytes
        return format_bytes(value)
    if name == "batch_size" and value == 0:
        return "0 (from memory_limit)"
    if name == "ray_address" and value == "":
        return "'' (start a local instance)"
    if name == "workers" and value == 0:
        return "0 (one per CPU of the cluster)"
    if name == "threads" and value == 0:
        return "0 (torch's default)"
    return str(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "device": _device,
    "batch_size": _batch,
    "memory_limit": parse_size,
    "progress": _progress,
    "mode": _mode,
    "gather_backend": _gather_backend,
    "executor": _executor,
    "ray_address": _ray_address,
    "workers": _count("workers", "one per CPU of the cluster"),
    "threads": _count("threads", "torch's default"),
    "allocator": _allocator,
}
