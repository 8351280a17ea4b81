"""Keep freed memory for reuse while a query runs (glibc's malloc only).

Every batch allocates the same tensors again: the occluded inputs, each
layer's output, the gathered windows. glibc serves a block above its mmap
threshold (128 KiB at first, raised as such blocks are freed, at most
32 MiB) with fresh pages from the kernel, and hands the top of its heap back
once more than the trim threshold is free. A fresh page costs a page fault
and zeroing when first touched, so on a model with many mid-sized tensors a
large share of the time went to the kernel instead of to convolutions:
efficientnet_lite0 (patch 16, stride 8) ran 1.4-1.5x faster in exact and
naive mode with the thresholds below (``docs/performance.md``); VGG16 and
ResNet18, whose time is in large convolutions, did not change.

:func:`reuse_freed_memory` therefore fixes the mmap threshold at glibc's
largest (32 MiB), stops trimming and turns mmap off (``M_MMAP_MAX`` 0) while
a query runs, so freed blocks are served again from the heap. The threshold
cannot go above 32 MiB, and a 3-D network's batch is made of larger tensors
(MONAI DenseNet121-3D on a 64³ scan, 27 positions: 27 x 256 x 16³ floats =
113 MiB per layer output): each was a fresh mapping, faulted in page by page
and unmapped again, 270-360k page faults and 0.6-1.0 s of system time in a
2.2 s query; without mmap, 90-110k and 0.4 s (``docs/performance.md``,
Volumes).

When the last query running in the process ends, mmap is allowed again for
other code, but the heap is kept for :data:`KEEP_SECONDS`: queries often come
back to back (a loop over images or volumes, a notebook cell, the web
server, a benchmark), and giving the peak back after each one made the next
fault all of it in again -- DenseNet121-3D's exact query spent 0.3-0.45 s of
system time (100-190k faults) in a 1.2-1.4 s run doing so, and ran in 1.10 s
without. Once no query has run for that long, a timer sets the trim threshold
to what glibc's own adjustment would have reached (twice the mmap threshold)
and ``malloc_trim(0)`` gives the freed memory back to the kernel: a session
does not keep a query's peak for longer than that. :func:`give_back` does it
at once.

``SET allocator = 'system'`` leaves malloc alone. Other C libraries (musl,
macOS): nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 * 2**20          # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
NO_TRIM = 2**31 - 1                  # mallopt takes an int
TRIM_AFTER = 2 * MMAP_THRESHOLD      # what glibc's dynamic threshold would have set
MMAP_MAX_DEFAULT = 65536             # glibc's DEFAULT_MMAP_MAX
KEEP_SECONDS = 10.0                  # how long the heap is kept after the last query ends

_lock = threading.Lock()
_running = 0
_timer: Optional[threading.Timer] = None
_libc: Optional[ctypes.CDLL] = None
_checked = False


def _glibc() -> Optional[ctypes.CDLL]:
    """glibc, or None when this process's C library is another one."""
    global _libc, _checked
    if not _checked:
        _checked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            libc.gnu_get_libc_version()  # only glibc has it
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = None
    return _libc


def available() -> bool:
    """Whether the thresholds can be set here (glibc)."""
    return _glibc() is not None


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, freed memory is reused instead of returned to the
    kernel, and for :data:`KEEP_SECONDS` after the last block ends (see the
    module docstring). Nests, and is safe across threads."""
    global _running, _timer
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _lock:
        _running += 1
        if _running == 1:
            if _timer is not None:      # a query within the keeping time: the heap is still ours
                _timer.cancel()
                _timer = None
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM)
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                if KEEP_SECONDS > 0:
                    _timer = threading.Timer(KEEP_SECONDS, _give_back_after_wait)
                    _timer.daemon = True
                    _timer.start()
                else:
                    _release(libc)


def give_back() -> None:
    """Return the memory kept since the last query to the kernel now (nothing
    while a query runs: the last one to end keeps it for
    :data:`KEEP_SECONDS`)."""
    global _timer
    libc = _glibc()
    if libc is None:
        return
    with _lock:
        if _running:
            return
        if _timer is not None:
            _timer.cancel()
            _timer = None
        _release(libc)


def _give_back_after_wait() -> None:
    global _timer
    with _lock:
        if _running or _timer is None or _timer is not threading.current_thread():
            return                      # a query started meanwhile (and cancelled this timer)
        _timer = None
        _release(_glibc())


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: a keeping timer of the
    parent's does not exist there, and its lock may have been taken by a
    thread that does not either."""
    global _lock, _timer
    _lock = threading.Lock()
    _timer = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(libc) -> None:
    """Trim as glibc would, and give the free heap back (under ``_lock``)."""
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
    libc.malloc_trim(0)
