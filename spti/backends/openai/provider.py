"""The shared base of the four providers: constructor, description, usage, and chat batches with cache look-up."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from spti.backends.openai.backend import OpenAIBackend
from spti.backends.openai.helpers import (
    _usage_numbers,
)
from spti.backends.openai.runtime import _Job, _Parsed
from spti.backends.openai.usage import RequestFailure
from spti.backends.request_cache import cache_key
from spti.errors import SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI


class _Provider:
    """Shared constructor: use ``backend=`` to share one connection, or pass connection options."""

    def __init__(self, model: str, backend: OpenAIBackend | None, options: Mapping[str, Any]) -> None:
        if backend is not None and options:
            raise SptiError(f"pass either backend= or connection options, not both (got {sorted(options)})")
        self.model = model
        self._owns_backend = backend is None
        self.backend = backend if backend is not None else OpenAIBackend(**options)

    @property
    def _completion_type(self) -> Any:
        from openai.types.chat import ChatCompletion

        return ChatCompletion

    @property
    def _embedding_type(self) -> Any:
        from openai.types import CreateEmbeddingResponse

        return CreateEmbeddingResponse

    def endpoint_description(self) -> str:
        """Where this provider sends its inputs, e.g. ``https://api.openai.com/v1 (model gpt-4o-mini)``."""
        return self.backend.endpoint_description(self.model)

    @property
    def failures(self) -> list[RequestFailure]:
        """Items that got no answer (shared by providers on the same backend)."""
        return self.backend.failures

    def usage(self) -> dict[str, Any]:
        """See :meth:`OpenAIBackend.usage` (totals cover every provider on the same backend)."""
        return self.backend.usage()

    report = usage

    def close(self) -> None:
        """Close the backend if this provider created it."""
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, endpoint={self.backend.endpoint_description()!r})"

    @staticmethod
    def _check_keys(keys: Sequence[str] | None, n: int) -> list[str | None]:
        if keys is None:
            return [None] * n
        if len(keys) != n:
            raise SptiError(f"got {len(keys)} keys for {n} items; pass one key per item")
        return list(keys)

    def _chat_parse(self, response: Any) -> _Parsed:
        prompt_tokens, completion_tokens = _usage_numbers(getattr(response, "usage", None))
        choices = getattr(response, "choices", None) or []
        problem: str | None = None
        text = ""
        if not choices:
            problem = "empty"
        else:
            choice = choices[0]
            message = choice.message
            content = message.content if message is not None else None
            if message is not None and getattr(message, "refusal", None):
                problem = "refusal"
            elif choice.finish_reason == "content_filter":
                problem = "content_filter"
            elif not content or not content.strip():
                problem = "empty"
            else:
                text = content.strip()
        return _Parsed(text, prompt_tokens, completion_tokens, problem=problem)

    def _run_chat(
        self,
        bodies: Sequence[dict[str, Any]],
        item_keys: Sequence[str | None],
        estimates: Sequence[int],
        *,
        key_docs: Sequence[Mapping[str, Any]] | None = None,
        messages: Sequence[Callable[[], Awaitable[list[dict[str, Any]]]]] | None = None,
    ) -> list[str | None]:
        """Chat completions with cache look-up and in-batch de-duplication.

        ``bodies`` are request bodies without ``model``; when ``messages`` is given, body ``i``
        lacks ``messages`` and ``messages[i]`` builds them when the request is about to be sent,
        and ``key_docs[i]`` stands in for the body in the cache key (an image by its pixel hash).
        """
        endpoint = "chat/completions"
        n = len(bodies)
        keys = [
            cache_key(
                endpoint=endpoint,
                model=self.model,
                request=key_docs[i] if key_docs is not None else bodies[i],
                item_key=item_keys[i],
            )
            for i in range(n)
        ]
        cached = self.backend._cached(keys, self.model)
        out: list[str | None] = [None] * n
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in cached:
                out[i] = json.loads(cached[k])["content"]
            else:
                first.setdefault(k, i)
        jobs: list[_Job] = []
        for k, i in first.items():

            async def send(client: AsyncOpenAI, built: Any, body: dict[str, Any] = bodies[i]) -> Any:
                # The SDK's generic ``post`` with our own plain-JSON body: it skips the SDK's
                # per-request parameter transformation, a large share of its CPU per request.
                payload = {"model": self.model, **body}
                if built is not None:
                    payload["messages"] = built
                return await client.post("/chat/completions", cast_to=self._completion_type, body=payload)

            def store(parsed: _Parsed, k: str = k) -> None:
                value = json.dumps({"content": parsed.value}).encode()
                self.backend._store(k, endpoint, self.model, value, parsed)

            label = item_keys[i] if item_keys[i] is not None else f"#{i}"
            prepare = messages[i] if messages is not None else None
            jobs.append(_Job(label, estimates[i], send, self._chat_parse, store, prepare))
        outcomes = self.backend._run(jobs, endpoint=endpoint, model=self.model, items=len(jobs))
        answers = {k: o.value if o.ok else None for k, o in zip(first, outcomes, strict=True)}
        for i, k in enumerate(keys):
            if k not in cached:
                out[i] = answers[k]
        return out
