"""Thin stand-ins for the models an executor holds: the same interfaces (``spti.backends.base``), and
every call becomes batches sent to the executor.

A proxy splits the items it is given into batches of the model's own batch size (``chunk``), in
order, and the executor runs them at once, one per worker; results come back in order and are joined.
So a pipeline loop that hands over ``chunk × workers`` items keeps every worker busy, and each worker
sees exactly the batches a local run would have passed to the model: the same outputs.
Per-item arguments (seeds, keys, prompts) are split with the items; the rest go to every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from spti.backends.base import DEFAULT_CAPTION_PROMPT
from spti.executors.base import Call, Executor, RoleSpec


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


class _Proxy:
    def __init__(self, executor: Executor, role: RoleSpec, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.executor = executor
        self.role = role
        self.chunk = chunk

    @cached_property
    def _attributes(self) -> dict[str, Any]:
        return self.executor.describe(self.role)

    def _map(self, method: str, n: int, per_item: dict[str, Sequence[Any] | None], **shared: Any) -> list[Any]:
        """``method`` over the ``n`` items in batches of ``chunk``: the per-item sequences are cut alike."""
        for name, values in per_item.items():
            if values is not None and len(values) != n:
                raise ValueError(f"got {n} items but {len(values)} {name}")
        calls = [
            Call(
                (),
                {**shared, **{name: list(v[s]) if v is not None else None for name, v in per_item.items()}},
            )
            for s in _spans(n, self.chunk)
        ]
        return self.executor.map(self.role, method, calls) if calls else []

    def close(self) -> None:
        """The executor's workers hold the model; :class:`~spti.backends.factory.Models` closes the executor."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role.role}, chunk={self.chunk}, workers={self.executor.workers})"


def _joined(parts: list[list[Any]]) -> list[Any]:
    return [item for part in parts for item in part]


class CaptionerProxy(_Proxy):
    def caption(
        self,
        images: Sequence[Any],
        *,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        max_new_tokens: int = 77,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        parts = self._map(
            "caption",
            len(images),
            {"images": list(images), "keys": keys},
            prompt=prompt,
            max_new_tokens=max_new_tokens,
        )
        return _joined(parts)


class ImageGeneratorProxy(_Proxy):
    @property
    def native_size(self) -> int | None:
        return self._attributes.get("native_size")

    @property
    def steps(self) -> int | None:
        return self._attributes.get("steps")

    @property
    def guidance(self) -> float | None:
        return self._attributes.get("guidance")

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
    ) -> list[Any]:
        # a model's default seeds are 0..n-1 of its call: fix them before the call is cut in batches
        seeds = list(range(len(prompts))) if seeds is None else seeds
        parts = self._map(
            "generate",
            len(prompts),
            {"prompts": list(prompts), "seeds": seeds},
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
        )
        return _joined(parts)

    def vary(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        strength: float = 0.5,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[Any]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        seeds = list(range(len(images))) if seeds is None else seeds
        parts = self._map(
            "vary",
            len(images),
            {"images": list(images), "prompts": list(prompts), "seeds": seeds},
            strength=strength,
            steps=steps,
            guidance=guidance,
        )
        return _joined(parts)


class UpscalerProxy(_Proxy):
    def __init__(self, executor: Executor, role: RoleSpec, chunk: int, *, scale: int) -> None:
        super().__init__(executor, role, chunk)
        self.scale = scale

    def upscale(self, images: Sequence[Any], *, prompts: Sequence[str] | None = None) -> list[Any]:
        parts = self._map(
            "upscale", len(images), {"images": list(images), "prompts": None if prompts is None else list(prompts)}
        )
        return _joined(parts)


class ImageEmbedderProxy(_Proxy):
    def embed(self, images: Sequence[Any]) -> np.ndarray:
        parts = self._map("embed", len(images), {"images": list(images)})
        if not parts:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


def proxy_for(executor: Executor, role: RoleSpec) -> Any:
    """The stand-in of ``role``'s model, in batches of the size the model itself would use."""
    cfg = role.config
    if role.role == "caption":
        return CaptionerProxy(executor, role, cfg.batch_size)
    if role.role in ("image", "release_image"):
        return ImageGeneratorProxy(executor, role, cfg.batch_size)
    if role.role == "upscaler":
        return UpscalerProxy(executor, role, cfg.batch_size, scale=cfg.upscale)
    if role.role == "image_features":
        return ImageEmbedderProxy(executor, role, embedder_chunk(cfg.batch_size))
    raise ValueError(f"no proxy for role {role.role!r}")


def embedder_chunk(batch_size: int) -> int:
    """An image embedder's own batch (``build_image_embedder``: at least 16)."""
    return max(batch_size, 16)
