"""Images over ``/images/generations`` and ``/images/edits``."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Unpack

from spti.backends.openai.backend import ConnectionOptions, OpenAIBackend
from spti.backends.openai.helpers import (
    _decode_image,
    _encode_image,
    _pixel_digest,
    _usage_numbers,
    log,
)
from spti.backends.openai.provider import _Provider
from spti.backends.openai.runtime import _Job, _Parsed
from spti.backends.request_cache import cache_key
from spti.errors import BackendError, SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from PIL.Image import Image


class OpenAIImageGenerator(_Provider):
    """Text-to-image via ``/images/generations``; variations via ``/images/edits``.

    OpenAI's image API has no seed, step count, guidance or negative prompt: ``seeds`` still
    enter the cache key (so each sample is its own request), and with ``seed_param`` set (e.g.
    ``"seed"`` for servers that accept one) the seed is also sent. ``steps``, ``guidance``,
    ``negative_prompt`` and ``strength`` are ignored with a one-time warning. An image the
    provider's moderation rejects comes back as a mid-grey placeholder and is listed in
    :attr:`failures`. ``response_format="auto"`` sends ``b64_json``, except to gpt-image models
    (which always return base64 and reject the field); ``None`` never sends it.
    """

    def __init__(
        self,
        model: str = "dall-e-2",
        *,
        backend: OpenAIBackend | None = None,
        response_format: str | None = "auto",
        seed_param: str | None = None,
        supports_edits: bool = True,
        quality: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(model, backend, options)
        if response_format == "auto":
            # gpt-image models always answer in base64 and reject the field; DALL·E and most
            # other servers default to URLs unless asked for b64_json.
            response_format = None if model.startswith("gpt-image") else "b64_json"
        self.response_format = response_format
        self.seed_param = seed_param
        self.supports_edits = supports_edits
        self.quality = quality
        self.extra_body = dict(extra_body or {})
        self._warned: set[str] = set()

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s is not supported by the OpenAI image API and is ignored", what)

    def _parse_image(self, response: Any) -> _Parsed:
        prompt_tokens, completion_tokens = _usage_numbers(getattr(response, "usage", None))
        data = getattr(response, "data", None) or []
        if not data or not getattr(data[0], "b64_json", None):
            if data and getattr(data[0], "url", None):
                raise BackendError(
                    f"{self.endpoint_description()} returned an image URL; use response_format='b64_json'"
                )
            return _Parsed(None, prompt_tokens, completion_tokens, problem="empty")
        return _Parsed(base64.b64decode(data[0].b64_json), prompt_tokens, completion_tokens, images=1)

    def _placeholder(self, width: int, height: int) -> Image:
        from PIL import Image as PILImage

        return PILImage.new("RGB", (width, height), (128, 128, 128))

    def _run_images(
        self,
        endpoint: str,
        key_docs: Sequence[dict[str, Any]],
        senders: Sequence[tuple[Callable[[AsyncOpenAI, Any], Awaitable[Any]], Callable[[], Awaitable[Any]] | None]],
        labels: Sequence[str],
        sizes: Sequence[tuple[int, int]],
    ) -> list[Image]:
        keys = [cache_key(endpoint=endpoint, model=self.model, request=doc) for doc in key_docs]
        cached = self.backend._cached(keys, self.model)
        blobs: dict[str, bytes] = dict(cached)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in cached:
                first.setdefault(k, i)
        jobs = []
        for k, i in first.items():

            def store(parsed: _Parsed, k: str = k) -> None:
                blobs[k] = parsed.value
                self.backend._store(k, endpoint, self.model, parsed.value, parsed)

            send, prepare = senders[i]
            jobs.append(_Job(labels[i], 1000, send, self._parse_image, store, prepare))
        self.backend._run(jobs, endpoint=endpoint, model=self.model, items=len(jobs))
        out: list[Image] = []
        for k, (width, height) in zip(keys, sizes, strict=True):
            if k not in blobs:
                out.append(self._placeholder(width, height))
                continue
            img = _decode_image(blobs[k])
            if img.size != (width, height):
                from PIL import Image as PILImage

                img = img.resize((width, height), PILImage.Resampling.LANCZOS)
            out.append(img)
        return out

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
    ) -> list[Image]:
        """One RGB image per prompt at ``width``×``height`` (resized if the server returns another size)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise SptiError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        for name, value in (("steps", steps), ("guidance", guidance), ("negative_prompt", negative_prompt)):
            if value is not None:
                self._warn_once(name)
        size = f"{width}x{height}"
        docs, senders, labels = [], [], []
        for i, prompt in enumerate(prompts):
            seed = None if seeds is None else int(seeds[i])
            body: dict[str, Any] = {"prompt": prompt, "size": size, "n": 1}
            if self.response_format is not None:
                body["response_format"] = self.response_format
            if self.quality is not None:
                body["quality"] = self.quality
            extra = dict(self.extra_body)
            if self.seed_param is not None and seed is not None:
                extra[self.seed_param] = seed
            if extra:
                body["extra_body"] = extra

            async def send(client: AsyncOpenAI, _: Any, body: dict[str, Any] = body) -> Any:
                return await client.images.generate(model=self.model, **body)

            docs.append({**body, "seed": seed})
            senders.append((send, None))
            labels.append(f"image #{i} seed={seed}")
        return self._run_images("images/generations", docs, senders, labels, [(width, height)] * len(prompts))

    def vary(
        self,
        images: Sequence[Image],
        prompts: Sequence[str],
        *,
        strength: float = 0.5,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[Image]:
        """Image-to-image through ``/images/edits`` (one image per request, output at the input's size)."""
        if not self.supports_edits:
            raise SptiError(
                f"{self.endpoint_description()} has no image-to-image endpoint; "
                "use a local image generator for variations"
            )
        if len(images) != len(prompts) or (seeds is not None and len(seeds) != len(prompts)):
            raise SptiError("vary() needs one prompt (and one seed, if given) per image")
        for name, value in (("strength", None if strength == 0.5 else strength), ("steps", steps)):
            if value is not None:
                self._warn_once(name)
        if guidance is not None:
            self._warn_once("guidance")
        docs, senders, labels, sizes = [], [], [], []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            seed = None if seeds is None else int(seeds[i])
            size = f"{image.size[0]}x{image.size[1]}"
            fields: dict[str, Any] = {"prompt": prompt, "size": size, "n": 1}
            if self.response_format is not None:
                fields["response_format"] = self.response_format
            extra = dict(self.extra_body)
            if self.seed_param is not None and seed is not None:
                extra[self.seed_param] = str(seed)

            async def encode(image: Image = image) -> bytes:
                return await asyncio.to_thread(_encode_image, image, "png", None)

            async def send(
                client: AsyncOpenAI, png: bytes, fields: dict[str, Any] = fields, extra: dict[str, Any] = extra
            ) -> Any:
                kwargs: dict[str, Any] = dict(fields)
                if extra:
                    kwargs["extra_body"] = extra
                return await client.images.edit(model=self.model, image=("image.png", png, "image/png"), **kwargs)

            docs.append({**fields, "image": _pixel_digest(image), "seed": seed, "strength": strength, "extra": extra})
            senders.append((send, encode))
            labels.append(f"vary #{i} seed={seed}")
            sizes.append(image.size)
        return self._run_images("images/edits", docs, senders, labels, sizes)
