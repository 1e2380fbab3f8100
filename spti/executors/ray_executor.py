"""Model work on Ray actors: one actor per GPU (or per CPU slot without GPUs), each holding its models once.

Why :class:`ray.util.ActorPool` and not Ray Data (``map_batches`` with an actor pool):
- **models held once, for the whole run.** The actors live as long as the run's
  :class:`~spti.backends.factory.Models`: a model is loaded on first use and serves every later
  round and stage. A Ray Data pipeline starts its actor pool per dataset execution, so each
  ``embed`` call of each PE round would load SDXL and the feature extractor again.
- **ordered results keyed by the call.** ``ActorPool.map`` yields results in the order of the inputs;
  the driver zips them back onto its own items (the content-addressed keys of its caches), so which
  actor ran a batch never matters.
- **backpressure.** The pool keeps one batch in flight per actor and hands the next to whichever
  actor finishes first; the driver hands over ``workers`` batches per pipeline step, so memory on the
  driver and in the object store stays at about one step of images.
- **an actor that dies** (out of memory, a lost node) is restarted by Ray (``max_restarts``) and its
  batch run again (``max_task_retries``): every method is a pure function of its inputs and seeds,
  so a retried batch returns the same images. Once the retries are spent the run stops with one line;
  ``--resume`` continues, and whatever reached the driver's caches is not computed again.
Ray Data would pay off for a one-shot pass over a large private folder (captions, features) read
from shared storage; here the driver owns every input and every write, and the work comes in rounds.

The driver keeps everything DP and every file: actors get batches and return results; they never
see the ledger, the noise, the selection or the run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spti.errors import SptiError
from spti.executors.base import Call, ModelHolder, RoleSpec, describe_model

# An actor that dies is started again this often, and its batch re-run: enough for a transient OOM
# or a lost node, few enough that a model that cannot load stops the run soon.
MAX_RESTARTS = 2


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SptiError("--executor ray needs Ray: pip install 'spti[ray]' (on every machine of the cluster)") from None
    return ray


class _Worker:
    """The body of one actor: builds each role's model on first use (from its spec) and keeps it."""

    def __init__(self) -> None:
        self._holder = ModelHolder()

    def call(self, role: RoleSpec, method: str, call: Call) -> Any:
        return self._holder.call(role, method, call)

    def describe(self, role: RoleSpec) -> dict[str, Any]:
        return describe_model(self._holder.get(role))

    def close(self) -> None:
        self._holder.close()


class RayExecutor:
    """Runs model calls on an :class:`~ray.util.ActorPool` of :class:`_Worker` actors.

    ``address``: an existing cluster (``ray://host:10001`` or ``host:6379``); ``None`` joins a Ray
    instance this process already started (as the tests do) or starts a local one (and stops it on
    :meth:`close`). ``workers``: how many actors (default: one per GPU of the cluster, else one per CPU).
    """

    def __init__(self, *, address: str | None = None, workers: int | None = None) -> None:
        ray = _require_ray()
        self._ray = ray
        self._started = False
        self._actors: list[Any] = []
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            try:
                ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SptiError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: {exc}") from None
            self._started = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        slots = gpus or max(1, int(resources.get("CPU", 1)))
        if workers and workers > slots:
            self.close()
            raise SptiError(
                f"--ray-workers {workers}: the cluster has {slots} {'GPUs' if gpus else 'CPUs'} for one actor each"
            )
        self.workers = workers or slots
        self.device = "gpu" if gpus else "cpu"
        self.where = "local" if address is None else f"ray cluster {address}"
        actor = ray.remote(_Worker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **per_actor)
        self._actors = [actor.remote() for _ in range(self.workers)]

    def _translated(self, exc: BaseException) -> BaseException:
        """A user error inside a model (bad id, bad argument) as itself: one line; a dead actor as one line."""
        errors = self._ray.exceptions
        if isinstance(exc, errors.RayTaskError) and isinstance(exc.cause, SptiError | ValueError | TypeError):
            return exc.cause
        if isinstance(exc, errors.RayActorError):
            return SptiError(
                f"a Ray worker died and could not be restarted ({type(exc).__name__}); run again with --resume: "
                "what reached the run directory is kept"
            )
        return exc

    def _get(self, ref: Any) -> Any:
        errors = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except (errors.RayTaskError, errors.RayActorError) as exc:
            raise self._translated(exc) from None

    def map(self, role: RoleSpec, method: str, calls: Sequence[Call]) -> list[Any]:
        """Each call on the first free actor (one in flight per actor); results in the order of ``calls``."""
        from ray.util import ActorPool

        if len(calls) <= 1:  # no pool needed for one batch
            return [self._get(self._actors[0].call.remote(role, method, c)) for c in calls]
        ray = self._ray
        role_ref = ray.put(role)  # the spec travels once per map, not once per batch
        pool = ActorPool(self._actors)  # a fresh pool per map: a failed map leaves no stale futures behind
        try:
            return list(pool.map(lambda actor, c: actor.call.remote(role_ref, method, c), list(calls)))
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            raise self._translated(exc) from None

    def describe(self, role: RoleSpec) -> dict[str, Any]:
        return self._get(self._actors[0].describe.remote(role))

    def close(self) -> None:
        ray = self._ray
        for actor in self._actors:
            ray.kill(actor)  # frees the GPUs now; the models go with the process
        self._actors = []
        if self._started:
            self._started = False
            ray.shutdown()
