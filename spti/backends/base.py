"""The six model interfaces the pipeline calls. Providers: ``local`` (Hugging Face) and ``openai``.

Conventions shared by every implementation:
- Inputs are batches (sequences); outputs keep their order and length.
- ``keys`` (optional, one per item) name the sample an item belongs to, e.g. ``"caption/img_0042"``
  or ``"vary/r3/f1/17"``. Providers that cache requests include the key in the cache key, so two
  identical prompts meant as different samples get different answers, and a resumed run finds
  each one again.
- Text outputs are ``str`` or ``None``: ``None`` marks an item that failed after retries (a
  refusal, an empty answer); the caller decides what to do with it. Errors that retrying cannot
  fix (bad key, unknown model) raise :class:`spti.errors.BackendError`.
- Images are ``PIL.Image.Image`` in RGB mode. Features are float32 ``numpy`` arrays (n × d).
- Heavy libraries (torch, transformers, diffusers, openai) are imported inside the provider
  modules only, never at import time of this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

ChatMessage = dict[str, Any]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

Conversation = Sequence[ChatMessage]

DEFAULT_CAPTION_PROMPT = "Describe the image."


@runtime_checkable
class Captioner(Protocol):
    """Describes each image on its own: one image per request, no other private image in context."""

    def caption(
        self,
        images: Sequence[Image],
        *,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        max_new_tokens: int = 77,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]: ...


@runtime_checkable
class TextGenerator(Protocol):
    """Chat completion over a batch of conversations."""

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]: ...


@runtime_checkable
class TextEmbedder(Protocol):
    """Sentence embeddings, float32 (n × d)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class ImageGenerator(Protocol):
    """Text-to-image, and image-to-image variation, with one deterministic seed per sample."""

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
    ) -> list[Image]: ...

    def vary(
        self,
        images: Sequence[Image],
        prompts: Sequence[str],
        *,
        strength: float = 0.5,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[Image]: ...


@runtime_checkable
class Upscaler(Protocol):
    """Raises resolution by ``scale`` (2 or 4). ``prompts`` are used by text-guided upscalers."""

    scale: int

    def upscale(self, images: Sequence[Image], *, prompts: Sequence[str] | None = None) -> list[Image]: ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """Image features, float32 (n × d), in the space where image votes are cast."""

    def embed(self, images: Sequence[Image]) -> np.ndarray: ...
