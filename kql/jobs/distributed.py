"""The Ray executor of multi-image queries (``SET executor = 'ray'``).

Design:

- **One actor per worker**, each holding an :class:`ImageExplainer`: the
  model arrives once per actor and is traced once per input shape; every
  image after that only plans and runs. The model (``ModelSpec``, weights
  included) is ``ray.put`` once by the driver and passed by reference, so
  the weights travel through Ray's object store once per node, whether the
  model is built in, loaded from a file or bound from Python.
- **Tasks carry bytes, not paths.** The driver reads and hashes each file
  (it must, to decide what a rerun skips) and ships those bytes; the actor
  returns the heatmap, the rendered overlay PNG and the manifest fields. The
  driver writes every file and the manifest (``batch.BatchJob._commit``), so
  workers need neither the input files nor the output folder, and the
  manifest has a single writer.
- **Resources.** An actor asks for ``threads`` CPUs (the torch intra-op
  threads each image runs with) and, ``ON CUDA``, one GPU. ``SET workers``
  fixes the number of actors; 0 takes as many as the cluster's CPUs (GPUs)
  hold, at most one per image.
- **Same floats as local.** The actor runs the same code with the same
  thread count (``torch.set_num_threads``; Ray's ``OMP_NUM_THREADS=1`` for
  its workers would otherwise change how convolutions split their sums).
- **Flow control.** Each actor has at most two images in flight (one
  running, one queued, so it never waits for the driver); the driver reads
  the next file only when a slot frees, so memory stays bounded whatever the
  backlog. Results come back in the order they finish.
- **Failures.** A failed image comes back as a failed outcome, like local.
  An actor that dies (out of memory, a crash in native code) fails its
  in-flight images with the reason and is replaced. Ctrl-C, or abandoning the
  iteration, kills the actors; images that were in flight are not recorded
  and run again on the next run.

Without ``SET ray_address``, a Ray instance already initialised in this
process is used, else ``ray.init()`` starts a local one (or joins the cluster
``RAY_ADDRESS`` names). A Ray instance KQL started is shared by the
connections that ran jobs on it: ``Connection.close()`` (:func:`shutdown`)
stops it when no other open connection uses it.
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterable, Iterator, Union

from kql.errors import PlanError
from kql.jobs.batch import ImageExplainer, ImageResult, Outcome, Work

_started_here = False
_users: "weakref.WeakSet" = weakref.WeakSet()   # connections whose jobs ran on the instance KQL started
IN_FLIGHT_PER_ACTOR = 2


def require_ray():
    """Import ray, or say how to install it."""
    try:
        import ray
    except ImportError:
        raise PlanError("executor 'ray' needs the ray package: pip install 'kql[ray]' "
                        "(or SET executor = 'local')") from None
    return ray


def connect(address: str = "", user=None):
    """The ray module, initialised: joins ``address`` or, without one, reuses
    this process's Ray or starts a local instance (no dashboard). ``user``
    (a ``Connection``) is recorded as using the instance if KQL started it."""
    global _started_here
    ray = require_ray()
    if ray.is_initialized():
        if _started_here and user is not None:
            _users.add(user)
        return ray
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at '{address}'" if address else "Ray"
        raise PlanError(f"cannot start or join {where}: {e}") from None
    _started_here = not address
    if _started_here and user is not None:
        _users.add(user)
    return ray


def shutdown(user=None) -> None:
    """``user`` no longer uses Ray; stop the instance KQL started in this
    process (if it did) when no other open connection uses it."""
    global _started_here
    if user is not None:
        _users.discard(user)
    if _started_here and not _users:
        import ray
        ray.shutdown()
        _started_here = False


class _Actor:
    """A Ray actor: one ImageExplainer, many images."""

    def __init__(self, select, spec, settings, threads, render):
        self.explainer = ImageExplainer(select, spec, settings, threads, render)

    def explain(self, work: Work) -> Outcome:
        return self.explainer.explain(work)


def workers_for(ray, job) -> int:
    """How many actors a job gets: ``SET workers``, else what the cluster holds."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    biggest = max((r.get("CPU", 0) for r in nodes), default=0)
    if job.threads > biggest:      # such an actor would wait forever for a node
        raise PlanError(f"threads = {job.threads} per image, but the largest Ray node has "
                        f"{biggest:g} CPUs: SET threads = {max(int(biggest), 1)} (or fewer)")
    if job.settings.workers:
        return job.settings.workers
    resources = ray.cluster_resources()
    if job.device == "cuda":
        n = int(resources.get("GPU", 0))
        if n < 1:
            raise PlanError("ON CUDA with executor 'ray': the Ray cluster has no GPUs")
    else:
        n = int(resources.get("CPU", 1) // job.threads)
    return max(1, min(n, len(job.files)))


def run_ray(job, explainer_args: tuple, items: Iterable[Union[Work, ImageResult, Outcome]]
            ) -> Iterator[Union[ImageResult, Outcome]]:
    """Explain the ``Work`` items on Ray actors; pass everything else through."""
    ray = connect(job.settings.ray_address, job.owner)
    select, spec, settings, threads, render = explainer_args
    options = {"num_cpus": threads, "max_concurrency": 1}
    if job.device == "cuda":
        options["num_gpus"] = 1
    actor_class = ray.remote(_Actor).options(**options)
    spec_ref = ray.put(spec)            # the weights go into the object store once

    def start():
        return actor_class.remote(select, spec_ref, settings, threads, render)

    actors = [start() for _ in range(workers_for(ray, job))]
    free = [a for _ in range(IN_FLIGHT_PER_ACTOR) for a in actors]   # one entry per slot, round robin
    pending: dict = {}   # ObjectRef -> (actor, work)

    replaced: dict = {}  # dead actor -> its replacement

    def live(actor):
        while actor in replaced:
            actor = replaced[actor]
        return actor

    def collect(timeout):
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        for ref in ready:
            actor, work = pending.pop(ref)      # the actor the task was sent to
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                outcome = Outcome(work.name, work.path, work.sha256, "failed",
                                  error=f"the Ray worker died: {_last_line(e)}")
                if actor not in replaced:       # its other in-flight images fail the same way
                    replaced[actor] = new = start()
                    actors.append(new)
                    free[:] = [new if a is actor else a for a in free]
            except ray.exceptions.RayTaskError as e:
                outcome = Outcome(work.name, work.path, work.sha256, "failed",
                                  error=f"internal error on a Ray worker: {_last_line(e)}")
            free.append(live(actor))
            yield outcome

    try:
        for item in items:
            if not isinstance(item, Work):
                yield item
                continue
            while not free:
                yield from collect(None)
            actor = free.pop(0)
            pending[actor.explain.remote(item)] = (actor, item)
            yield from collect(0)
        while pending:
            yield from collect(None)
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass


def _last_line(error: BaseException) -> str:
    """The last non-blank line: Ray wraps a worker's exception in its traceback,
    whose last line is the exception itself."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
