"""OpenAI-compatible providers: captions, chat, text embeddings and images over HTTP.

Works with any server that speaks the OpenAI REST API (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM,
…): give ``base_url`` and ``api_key``, or set ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.

Why it is built this way:
- The pipeline's interfaces are synchronous (batch in, list out); HTTP throughput needs many
  requests in flight. Each :class:`OpenAIBackend` owns one ``AsyncOpenAI`` client and one event
  loop on a background thread, kept for the object's life, so connections are pooled and reused
  across calls (``asyncio.run`` per call would rebuild the pool every batch).
- The SDK's own retries are off (``max_retries=0``): retries here honour ``Retry-After`` /
  ``retry-after-ms``, back off with jitter, share one concurrency bound and rate limiter, and
  are counted, so the usage report states what was actually sent.
- Errors that retrying cannot fix (400, 401, 403, 404, 422, exhausted quota) stop the batch with
  one :class:`~spti.errors.BackendError` line naming status, endpoint, model and the server's
  message. Refusals and empty answers are retried a few times, then returned as ``None`` and
  listed in :attr:`OpenAIBackend.failures`: one stubborn item never ends a run.
- Every successful answer is written to an SQLite :class:`~spti.backends.request_cache.RequestCache`
  the moment it arrives, keyed by a hash of the request and the caller's item key. A resumed run
  (or a second Ctrl-C-interrupted attempt) sends no request it already paid for. On Ctrl-C the
  requests already in flight are allowed to finish (``drain_timeout``) so their answers are kept.
- Threat model: private images (captioning) and private captions (embedding, if this embedder is
  used for them) leave the machine and go to ``base_url``. :meth:`OpenAIBackend.endpoint_description`
  names it so the CLI can say so before the first request. API keys never reach the cache,
  logs, reprs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypedDict, Unpack
from urllib.parse import urlsplit

import numpy as np

from spti.backends.base import DEFAULT_CAPTION_PROMPT, Conversation
from spti.backends.request_cache import RequestCache, cache_key
from spti.errors import BackendError, SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from PIL.Image import Image

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_PRICES",
    "ConnectionOptions",
    "ModelPrice",
    "OpenAIBackend",
    "OpenAICaptioner",
    "OpenAIImageGenerator",
    "OpenAITextEmbedder",
    "OpenAITextGenerator",
    "RequestFailure",
    "describe_endpoint",
    "resolve_base_url",
]

log = logging.getLogger("spti.backends.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Status codes that a later attempt can succeed on. 408/409 are what OpenAI's own SDK retries.
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# 400 codes that mean "the provider's moderation said no to this item", not "the request is wrong".
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "moderation_blocked"})
_SNAPSHOT = re.compile(r"(.+)-\d{4}-\d{2}-\d{2}")
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+)")


# ---------------------------------------------------------------------------------------------
# Prices and usage


@dataclass(frozen=True)
class ModelPrice:
    """USD per one million input / output tokens, and per generated image where billed per image."""

    input_per_million: float
    output_per_million: float = 0.0
    per_image: float = 0.0


DEFAULT_PRICES: dict[str, ModelPrice] = {
    # Public list prices (USD) when this table was written; pass ``prices=`` to override.
    "gpt-4o-mini": ModelPrice(0.15, 0.60),
    "gpt-4o": ModelPrice(2.50, 10.00),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60),
    "gpt-4.1": ModelPrice(2.00, 8.00),
    "text-embedding-3-small": ModelPrice(0.02),
    "text-embedding-3-large": ModelPrice(0.13),
    "text-embedding-ada-002": ModelPrice(0.10),
    # gpt-image-1 bills tokens: text input 5, image input 10, image output 40 (edits are
    # under-counted here at the text-input price).
    "gpt-image-1": ModelPrice(5.00, 40.00),
    "dall-e-2": ModelPrice(0.0, 0.0, per_image=0.020),
    "dall-e-3": ModelPrice(0.0, 0.0, per_image=0.040),
}


def _price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """Exact name, else the entry that ``model`` extends with a snapshot date
    (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``); anything else is unpriced, not guessed."""
    if model in prices:
        return prices[model]
    snapshot = _SNAPSHOT.fullmatch(model)
    return prices.get(snapshot.group(1)) if snapshot else None


@dataclass
class _ModelUsage:
    requests: int = 0
    succeeded: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0


@dataclass(frozen=True)
class RequestFailure:
    """An item that got no answer: which item, why (``refusal``, ``empty``, ``content_filter``,
    ``policy``, ``transient``), and a short detail with no private content."""

    endpoint: str
    model: str
    item: str
    reason: str
    detail: str = ""


class _UsageLedger:
    """Thread-safe counters: updated on the event-loop thread, read from the caller's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, _ModelUsage] = {}

    def add(self, model: str, **counts: int) -> None:
        with self._lock:
            usage = self._by_model.setdefault(model, _ModelUsage())
            for name, value in counts.items():
                setattr(usage, name, getattr(usage, name) + int(value))

    def snapshot(self) -> dict[str, _ModelUsage]:
        with self._lock:
            return {m: _ModelUsage(**vars(u)) for m, u in self._by_model.items()}


