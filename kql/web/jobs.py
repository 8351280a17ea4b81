"""One job at a time: a FIFO queue and a worker thread.

Heatmap queries take seconds to minutes and all of the CPU, so a process runs
them one after another. A job waits in line (its position is shown), runs,
reports progress through :func:`kql.executor.common.batch_hook`, and can be
cancelled while it waits (it never starts) or while it runs (it stops between
two batches). Whatever the outcome, the job's inputs and intermediate results
are dropped when it ends; only its small answer (JSON fields, PNG bytes) stays,
for the ``keep`` most recent jobs.
"""
from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

from kql.errors import KqlError, QueryInterrupted
from kql.web.errors import WebError

log = logging.getLogger("kql.web")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class Job:
    """One submitted query. ``work`` is what the runner needs and is dropped
    when the job ends; ``result`` and ``files`` are what the page reads."""

    def __init__(self, work: Any) -> None:
        self.id = "j" + secrets.token_hex(8)
        self.work = work
        self.state = QUEUED
        self.done = 0
        self.total = 0
        self.phase = "waiting"
        self.cancel_requested = threading.Event()
        self.result: Optional[dict] = None
        self.files: dict[str, bytes] = {}
        self.error: Optional[str] = None
        self.submitted = time.time()
        self.started: Optional[float] = None
        self.finished: Optional[float] = None

    def progress(self, done: int, total: int) -> None:
        """The batch hook: record progress; stop here if cancelled."""
        self.done, self.total = done, total
        self.phase = "occluding"
        if self.cancel_requested.is_set():
            raise QueryInterrupted("cancelled")

    @property
    def finished_state(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class JobQueue:
    """Runs ``run(job)`` for each submitted job, one at a time, in order.

    ``run`` fills ``job.result`` (and ``job.files``); it may raise
    :class:`~kql.errors.KqlError` or :class:`WebError` (the job fails with its
    message), :class:`~kql.errors.QueryInterrupted` (cancelled), or anything
    else (the job fails with a generic message; the traceback goes to the
    server log, never to the client).
    """

    def __init__(self, run: Callable[[Job], None], *, max_queued: int = 16, keep: int = 32) -> None:
        self._run = run
        self.max_queued = max_queued
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._line: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: Optional[Job] = None
        self._worker = threading.Thread(target=self._loop, name="kql-web-worker", daemon=True)
        self._worker.start()

    # -- client side ----------------------------------------------------------
    def submit(self, work: Any) -> Job:
        job = Job(work)
        with self._cond:
            if self._closed:
                raise WebError("the server is shutting down", 503)
            if len(self._line) >= self.max_queued:
                raise WebError(f"the queue is full ({self.max_queued} jobs waiting); try again later", 429)
            self._jobs[job.id] = job
            self._line.append(job)
            self._forget_old()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise WebError("unknown job: it never existed or has been forgotten", 404)
        return job

    def position(self, job: Job) -> int:
        """1 for the next job to run, 2 for the one after...; 0 if not waiting."""
        with self._cond:
            try:
                return self._line.index(job) + 1
            except ValueError:
                return 0

    def cancel(self, job_id: str) -> Job:
        """Cancel a waiting job at once, a running one at its next batch."""
        job = self.get(job_id)
        with self._cond:
            if job.state == QUEUED and job in self._line:
                self._line.remove(job)
                self._end(job, CANCELLED, "cancelled before it started")
            elif job.state == RUNNING:
                job.cancel_requested.set()
                job.phase = "cancelling"
        return job

    def wait(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job has ended (for tests and scripts)."""
        job = self.get(job_id)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not job.finished_state:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
                self._cond.wait(left)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            while self._line:
                self._end(self._line.popleft(), CANCELLED, "the server stopped")
            if self.running is not None:
                self.running.cancel_requested.set()
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- worker side ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._line and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._line.popleft()
                job.state, job.phase, job.started = RUNNING, "planning", time.time()
                self.running = job
            state, error = DONE, None
            try:
                self._run(job)
            except QueryInterrupted:
                state, error = (CANCELLED, "cancelled") if job.cancel_requested.is_set() \
                    else (FAILED, "interrupted")
            except WebError as e:
                state, error = FAILED, e.message
            except KqlError as e:
                state, error = FAILED, _one_line(str(e))
            except Exception:  # a bug: the log gets the traceback, the page a sentence
                log.exception("job %s failed", job.id)
                state, error = FAILED, "internal error while running the query (the server log has details)"
            except BaseException:  # SystemExit, a real KeyboardInterrupt: end the job, then let it go
                with self._cond:
                    self._end(job, FAILED, "the server stopped")
                raise
            with self._cond:
                self._end(job, state, error)
            # The job's plan, tensors and result were only referenced from the
            # runner's frames (the exceptions above are gone with their
            # tracebacks); collect the cycles torch.fx and the plan leave now,
            # not at some later allocation.
            gc.collect()

    def _end(self, job: Job, state: str, error: Optional[str]) -> None:
        """Called with the lock held."""
        job.state, job.error, job.finished = state, error, time.time()
        job.phase = state
        job.work = None
        if state != DONE:
            job.result, job.files = None, {}
        if self.running is job:
            self.running = None
        self._cond.notify_all()

    def _forget_old(self) -> None:
        """Keep at most ``keep`` ended jobs (the oldest go first)."""
        ended = [j for j in self._jobs.values() if j.finished_state]
        for job in ended[: max(0, len(ended) - self.keep)]:
            del self._jobs[job.id]


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "failed"
