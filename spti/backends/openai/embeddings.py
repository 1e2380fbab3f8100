"""Text embeddings over ``/embeddings``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Unpack

import numpy as np

from spti.backends.openai.backend import ConnectionOptions, OpenAIBackend
from spti.backends.openai.helpers import (
    _approx_tokens,
    _usage_numbers,
)
from spti.backends.openai.provider import _Provider
from spti.backends.openai.runtime import _Job, _Parsed
from spti.backends.request_cache import cache_key
from spti.errors import BackendError, SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI


class OpenAITextEmbedder(_Provider):
    """Text embeddings (``/embeddings``), ``batch_size`` texts per request, float32 (n × d).

    Each text is cached on its own, so a resumed run re-sends only texts never embedded.
    ``dimensions`` is passed to models that accept it (text-embedding-3-*). Unlike text answers,
    a vector cannot be ``None``: an embedding request that keeps failing raises.
    """

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        backend: OpenAIBackend | None = None,
        batch_size: int = 64,
        dimensions: int | None = None,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(model, backend, options)
        if batch_size < 1:
            raise SptiError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.dimensions = dimensions
        self._dim: int | None = dimensions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 array (len(texts) × d), rows in input order."""
        endpoint = "embeddings"
        # The API rejects empty strings; a space embeds as "nothing" just as well.
        inputs = [t if t else " " for t in (str(x) for x in texts)]
        params = {"dimensions": self.dimensions, "encoding_format": "float"}
        keys = [cache_key(endpoint=endpoint, model=self.model, request={"input": t, **params}) for t in inputs]
        cached = self.backend._cached(keys, self.model)
        vectors: dict[str, np.ndarray] = {k: np.frombuffer(v, dtype="<f4") for k, v in cached.items()}
        missing = list(dict.fromkeys(k for k in keys if k not in vectors))
        text_of = dict(zip(keys, inputs, strict=True))
        jobs: list[_Job] = []
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            chunk_texts = [text_of[k] for k in chunk]

            async def send(client: AsyncOpenAI, _: Any, chunk_texts: list[str] = chunk_texts) -> Any:
                body: dict[str, Any] = {"model": self.model, "input": chunk_texts, "encoding_format": "float"}
                if self.dimensions is not None:
                    body["dimensions"] = self.dimensions
                return await client.post("/embeddings", cast_to=self._embedding_type, body=body)

            def parse(response: Any, n: int = len(chunk)) -> _Parsed:
                prompt_tokens, _ = _usage_numbers(getattr(response, "usage", None))
                rows = sorted(response.data, key=lambda d: d.index)
                if len(rows) != n:
                    return _Parsed(None, prompt_tokens, problem="empty")
                return _Parsed([np.asarray(r.embedding, dtype=np.float32) for r in rows], prompt_tokens)

            def store(parsed: _Parsed, chunk: list[str] = chunk) -> None:
                share = _Parsed(None, parsed.prompt_tokens // max(1, len(chunk)))
                for k, v in zip(chunk, parsed.value, strict=True):
                    vectors[k] = v
                    self.backend._store(k, endpoint, self.model, v.astype("<f4").tobytes(), share)

            jobs.append(
                _Job(
                    label=f"embeddings[{start}:{start + len(chunk)}]",
                    estimate=sum(_approx_tokens(t) for t in chunk_texts),
                    send=send,
                    parse=parse,
                    store=store,
                )
            )
        outcomes = self.backend._run(jobs, endpoint=endpoint, model=self.model, items=len(jobs))
        if any(not o.ok for o in outcomes):
            bad = sum(1 for o in outcomes if not o.ok)
            raise BackendError(
                f"{bad} of {len(jobs)} embedding requests to {self.endpoint_description()} got no usable answer; "
                "the vectors received are cached, re-run to resume"
            )
        if not inputs:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        dims = {vectors[k].shape[0] for k in keys}
        if len(dims) != 1:
            raise BackendError(f"{self.endpoint_description()} returned embeddings of mixed sizes {sorted(dims)}")
        self._dim = dims.pop()
        return np.stack([vectors[k] for k in keys]).astype(np.float32, copy=False)