# ---------------------------------------------------------------------------------------------
# Small helpers


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$OPENAI_BASE_URL``, else the OpenAI API; checked to be http(s)."""
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SptiError(f"base_url {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return url


def describe_endpoint(base_url: str | None = None) -> str:
    """The URL private data would be sent to (as :func:`resolve_base_url` picks it), without any
    user:password part, for the "private images are sent to …" notice. Needs no network, no key
    and not the ``openai`` package."""
    parts = urlsplit(resolve_base_url(base_url))
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms`` first, then ``Retry-After``
    (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _derive_seed(seed: int, item: str) -> int:
    """One seed per item, so identical prompts in a batch sample differently yet reproducibly."""
    digest = hashlib.sha256(f"{seed}/{item}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _pixel_digest(image: Image) -> str:
    """Hash of the pixels (not of one PNG encoding), so a new Pillow never invalidates the cache."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _encode_image(image: Image, fmt: str, max_side: int | None) -> bytes:
    from PIL import Image as PILImage

    img = image if image.mode == "RGB" else image.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _decode_image(data: bytes) -> Image:
    from PIL import Image as PILImage

    img = PILImage.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _conversation_tokens(conversation: Conversation) -> int:
    total = 0
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            total += _approx_tokens(content) + 4
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "text":
                    total += _approx_tokens(str(part.get("text", "")))
                else:
                    total += 765
    return total


def _usage_numbers(usage: Any) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    prompt = getattr(usage, "prompt_tokens", None) or getattr(usage, "input_tokens", None) or 0
    completion = getattr(usage, "completion_tokens", None) or getattr(usage, "output_tokens", None) or 0
    return int(prompt), int(completion)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# The job machinery (everything below runs on the backend's event-loop thread)


@dataclass
class _Parsed:
    value: Any
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    problem: str | None = None  # "refusal" | "empty" | "content_filter": retried, then None


@dataclass
class _Job:
    """One HTTP request to make (possibly answering several batch items)."""

    label: str
    estimate: int
    send: Callable[[AsyncOpenAI, Any], Awaitable[Any]]
    """Makes the request; its second argument is what ``prepare`` returned (or ``None``)."""
    parse: Callable[[Any], _Parsed]
    store: Callable[[_Parsed], None] | None = None
    prepare: Callable[[], Awaitable[Any]] | None = None
    """Builds a large payload (an encoded image) only when the job runs, so a batch of
    thousands never holds thousands of encodings; it is dropped when the job ends."""


@dataclass
class _Outcome:
    ok: bool
    value: Any = None
    reason: str = ""


