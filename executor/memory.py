"""Peak memory of a stretch of execution, for EXPLAIN ANALYZE and benchmarks.

On CUDA, torch's allocator statistics are exact. On the CPU, torch allocates
outside Python (``tracemalloc`` sees none of it), so a background thread
samples the process's resident set size (``/proc/self/statm``) every
``interval`` seconds and keeps the largest value; the peak is reported above
the RSS at the start, so it measures what this stretch added (views, batches,
activations). Sampling can miss a peak shorter than the interval; torch keeps
batch-sized buffers alive for whole layer calls, which last far longer.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> Optional[int]:
    """Resident set size of this process now, or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: bytes above the
    starting level at the highest point (None if it cannot be measured)."""

    def __init__(self, device: str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = rss_bytes()
        if self._base is None:
            return self
        self._max = self._base
        self._thread = threading.Thread(target=self._sample, name="kql-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and now > self._max:
                self._max = now

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        now = rss_bytes()
        self.peak = max(self._max, now or 0) - self._base
