"""Where a run's local model work happens: in this process (``--executor local``, the default) or on
Ray actors across GPUs and machines (``--executor ray``, the ``[ray]`` extra).

With Ray, :class:`~spti.backends.factory.Models` hands out proxies (:mod:`spti.executors.proxies`)
for the captioner, the image generators, the upscaler and the image embedder; each call becomes
batches run on the actors (:mod:`spti.executors.ray_executor`), each actor holding its models once.
The LLM and the text embedder stay with the driver (an LLM scales through OpenAI-compatible
endpoint fleets instead). The driver keeps the ledger, the noise, the selection, the caches and
every write to the run directory. Ray is imported only when a Ray executor is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spti.executors.base import Call, Executor, LocalExecutor, RoleSpec

if TYPE_CHECKING:
    from spti.config import RunConfig

__all__ = ["Call", "Executor", "LocalExecutor", "RoleSpec", "make_executor"]


def make_executor(cfg: RunConfig) -> Executor:
    """The executor ``cfg.executor`` names (``local`` or ``ray``, at ``cfg.ray_address``)."""
    if cfg.executor == "ray":
        from spti.executors.ray_executor import RayExecutor

        return RayExecutor(address=cfg.ray_address, workers=cfg.ray_workers)
    return LocalExecutor()
