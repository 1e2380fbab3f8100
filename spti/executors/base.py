"""The executor interface: where a role's model runs, and how it is built there from its spec.

An executor runs one method of one role's model over a list of calls and returns the results in
the order of the calls::

    executor.map(role_spec, "generate", [Call((prompts_a,), {"seeds": seeds_a}), ...]) -> [images_a, ...]

The model is built where the call runs, from a :class:`RoleSpec` (the role, the run's configuration
and where the driver built tiny models), by the very factory code a local run uses
(:class:`spti.backends.factory.Models`), and it is held there for every later call. Executors only
compute: they return results and never write into the run directory; the caller (the driver) keeps
the ledger, the noise, selection, the caches and every file of the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from spti.config import RunConfig

# role -> the Models attribute that builds it; the roles an executor can hold
ROLE_ATTRS: dict[str, str] = {
    "caption": "captioner",
    "image": "image_generator",
    "release_image": "release_image_generator",
    "upscaler": "upscaler",
    "image_features": "image_embedder",
}
# the tiny model a role builds in the smoke preset (built once by the driver, read by the workers)
TINY_KINDS: dict[str, str] = {"caption": "vlm", "image": "sd", "release_image": "sd"}


@dataclass(frozen=True)
class Call:
    """One batch: the positional and keyword arguments of one model call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleSpec:
    """What builds a role's model anywhere: the role, the run's settings (executor ``local``: the worker
    builds the model itself) and the folder where the driver built the smoke preset's tiny models."""

    role: str
    config: RunConfig
    tiny_dir: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLE_ATTRS:
            raise ValueError(f"role {self.role!r} does not run on an executor; use one of {', '.join(ROLE_ATTRS)}")

    @property
    def key(self) -> str:
        """Identity of the model: the same key is the same model, built once per worker."""
        text = f"{self.role}\x00{self.tiny_dir}\x00{self.config.to_toml()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def of(cls, role: str, config: RunConfig, tiny_dir: str | Path | None = None) -> RoleSpec:
        """The spec of ``role`` in ``config``, to be built in a worker (one GPU: ``cuda:N`` becomes ``cuda``)."""
        device = "cuda" if config.device.startswith("cuda") else config.device
        worker_cfg = dataclasses.replace(config, executor="local", ray_address=None, device=device)
        return cls(role, worker_cfg, None if tiny_dir is None else str(tiny_dir))


class Executor(Protocol):
    """Runs model calls somewhere: in this process (:class:`LocalExecutor`) or on Ray actors."""

    #: how many calls run at once (a pipeline loop hands over ``workers`` batches at a time)
    workers: int
    #: where inputs go, for the run's record of where private data went (``"local"`` or a cluster address)
    where: str

    def map(self, role: RoleSpec, method: str, calls: Sequence[Call]) -> list[Any]:
        """``getattr(model_of(role), method)(*call.args, **call.kwargs)`` for each call, results in order."""
        ...

    def describe(self, role: RoleSpec) -> dict[str, Any]:
        """Public attributes of the role's model (``native_size``, ``steps``, ``guidance``, ``scale``)."""
        ...

    def close(self) -> None: ...


def build_model(role: RoleSpec, scratch: str | Path) -> Any:
    """The model of ``role``, built by the factory a local run uses; tiny models are read from the driver's
    folder when it is visible here, else built (seeded: the same weights) in ``scratch``."""
    from spti.backends.factory import Models

    class WorkerModels(Models):
        def _tiny(self, kind: str) -> Path:
            shared = Path(role.tiny_dir) / kind if role.tiny_dir else None
            if shared is not None and (shared / ".complete").exists():
                import torch

                torch.set_num_threads(1)  # as Models._tiny: tiny models are many small ops
                return shared
            return super()._tiny(kind)

    models = WorkerModels(role.config, Path(scratch))  # a plain folder: no request cache, nothing private kept
    return getattr(models, ROLE_ATTRS[role.role])


def describe_model(model: Any) -> dict[str, Any]:
    """The attributes the pipeline reads from a model besides its methods."""
    out: dict[str, Any] = {}
    for name in ("native_size", "steps", "guidance", "scale"):
        value = getattr(model, name, None)
        if value is None or isinstance(value, int | float | str):
            out[name] = value
    return out


class ModelHolder:
    """Models by :attr:`RoleSpec.key`, each built once; what a worker (or the local executor) holds."""

    def __init__(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="spti-worker-")
        self._models: dict[str, Any] = {}

    def get(self, role: RoleSpec) -> Any:
        model = self._models.get(role.key)
        if model is None:
            model = self._models[role.key] = build_model(role, self._scratch.name)
        return model

    def call(self, role: RoleSpec, method: str, call: Call) -> Any:
        return getattr(self.get(role), method)(*call.args, **call.kwargs)

    def close(self) -> None:
        for model in {id(m): m for m in self._models.values()}.values():
            close = getattr(model, "close", None)
            if callable(close):
                close()
        self._models.clear()
        self._scratch.cleanup()


class LocalExecutor:
    """Every call in this process, one after another, with each model built once. The reference
    implementation of :class:`Executor` (and the one-worker baseline of the benchmarks);
    ``--executor local`` itself calls the models directly, as it always did."""

    workers = 1
    where = "local"

    def __init__(self) -> None:
        self._holder = ModelHolder()

    def map(self, role: RoleSpec, method: str, calls: Sequence[Call]) -> list[Any]:
        return [self._holder.call(role, method, c) for c in calls]

    def describe(self, role: RoleSpec) -> dict[str, Any]:
        return describe_model(self._holder.get(role))

    def close(self) -> None:
        self._holder.close()