class _Control:
    """Per-batch state: stop flag (fatal error or Ctrl-C), first fatal error, transient failures."""

    def __init__(self) -> None:
        self.stop_event = asyncio.Event()
        self.fatal: BaseException | None = None
        self.transient_failures = 0
        self.consecutive_transient = 0
        self.last_transient = ""
        self.total = 0

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep that ends early when the batch is stopping."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)


class _TokenBucket:
    """Reservation-style token bucket: ``reserve`` takes tokens now (the level may go negative)
    and returns how long to wait, so waiters are served in order and bursts stay within one
    second's worth of the per-minute limit."""

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise SptiError(f"rate limits must be positive, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def reserve(self, amount: float) -> float:
        self._refill()
        self.level -= amount
        return max(0.0, -self.level / self.rate)

    def refund(self, amount: float) -> None:
        """Give back (or, negative, take more) once the true token count is known."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class _LoopThread:
    """A persistent event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="spti-openai-loop", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def _shutdown(loop_thread: _LoopThread, client: Any) -> None:
    if loop_thread.thread.is_alive():
        with contextlib.suppress(BaseException):
            _wait(loop_thread.submit(client.close()), timeout=5)
    loop_thread.stop()


def _wait(future: concurrent.futures.Future[Any], timeout: float | None = None) -> Any:
    """``future.result()`` that a Ctrl-C can interrupt promptly (a bare blocking wait may not
    wake on a signal delivered to another thread)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
        done, _ = concurrent.futures.wait([future], timeout=step)
        if done:
            return future.result()
        if deadline is not None and time.monotonic() >= deadline:
            raise concurrent.futures.TimeoutError


# ---------------------------------------------------------------------------------------------
# The backend: client, loop, limits, retries, cache, usage


class ConnectionOptions(TypedDict, total=False):
    """Settings of one :class:`OpenAIBackend`; every provider class accepts them as keywords."""

    base_url: str | None
    """Server root including ``/v1``; default ``$OPENAI_BASE_URL`` or the OpenAI API."""
    api_key: str | None
    """Default ``$OPENAI_API_KEY``; servers other than api.openai.com may need none."""
    max_concurrency: int
    """Requests in flight at once (default 32)."""
    requests_per_minute: float | None
    tokens_per_minute: float | None
    max_retries: int
    """Retries of one request after 429/5xx/timeouts/connection errors (default 6)."""
    empty_retries: int
    """Retries after a refusal or empty answer before the item is given up as ``None`` (default 2)."""
    timeout: float
    """Seconds per HTTP request before it counts as a timeout (and is retried); default 120."""
    backoff_initial: float
    backoff_max: float
    max_retry_after: float
    """Longest ``Retry-After`` wait honoured (longer ones are capped); default 120 s."""
    max_failure_fraction: float
    """A batch in which more items than this fraction fail after retries raises (default 0.1)."""
    drain_timeout: float
    """On Ctrl-C, seconds to let requests in flight finish so their answers are cached."""
    cache_path: str | Path | None
    """Request cache file (``RUN/private/requests.sqlite``: it holds private answers); ``None`` caches nothing."""
    cache: RequestCache | None
    """An open :class:`RequestCache` to share instead of ``cache_path``."""
    prices: Mapping[str, ModelPrice] | None
    """Price table merged over :data:`DEFAULT_PRICES`."""
    http_client: Literal["auto", "aiohttp", "httpx"]
    """HTTP transport under the SDK: ``auto`` takes aiohttp when installed (faster), else httpx."""


class OpenAIBackend:
    """One connection to an OpenAI-compatible server, shared by the provider classes built on it.

    Owns the ``AsyncOpenAI`` client, the event-loop thread, the concurrency bound, the rate
    limiters, the request cache, the usage ledger and the :attr:`failures` list. Providers that
    share a backend share all of these (one limit for one account). Call :meth:`close` (or use
    it as a context manager) to release the connections; a closed backend cannot be reused.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 6,
        empty_retries: int = 2,
        timeout: float = 120.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        max_failure_fraction: float = 0.1,
        drain_timeout: float = 60.0,
        cache_path: str | Path | None = None,
        cache: RequestCache | None = None,
        prices: Mapping[str, ModelPrice] | None = None,
        http_client: Literal["auto", "aiohttp", "httpx"] = "auto",
    ) -> None:
        if max_concurrency < 1:
            raise SptiError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0 or empty_retries < 0:
            raise SptiError("max_retries and empty_retries must be >= 0")
        self.base_url = resolve_base_url(base_url)
        self.host = urlsplit(self.base_url).hostname or ""
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.host == "api.openai.com":
                raise SptiError(
                    "no API key for api.openai.com: set OPENAI_API_KEY (or pass api_key=...), "
                    "or point OPENAI_BASE_URL at a local OpenAI-compatible server"
                )
            key = "not-needed"  # vLLM, llama.cpp and Ollama accept any key when run without one
        self._secret = key
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.empty_retries = int(empty_retries)
        self.timeout = float(timeout)
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.max_failure_fraction = float(max_failure_fraction)
        self.drain_timeout = float(drain_timeout)
        self.prices: dict[str, ModelPrice] = {**DEFAULT_PRICES, **dict(prices or {})}
        if http_client not in ("auto", "aiohttp", "httpx"):
            raise SptiError(f"http_client must be auto, aiohttp or httpx, got {http_client!r}")
        self.http_client = http_client
        self.http_transport = "httpx"
        self._rpm = _TokenBucket(requests_per_minute) if requests_per_minute else None
        self._tpm = _TokenBucket(tokens_per_minute) if tokens_per_minute else None
        if cache is not None and cache_path is not None:
            raise SptiError("pass either cache= or cache_path=, not both")
        self._owns_cache = cache is None
        self.cache: RequestCache | None = RequestCache(cache_path) if cache_path is not None else cache
        self.failures: list[RequestFailure] = []
        self._failures_lock = threading.Lock()
        self._ledger = _UsageLedger()
        self._random = random.Random()
        self._closed = False

        try:
            import openai
        except ImportError as exc:
            raise SptiError("the openai provider needs the 'openai' package: pip install 'spti[openai]'") from exc
        self._openai = openai
        self._loop_thread = _LoopThread()
        try:
            self._semaphore: asyncio.Semaphore = _wait(self._loop_thread.submit(self._make_semaphore()))
            self._client: AsyncOpenAI = _wait(self._loop_thread.submit(self._make_client()))
        except BaseException:
            self._loop_thread.stop()
            raise
        # Closes the connections even when the owner forgets to (and at interpreter exit), so
        # the HTTP library does not complain about unclosed sessions.
        self._finalizer = weakref.finalize(self, _shutdown, self._loop_thread, self._client)

    async def _make_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.max_concurrency)

    async def _make_client(self) -> AsyncOpenAI:
        http_client, self.http_transport = self._make_http_client()
        kwargs: dict[str, Any] = {} if http_client is None else {"http_client": http_client}
        return self._openai.AsyncOpenAI(
            api_key=self._secret, base_url=self.base_url, max_retries=0, timeout=self.timeout, **kwargs
        )

    def _make_http_client(self) -> tuple[Any, str]:
        """The SDK's aiohttp transport when available (measured at about twice the requests/s
        of its default httpx pool, whose per-request cost grows with the pool size), with a
        pool as large as the concurrency bound; else the SDK's default client."""
        openai = self._openai
        limits = None
        with contextlib.suppress(Exception):
            # The Limits class of whichever httpx package this SDK version uses.
            limits_type = type(openai._constants.DEFAULT_CONNECTION_LIMITS)
            limits = limits_type(
                max_connections=max(100, 2 * self.max_concurrency),
                max_keepalive_connections=max(20, self.max_concurrency),
            )
        kwargs: dict[str, Any] = {"timeout": self.timeout}
        if limits is not None:
            kwargs["limits"] = limits
        if self.http_client in ("auto", "aiohttp"):
            try:
                return openai.DefaultAioHttpClient(**kwargs), "aiohttp"
            except Exception as exc:  # older SDK, or aiohttp not installed
                if self.http_client == "aiohttp":
                    raise SptiError(
                        f"http_client='aiohttp' is not available ({exc}); pip install 'openai[aiohttp]'"
                    ) from exc
        try:
            return openai.DefaultAsyncHttpxClient(**kwargs), "httpx"
        except Exception:
            return None, "httpx"

    # -- description, usage, lifecycle ---------------------------------------------------------

    def endpoint_description(self, model: str | None = None) -> str:
        """Where requests go, e.g. ``https://api.openai.com/v1 (model gpt-4o-mini)``; credentials
        in the URL are dropped. The pipeline prints it before private data is first sent."""
        url = describe_endpoint(self.base_url)
        return url if model is None else f"{url} (model {model})"

    @property
    def is_local(self) -> bool:
        """True when the server runs on this machine (private data does not leave it)."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def usage(self) -> dict[str, Any]:
        """Requests, tokens, cache hits, failures and estimated cost (USD), total and per model.

        ``cost_known`` is false when a model used has no entry in the price table (its cost
        counts as 0 in ``cost_usd``; the models are listed in ``unpriced_models``)."""
        by_model: dict[str, dict[str, Any]] = {}
        totals = _ModelUsage()
        cost = 0.0
        unpriced: list[str] = []
        for model, u in sorted(self._ledger.snapshot().items()):
            price = _price_for(model, self.prices)
            if price is None:
                model_cost = 0.0
                if u.requests:
                    unpriced.append(model)
            else:
                model_cost = (
                    u.prompt_tokens * price.input_per_million / 1e6
                    + u.completion_tokens * price.output_per_million / 1e6
                    + u.images * price.per_image
                )
            cost += model_cost
            by_model[model] = {**vars(u), "cost_usd": model_cost, "cost_known": price is not None}
            for name, value in vars(u).items():
                setattr(totals, name, getattr(totals, name) + value)
        return {
            "endpoint": self.endpoint_description(),
            **vars(totals),
            "cost_usd": cost,
            "cost_known": not unpriced,
            "unpriced_models": unpriced,
            "by_model": by_model,
        }

    report = usage

    def list_models(self) -> list[str]:
        """Model ids the server offers (``GET /models``): a cheap check of URL and key."""

        async def fetch() -> list[str]:
            try:
                page = await self._client.models.list()
            except self._openai.APIStatusError as exc:
                raise self._fatal_error(exc, "models", "-") from None
            except self._openai.APIConnectionError as exc:
                raise BackendError(f"cannot reach {self.endpoint_description()}: {_one_line(str(exc))}") from None
            return [m.id for m in page.data]

        return _wait(self._loop_thread.submit(fetch()))

    def close(self) -> None:
        """Close the HTTP connections, stop the loop thread and (if opened here) the cache."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if self.cache is not None and self._owns_cache:
            self.cache.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.endpoint_description()!r}, max_concurrency={self.max_concurrency}, "
            f"cache={self.cache.path if self.cache else None!r})"
        )

    # -- errors ------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return _KEY_PATTERN.sub("***", text)

    def _server_message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        message = None
        if isinstance(body, Mapping):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, Mapping) else inner
        return self._scrub(_one_line(str(message or getattr(exc, "message", "") or exc)))

    def _fatal_error(self, exc: Any, endpoint: str, model: str, hint: str = "") -> BackendError:
        status = getattr(exc, "status_code", "?")
        text = (
            f"POST {describe_endpoint(self.base_url)}/{endpoint} (model {model!r}) failed with "
            f"HTTP {status}: {self._server_message(exc)}"
        )
        if status == 401:
            text += " (check OPENAI_API_KEY / api_key)"
        elif status == 404 and endpoint in ("chat/completions", "embeddings", "images/generations"):
            text += " (check the model name and base_url)"
        return BackendError(text + hint)

    def _record_failure(self, failure: RequestFailure) -> None:
        with self._failures_lock:
            self.failures.append(failure)
        self._ledger.add(failure.model, failures=1)
        log.warning("no answer for %s (%s): %s", failure.item, failure.reason, failure.detail)

    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max, self.backoff_initial * 2.0**attempt)
        return base * (0.5 + 0.5 * self._random.random())

    # -- running batches ---------------------------------------------------------------------------

    def _run(self, jobs: Sequence[_Job], *, endpoint: str, model: str, items: int) -> list[_Outcome]:
        """Run ``jobs`` (blocking the caller); results in job order."""
        if self._closed:
            raise SptiError("this OpenAI backend was closed; create a new one")
        if not jobs:
            return []
        control_box: list[_Control] = []
        future = self._loop_thread.submit(self._run_all(jobs, endpoint, model, items, control_box))
        try:
            return _wait(future)
        except KeyboardInterrupt:
            if control_box:
                self._loop_thread.loop.call_soon_threadsafe(control_box[0].stop_event.set)
            log.warning(
                "interrupted: letting requests in flight finish (up to %.0f s) so their answers are cached; "
                "press Ctrl-C again to abandon them",
                self.drain_timeout,
            )
            with contextlib.suppress(BaseException):
                _wait(future, timeout=self.drain_timeout)
            if not future.done():
                future.cancel()
            raise

    async def _run_all(
        self, jobs: Sequence[_Job], endpoint: str, model: str, items: int, control_box: list[_Control]
    ) -> list[_Outcome]:
        control = _Control()
        control.total = len(jobs)
        control_box.append(control)
        results: list[_Outcome] = [_Outcome(False, reason="not run")] * len(jobs)
        order = iter(range(len(jobs)))

        async def worker() -> None:
            for i in order:  # one shared iterator: each job is taken exactly once
                if control.stopping:
                    return
                try:
                    results[i] = await self._run_one(jobs[i], endpoint, model, control)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # BackendError, or a bug: stop admitting, drain, re-raise
                    if control.fatal is None:
                        control.fatal = exc
                    control.stop_event.set()
                    return

        # Twice the in-flight bound, so items backing off do not idle the connection slots.
        n_workers = min(len(jobs), 2 * self.max_concurrency)
        await asyncio.gather(*(worker() for _ in range(n_workers)))
        if control.fatal is not None:
            raise control.fatal
        if control.transient_failures > self.max_failure_fraction * items:
            raise self._too_many_failures(control, len(jobs), model)
        return results

    def _too_many_failures(self, control: _Control, total: int, model: str) -> BackendError:
        return BackendError(
            f"{control.transient_failures} of {total} requests to {self.endpoint_description(model)} "
            f"failed after {self.max_retries} retries (last: {control.last_transient}); answers received "
            "so far are cached, re-run to resume"
        )

    async def _run_one(self, job: _Job, endpoint: str, model: str, control: _Control) -> _Outcome:
        payload = await job.prepare() if job.prepare is not None else None
        attempt = 0  # transient errors so far
        problems = 0  # refusals / empty answers so far
        while True:
            error: BaseException | None = None
            parsed: _Parsed | None = None
            async with self._semaphore:
                if control.stopping:
                    return _Outcome(False, reason="not run")
                await self._throttle(job.estimate, control)
                if control.stopping:
                    return _Outcome(False, reason="not run")
                self._ledger.add(model, requests=1)
                try:
                    parsed = job.parse(await job.send(self._client, payload))
                except self._openai.APIError as exc:
                    error = exc
            if parsed is not None:
                self._ledger.add(
                    model,
                    prompt_tokens=parsed.prompt_tokens,
                    completion_tokens=parsed.completion_tokens,
                    images=parsed.images,
                )
                if self._tpm is not None and (parsed.prompt_tokens or parsed.completion_tokens):
                    self._tpm.refund(job.estimate - parsed.prompt_tokens - parsed.completion_tokens)
                control.consecutive_transient = 0
                if parsed.problem is None:
                    self._ledger.add(model, succeeded=1)
                    if job.store is not None:
                        job.store(parsed)
                    return _Outcome(True, parsed.value)
                problems += 1
                if problems > self.empty_retries:
                    self._record_failure(
                        RequestFailure(endpoint, model, job.label, parsed.problem, f"after {problems} attempts")
                    )
                    return _Outcome(False, reason=parsed.problem)
                self._ledger.add(model, retries=1)
                await control.sleep(self._backoff(0))
                continue

            assert error is not None
            delay = self._classify(error, job, endpoint, model)
            if delay is None:  # an item-level refusal from moderation; already recorded
                return _Outcome(False, reason="policy")
            attempt += 1
            if attempt > self.max_retries:
                detail = self._describe_transient(error)
                control.transient_failures += 1
                control.consecutive_transient += 1
                control.last_transient = detail
                self._record_failure(RequestFailure(endpoint, model, job.label, "transient", detail))
                # A server that is down would otherwise cost every item its full retry schedule.
                if control.consecutive_transient >= max(8, self.max_concurrency) and control.fatal is None:
                    control.fatal = self._too_many_failures(control, control.total, model)
                    control.stop_event.set()
                return _Outcome(False, reason="transient")
            self._ledger.add(model, retries=1)
            log.debug("retrying %s in %.2f s after %s", job.label, delay, self._describe_transient(error))
            await control.sleep(delay)

    async def _throttle(self, estimate: int, control: _Control) -> None:
        wait = 0.0
        if self._rpm is not None:
            wait = max(wait, self._rpm.reserve(1))
        if self._tpm is not None:
            wait = max(wait, self._tpm.reserve(max(1, estimate)))
        await control.sleep(wait)

    def _describe_transient(self, error: BaseException) -> str:
        status = getattr(error, "status_code", None)
        kind = f"HTTP {status}" if status is not None else type(error).__name__
        return self._scrub(_one_line(f"{kind}: {self._server_message(error)}", 200))

    def _classify(self, error: BaseException, job: _Job, endpoint: str, model: str) -> float | None:
        """Seconds to wait before retrying, ``None`` for an item refused by moderation; raises
        :class:`BackendError` for errors a retry cannot fix."""
        openai = self._openai
        if isinstance(error, openai.APIStatusError):
            status = int(error.status_code)
            code = getattr(error, "code", None)
            if status == 429 and code == "insufficient_quota":
                raise self._fatal_error(error, endpoint, model, " (the account is out of credit)")
            if status in _RETRYABLE_STATUS or status >= 500:
                hinted = _retry_after(error.response.headers if error.response is not None else None)
                if hinted is not None:
                    # A little jitter on top, never below what the server asked for.
                    return min(hinted, self.max_retry_after) * (1.0 + 0.1 * self._random.random())
                return self._backoff(0 if status == 429 else 1)
            if status == 400 and code in _POLICY_CODES:
                self._record_failure(RequestFailure(endpoint, model, job.label, "policy", self._server_message(error)))
                return None
            hint = ""
            if status == 404 and endpoint == "images/edits":
                hint = "; this server has no image-to-image endpoint: use a local image generator for variations"
            raise self._fatal_error(error, endpoint, model, hint)
        # Timeouts, refused or reset connections, malformed responses: all worth another try.
        return self._backoff(1)

    # -- cache helpers for providers ---------------------------------------------------------------

    def _cached(self, keys: Sequence[str], model: str) -> dict[str, bytes]:
        if self.cache is None:
            return {}
        hits = {k: v.value for k, v in self.cache.get_many(keys).items()}
        if hits:
            self._ledger.add(model, cache_hits=sum(1 for k in keys if k in hits))
        return hits

    def _store(self, key: str, endpoint: str, model: str, value: bytes, parsed: _Parsed) -> None:
        if self.cache is not None:
            usage = {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": parsed.completion_tokens}
            self.cache.put(key, endpoint=endpoint, model=model, value=value, usage=usage)


# ---------------------------------------------------------------------------------------------
# Providers


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
