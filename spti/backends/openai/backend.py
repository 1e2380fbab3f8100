"""The transport of the OpenAI-compatible providers: one client, loop, limits, retries, cache and usage.

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
- A backend may front a fleet of endpoints (replicas of one model, or several API keys):
  each has its own client, concurrency bound and rate limits; :mod:`.fleet` routes each request
  to the least-loaded endpoint, fails over on connection errors, timeouts and 5xx, and marks an
  endpoint that keeps failing down for a while. The cache and the usage ledger are shared.
- Threat model: private images (captioning) and private captions (embedding, if this embedder is
  used for them) leave the machine and go to ``base_url`` (every endpoint of a fleet).
  :meth:`OpenAIBackend.endpoint_description` names it so the CLI can say so before the first
  request. API keys never reach the cache, logs, reprs or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from urllib.parse import urlsplit

from spti.backends.openai.endpoints import Endpoint, parse_endpoints
from spti.backends.openai.fleet import _Fleet, _Replica
from spti.backends.openai.helpers import (
    _KEY_PATTERN,
    _POLICY_CODES,
    _RETRYABLE_STATUS,
    _one_line,
    _retry_after,
    describe_endpoint,
    log,
)
from spti.backends.openai.runtime import _Control, _Job, _LoopThread, _Outcome, _Parsed, _shutdown, _TokenBucket, _wait
from spti.backends.openai.usage import (
    DEFAULT_PRICES,
    ModelPrice,
    RequestFailure,
    _ModelUsage,
    _UsageLedger,
    price_for,
    price_model_usage,
)
from spti.backends.request_cache import RequestCache
from spti.errors import BackendError, SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI


def _labels(endpoints: Sequence[Endpoint]) -> list[str]:
    """Names of a fleet's endpoints in reports: ``name``, else the URL without credentials, with
    the key variable (or a number) added where several endpoints share a URL."""
    urls = [describe_endpoint(e.base_url) for e in endpoints]
    labels = []
    for i, (endpoint, url) in enumerate(zip(endpoints, urls, strict=True)):
        if endpoint.name:
            labels.append(endpoint.name)
        elif urls.count(url) > 1:
            labels.append(f"{url} [{endpoint.api_key_env or f'#{i + 1}'}]")
        else:
            labels.append(url)
    if len(set(labels)) != len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


class ConnectionOptions(TypedDict, total=False):
    """Settings of one :class:`OpenAIBackend`; every provider class accepts them as keywords."""

    base_url: str | None
    """Server root including ``/v1``; default ``$OPENAI_BASE_URL`` or the OpenAI API. Several
    comma-separated roots form a fleet sharing ``api_key`` and the limits."""
    endpoints: Sequence[Endpoint | Mapping[str, Any] | str] | None
    """A fleet with a key variable and limits per endpoint (instead of ``base_url``)."""
    api_key: str | None
    """Default ``$OPENAI_API_KEY``; servers other than api.openai.com may need none."""
    max_concurrency: int
    """Requests in flight at once (default 32), per endpoint of a fleet unless it sets its own."""
    requests_per_minute: float | None
    """Client-side limit, per endpoint unless it sets its own."""
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
    endpoint_down_after: int
    """Consecutive connection errors / timeouts / 5xx after which a fleet endpoint is marked down (3)."""
    endpoint_down_seconds: float
    """First down period of a fleet endpoint (5 s); doubles after each failed probe, up to 120 s."""


class OpenAIBackend:
    """One connection to an OpenAI-compatible server (or a fleet of them), shared by the provider
    classes built on it.

    Owns the ``AsyncOpenAI`` clients (one per endpoint), the event-loop thread, the concurrency
    bounds, the rate limiters, the request cache, the usage ledger and the :attr:`failures` list.
    Providers that share a backend share all of these (one limit for one account). Call
    :meth:`close` (or use it as a context manager) to release the connections; a closed backend
    cannot be reused.

    A fleet is given as ``endpoints=[Endpoint(...), ...]`` (or tables / URLs), or as ``base_url``
    with comma-separated URLs. Keyword limits (``max_concurrency``, ``requests_per_minute``,
    ``tokens_per_minute``) apply to each endpoint that sets none of its own.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        endpoints: Sequence[Endpoint | Mapping[str, Any] | str] | None = None,
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
        endpoint_down_after: int = 3,
        endpoint_down_seconds: float = 5.0,
    ) -> None:
        if max_concurrency < 1:
            raise SptiError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0 or empty_retries < 0:
            raise SptiError("max_retries and empty_retries must be >= 0")
        if endpoints is not None and base_url is not None:
            raise SptiError("pass either base_url= or endpoints=, not both")
        self.endpoints: list[Endpoint] = parse_endpoints(base_url, endpoints=endpoints)
        default_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        labels = _labels(self.endpoints)
        self._replicas: list[_Replica] = []
        for endpoint, label in zip(self.endpoints, labels, strict=True):
            key = endpoint.resolve_key(default_key)
            if not key:
                if urlsplit(endpoint.base_url).hostname == "api.openai.com":
                    raise SptiError(
                        "no API key for api.openai.com: set OPENAI_API_KEY (or pass api_key=...), "
                        "or point OPENAI_BASE_URL at a local OpenAI-compatible server"
                    )
                key = "not-needed"  # vLLM, llama.cpp and Ollama accept any key when run without one
            rpm = endpoint.requests_per_minute or requests_per_minute
            tpm = endpoint.tokens_per_minute or tokens_per_minute
            self._replicas.append(
                _Replica(
                    label=label,
                    base_url=endpoint.base_url,
                    secret=key,
                    key_env=endpoint.api_key_env,
                    max_concurrency=int(endpoint.max_concurrency or max_concurrency),
                    rpm=_TokenBucket(rpm) if rpm else None,
                    tpm=_TokenBucket(tpm) if tpm else None,
                )
            )
        self.base_url = ",".join(e.base_url for e in self.endpoints)
        self.host = urlsplit(self.endpoints[0].base_url).hostname or ""
        self._secrets = [r.secret for r in self._replicas]
        self.max_concurrency = sum(r.max_concurrency for r in self._replicas)
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
        self._fleet = _Fleet(
            self._replicas, down_after=endpoint_down_after, down_seconds=endpoint_down_seconds, max_down=120.0
        )
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
        clients: list[Any] = []
        try:
            for replica in self._replicas:
                replica.client = _wait(self._loop_thread.submit(self._make_client(replica)))
                clients.append(replica.client)
        except BaseException:
            _shutdown(self._loop_thread, clients)
            raise
        self.http_transport = self._replicas[0].transport
        self._client: AsyncOpenAI = clients[0]  # the first endpoint's client (the only one, usually)
        # Closes the connections even when the owner forgets to (and at interpreter exit), so
        # the HTTP library does not complain about unclosed sessions.
        self._finalizer = weakref.finalize(self, _shutdown, self._loop_thread, clients)

    async def _make_client(self, replica: _Replica) -> AsyncOpenAI:
        http_client, replica.transport = self._make_http_client(replica.max_concurrency)
        kwargs: dict[str, Any] = {} if http_client is None else {"http_client": http_client}
        return self._openai.AsyncOpenAI(
            api_key=replica.secret, base_url=replica.base_url, max_retries=0, timeout=self.timeout, **kwargs
        )

    def _make_http_client(self, concurrency: int) -> tuple[Any, str]:
        """The SDK's aiohttp transport when available (measured at about twice the requests/s
        of its default httpx pool, whose per-request cost grows with the pool size), with a
        pool as large as the concurrency bound; else the SDK's default client."""
        openai = self._openai
        limits = None
        with contextlib.suppress(Exception):
            # The Limits class of whichever httpx package this SDK version uses.
            limits_type = type(openai._constants.DEFAULT_CONNECTION_LIMITS)
            limits = limits_type(
                max_connections=max(100, 2 * concurrency),
                max_keepalive_connections=max(20, concurrency),
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
        """Where requests go, e.g. ``https://api.openai.com/v1 (model gpt-4o-mini)`` (a fleet's
        URLs joined by ``", "``); credentials in the URL are dropped. The pipeline prints it
        before private data is first sent."""
        url = describe_endpoint(self.base_url)
        return url if model is None else f"{url} (model {model})"

    @property
    def is_local(self) -> bool:
        """True when every server runs on this machine (private data does not leave it)."""
        hosts = [urlsplit(e.base_url).hostname or "" for e in self.endpoints]
        return all(h in ("127.0.0.1", "localhost", "::1") or h.startswith("127.") for h in hosts)

    def _priced(self, by_model: Mapping[str, _ModelUsage]) -> tuple[dict[str, dict[str, Any]], float, list[str]]:
        out: dict[str, dict[str, Any]] = {}
        cost = 0.0
        unpriced: list[str] = []
        for model, u in sorted(by_model.items()):
            price = price_for(model, self.prices)
            # one pricing rule for every report: an image the server did not meter is priced by its
            # size and quality, or the cost is marked unknown — never a silent 0
            model_cost, known = price_model_usage(model, vars(u), price)
            if not known and u.requests:
                unpriced.append(model)
            cost += model_cost
            out[model] = {**vars(u), "cost_usd": model_cost, "cost_known": known}
        return out, cost, unpriced

    def usage(self) -> dict[str, Any]:
        """Requests, tokens, cache hits, failures and estimated cost (USD), total, per model and
        per endpoint (``by_endpoint``: label -> counts, cost, ``state`` and ``times_down``; cache
        hits involve no endpoint and are counted per model only).

        ``cost_known`` is false when a model used has no entry in the price table (its cost
        counts as 0 in ``cost_usd``; the models are listed in ``unpriced_models``)."""
        by_model, cost, unpriced = self._priced(self._ledger.snapshot())
        totals = _ModelUsage()
        for entry in by_model.values():
            for name in vars(totals):
                setattr(totals, name, getattr(totals, name) + entry[name])
        servers = self._ledger.snapshot_servers()
        by_endpoint: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for replica in self._replicas:
            models, server_cost, _ = self._priced(servers.get(replica.label, {}))
            counts = _ModelUsage()
            for entry in models.values():
                for name in vars(counts):
                    setattr(counts, name, getattr(counts, name) + entry[name])
            entry_out = {k: v for k, v in vars(counts).items() if k != "cache_hits"}
            by_endpoint[replica.label] = {
                **entry_out,
                "cost_usd": server_cost,
                "state": replica.state(now),
                "times_down": replica.times_down,
                "by_model": models,
            }
        return {
            "endpoint": self.endpoint_description(),
            **vars(totals),
            "cost_usd": cost,
            "cost_known": not unpriced,
            "unpriced_models": unpriced,
            "by_model": by_model,
            "by_endpoint": by_endpoint,
        }

    report = usage

    def list_models(self) -> list[str]:
        """Model ids the servers offer (``GET /models``, the union over a fleet, in order): a cheap
        check of URLs and keys. Endpoints that cannot be reached are skipped while one answers."""

        async def fetch(replica: _Replica) -> list[str]:
            assert replica.client is not None
            try:
                page = await replica.client.models.list()
            except self._openai.APIStatusError as exc:
                raise self._fatal_error(exc, "models", "-", replica=replica) from None
            except self._openai.APIConnectionError as exc:
                where = describe_endpoint(replica.base_url)
                raise BackendError(f"cannot reach {where}: {_one_line(str(exc))}") from None
            return [m.id for m in page.data]

        names: dict[str, None] = {}
        unreachable: list[BackendError] = []
        for replica in self._replicas:
            try:
                names.update(dict.fromkeys(_wait(self._loop_thread.submit(fetch(replica)))))
            except BackendError as exc:
                if "cannot reach" not in str(exc):
                    raise
                unreachable.append(exc)
        if len(unreachable) == len(self._replicas):
            raise unreachable[0]
        return list(names)

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
        for secret in self._secrets:
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return _KEY_PATTERN.sub("***", text)

    def _server_message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        message = None
        if isinstance(body, Mapping):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, Mapping) else inner
        return self._scrub(_one_line(str(message or getattr(exc, "message", "") or exc)))

    def _fatal_error(
        self, exc: Any, endpoint: str, model: str, hint: str = "", *, replica: _Replica | None = None
    ) -> BackendError:
        status = getattr(exc, "status_code", "?")
        where = describe_endpoint((replica or self._replicas[0]).base_url)
        text = f"POST {where}/{endpoint} (model {model!r}) failed with HTTP {status}: {self._server_message(exc)}"
        if status == 401:
            env = replica.key_env if replica is not None else None
            text += f" (check {env or 'OPENAI_API_KEY'} / api_key)"
        elif status == 404 and endpoint in ("chat/completions", "embeddings", "images/generations"):
            text += " (check the model name and base_url)"
        return BackendError(text + hint)

    def _record_failure(self, failure: RequestFailure) -> None:
        with self._failures_lock:
            self.failures.append(failure)
        self._ledger.add(failure.model, failure.server or None, failures=1)
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
        n_workers = min(len(jobs), 2 * self._fleet.capacity)
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
        avoid: _Replica | None = None  # the endpoint that just failed, if another has room
        fleet = self._fleet
        while True:
            error: BaseException | None = None
            parsed: _Parsed | None = None
            replica = await fleet.acquire(avoid, control)
            if replica is None:
                return _Outcome(False, reason="not run")
            server = replica.label
            try:
                if control.stopping:
                    return _Outcome(False, reason="not run")
                await self._throttle(replica, job.estimate, control)
                if control.stopping:
                    return _Outcome(False, reason="not run")
                self._ledger.add(model, server, requests=1)
                try:
                    parsed = job.parse(await job.send(replica.client, payload))
                except self._openai.APIError as exc:
                    error = exc
            finally:
                fleet.release(replica)
            if parsed is not None:
                fleet.succeeded(replica)
                self._ledger.add(
                    model,
                    server,
                    prompt_tokens=parsed.prompt_tokens,
                    completion_tokens=parsed.completion_tokens,
                    images=parsed.images,
                )
                if replica.tpm is not None and (parsed.prompt_tokens or parsed.completion_tokens):
                    replica.tpm.refund(job.estimate - parsed.prompt_tokens - parsed.completion_tokens)
                control.consecutive_transient = 0
                if parsed.problem is None:
                    self._ledger.add(model, server, succeeded=1)
                    if job.store is not None:
                        job.store(parsed)
                    return _Outcome(True, parsed.value)
                problems += 1
                if problems > self.empty_retries:
                    self._record_failure(
                        RequestFailure(endpoint, model, job.label, parsed.problem, f"after {problems} attempts", server)
                    )
                    return _Outcome(False, reason=parsed.problem)
                self._ledger.add(model, server, retries=1)
                avoid = None
                await control.sleep(self._backoff(0))
                continue

            assert error is not None
            delay = self._classify(error, job, endpoint, model, replica)
            if delay is None:  # an item-level refusal from moderation; already recorded
                return _Outcome(False, reason="policy")
            attempt += 1
            if attempt > self.max_retries:
                detail = self._describe_transient(error, replica)
                control.transient_failures += 1
                control.consecutive_transient += 1
                control.last_transient = detail
                self._record_failure(RequestFailure(endpoint, model, job.label, "transient", detail, server))
                # A server that is down would otherwise cost every item its full retry schedule.
                if control.consecutive_transient >= max(8, self.max_concurrency) and control.fatal is None:
                    control.fatal = self._too_many_failures(control, control.total, model)
                    control.stop_event.set()
                return _Outcome(False, reason="transient")
            self._ledger.add(model, server, retries=1)
            avoid = replica
            if len(self._replicas) > 1 and fleet.has_alternative(replica):
                delay = 0.0  # another endpoint is healthy: go there now
            log.debug("retrying %s in %.2f s after %s", job.label, delay, self._describe_transient(error, replica))
            await control.sleep(delay)

    async def _throttle(self, replica: _Replica, estimate: int, control: _Control) -> None:
        wait = 0.0
        if replica.rpm is not None:
            wait = max(wait, replica.rpm.reserve(1))
        if replica.tpm is not None:
            wait = max(wait, replica.tpm.reserve(max(1, estimate)))
        await control.sleep(wait)

    def _describe_transient(self, error: BaseException, replica: _Replica | None = None) -> str:
        status = getattr(error, "status_code", None)
        kind = f"HTTP {status}" if status is not None else type(error).__name__
        where = f" from {replica.label}" if replica is not None and len(self._replicas) > 1 else ""
        return self._scrub(_one_line(f"{kind}{where}: {self._server_message(error)}", 200))

    def _classify(self, error: BaseException, job: _Job, endpoint: str, model: str, replica: _Replica) -> float | None:
        """Seconds to wait before retrying, ``None`` for an item refused by moderation; raises
        :class:`BackendError` for errors a retry cannot fix. Updates the endpoint's health: a 429
        cools it, connection errors, timeouts and 5xx count towards marking it down."""
        openai = self._openai
        fleet = self._fleet
        if isinstance(error, openai.APIStatusError):
            status = int(error.status_code)
            code = getattr(error, "code", None)
            if status == 429 and code == "insufficient_quota":
                fatal = self._fatal_error(error, endpoint, model, " (the account is out of credit)", replica=replica)
                if not fleet.disable(replica, "insufficient_quota"):
                    raise fatal
                log.warning("%s; its endpoint takes no more requests", fatal)
                return 0.0
            if status in _RETRYABLE_STATUS or status >= 500:
                hinted = _retry_after(error.response.headers if error.response is not None else None)
                if status >= 500 and fleet.failed(replica):
                    log.warning("%s marked down after %d failures in a row", replica.label, replica.failures)
                if hinted is not None:
                    # A little jitter on top, never below what the server asked for.
                    delay = min(hinted, self.max_retry_after) * (1.0 + 0.1 * self._random.random())
                else:
                    delay = self._backoff(0 if status == 429 else 1)
                if status == 429:
                    fleet.cool(replica, delay)
                return delay
            if status == 400 and code in _POLICY_CODES:
                self._record_failure(
                    RequestFailure(endpoint, model, job.label, "policy", self._server_message(error), replica.label)
                )
                return None
            hint = ""
            if status == 404 and endpoint == "images/edits":
                hint = "; this server has no image-to-image endpoint: use a local image generator for variations"
            raise self._fatal_error(error, endpoint, model, hint, replica=replica)
        # Timeouts, refused or reset connections, malformed responses: all worth another try.
        if fleet.failed(replica):
            log.warning("%s marked down after %d failures in a row", replica.label, replica.failures)
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
