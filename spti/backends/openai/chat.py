"""Chat-completion providers: the captioner (one private image per request) and the text generator."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack

from spti.backends.base import DEFAULT_CAPTION_PROMPT, Conversation
from spti.backends.openai.backend import ConnectionOptions, OpenAIBackend
from spti.backends.openai.helpers import (
    _approx_tokens,
    _conversation_tokens,
    _derive_seed,
    _encode_image,
    _pixel_digest,
)
from spti.backends.openai.provider import _Provider
from spti.errors import SptiError

if TYPE_CHECKING:
    from PIL.Image import Image


class OpenAICaptioner(_Provider):
    """Captions each image in its own chat request (the image as a base64 data URL).

    One image per request is a privacy rule (no private image in another's context), not a
    performance choice. Images larger than ``max_image_side`` are shrunk before sending
    (providers downscale anyway; this saves upload time). ``detail`` is OpenAI's vision setting
    (``"low"`` is cheapest: 85 tokens an image).
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        *,
        backend: OpenAIBackend | None = None,
        detail: Literal["auto", "low", "high"] = "auto",
        image_format: Literal["png", "jpeg"] = "png",
        max_image_side: int | None = 1024,
        temperature: float | None = 0.0,
        max_tokens_param: str = "max_tokens",
        extra_body: Mapping[str, Any] | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(model, backend, options)
        if image_format not in ("png", "jpeg"):
            raise SptiError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
        self.detail = detail
        self.image_format = image_format
        self.max_image_side = max_image_side
        self.temperature = temperature
        self.max_tokens_param = max_tokens_param
        self.extra_body = dict(extra_body or {})

    def caption(
        self,
        images: Sequence[Image],
        *,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        max_new_tokens: int = 77,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        """One caption per image, in order; ``None`` where the model refused or answered nothing."""
        item_keys = self._check_keys(keys, len(images))
        mime = "image/jpeg" if self.image_format == "jpeg" else "image/png"
        body: dict[str, Any] = {self.max_tokens_param: int(max_new_tokens)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.extra_body)
        key_docs: list[dict[str, Any]] = []
        builders: list[Callable[[], Awaitable[list[dict[str, Any]]]]] = []
        for image in images:

            async def build(image: Image = image) -> list[dict[str, Any]]:
                # Encoding runs off the loop thread (zlib releases the GIL), only for images that
                # are actually sent, and only when a worker is about to send them.
                data = await asyncio.to_thread(_encode_image, image, self.image_format, self.max_image_side)
                url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
                content = [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": url, "detail": self.detail}},
                ]
                return [{"role": "user", "content": content}]

            builders.append(build)
            key_docs.append(
                {
                    "prompt": prompt,
                    "image": _pixel_digest(image),
                    "format": self.image_format,
                    "max_side": self.max_image_side,
                    "detail": self.detail,
                    "body": body,
                }
            )
        image_tokens = 85 if self.detail == "low" else 765
        estimates = [_approx_tokens(prompt) + image_tokens + int(max_new_tokens)] * len(images)
        return self._run_chat([body] * len(images), item_keys, estimates, key_docs=key_docs, messages=builders)


class OpenAITextGenerator(_Provider):
    """Chat completions over a batch of conversations.

    With ``seed`` given, each item is sent its own seed derived from ``seed`` and the item's key
    (or its position when no keys are given): identical prompts then sample differently, yet a
    rerun reproduces them on servers that honour ``seed`` (vLLM does; OpenAI tries).
    ``max_tokens_param`` is ``"max_tokens"`` for most servers; newer OpenAI reasoning models
    want ``"max_completion_tokens"``.
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        *,
        backend: OpenAIBackend | None = None,
        max_tokens_param: str = "max_tokens",
        extra_body: Mapping[str, Any] | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(model, backend, options)
        self.max_tokens_param = max_tokens_param
        self.extra_body = dict(extra_body or {})

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        """One answer per conversation, in order; ``None`` for refusals and empty answers."""
        item_keys = self._check_keys(keys, len(conversations))
        requests: list[dict[str, Any]] = []
        estimates: list[int] = []
        for i, conversation in enumerate(conversations):
            body: dict[str, Any] = {
                "messages": [dict(m) for m in conversation],
                "temperature": temperature,
                "top_p": top_p,
                self.max_tokens_param: int(max_new_tokens),
            }
            if seed is not None:
                body["seed"] = _derive_seed(seed, item_keys[i] if item_keys[i] is not None else f"#{i}")
            body.update(self.extra_body)
            requests.append(body)
            estimates.append(_conversation_tokens(conversation) + int(max_new_tokens))
        return self._run_chat(requests, item_keys, estimates)
