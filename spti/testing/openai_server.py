"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests, benchmarks and offline smoke runs.

Why a real server rather than a mocked client: the provider's retry, rate-limit, connection-pool
and cache logic only shows its real behaviour against real sockets, real status codes and real
headers. Answers are deterministic functions of the request (so tests can check order and
resumes), faults can be injected (429 with ``Retry-After``, 500, refusals, empty answers, slow
answers, a fixed status such as 401), and counters tell what the client actually sent
(requests per fingerprint to find duplicates, the peak number of requests in flight).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``POST /v1/images/generations``,
``POST /v1/images/edits`` (multipart), ``GET /v1/models``; control: ``GET /_spti/stats``,
``GET /_spti/completions`` (answers per request fingerprint), ``POST /_spti/reset``,
``POST /_spti/config``. :meth:`LoopbackOpenAIServer.kill` (in-process) and SIGUSR1 (as a process)
stop it abruptly, as a crash would, for fail-over tests.

In-process::

    with LoopbackOpenAIServer(FaultConfig(latency=0.02)) as server:
        client = OpenAITextGenerator(base_url=server.base_url, api_key="sk-test")
        ...
        server.stats.snapshot()

As a process (prints one JSON line ``{"base_url": ..., "port": ..., "pid": ...}`` when ready)::

    python -m spti.testing.openai_server --port 0 --latency 1.0 --rate-429 0.05

Per-request work is kept small (one SHA-256 of the body, a few dict look-ups) because in the
benchmark the server shares two cores with the client it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - dev dependency
    raise ImportError("the loopback OpenAI server needs aiohttp: pip install 'spti[dev]'") from exc

WORDS: tuple[str, ...] = (
    "a", "photo", "of", "bedroom", "with", "wooden", "bed", "white", "sheets", "large", "window",
    "soft", "light", "lamp", "on", "nightstand", "blue", "walls", "painting", "above", "headboard",
    "carpet", "floor", "small", "chair", "in", "the", "corner", "curtains", "green", "plant",
    "person", "smiling", "woman", "man", "short", "hair", "glasses", "beard", "young", "old",
    "wearing", "red", "shirt", "black", "jacket", "looking", "at", "camera", "outdoors", "indoors",
    "bright", "dark", "cozy", "modern", "vintage", "mirror", "desk", "books", "shelf", "pillows",
    "and", "near", "under",
)  # fmt: skip

REFUSAL_TEXT = "I'm sorry, but I can't help with that."


# ---------------------------------------------------------------------------------------------
# Deterministic answers (exported so tests can compute what the server will say)


def _digest(*parts: str | bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        h.update(b"\x00")
    return h.digest()


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text an answer is derived from: the last user message, images as ``<image:HASH>``."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        parts: list[str] = []
        for part in content or []:
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                parts.append(f"<image:{hashlib.sha256(url.encode()).hexdigest()[:16]}>")
        return " ".join(parts)
    return ""


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Number of ``image_url`` parts across all messages."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, Mapping) and part.get("type") == "image_url")
    return n


def chat_reply(text: str, *, seed: int | None = None, max_tokens: int | None = None) -> str:
    """The answer to a chat whose last user message is ``text``: 6–15 words chosen by hash."""
    d = _digest("chat", text, str(seed))
    n = 6 + d[0] % 10
    if max_tokens is not None:
        n = max(1, min(n, int(max_tokens)))
    return " ".join(WORDS[d[1 + i] % len(WORDS)] for i in range(n))


def embedding_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic unit vector (float32) for ``text``."""
    seed = int.from_bytes(_digest("embed", text)[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def image_colors(prompt: str, seed: int | None = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two RGB colours (top half, bottom half) derived from the prompt and seed."""
    d = _digest("image", prompt, str(seed))
    return (d[0], d[1], d[2]), (d[3], d[4], d[5])


def _png(width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (width, height), top)
    img.paste(bottom, (0, height // 2, width, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Configuration and counters


@dataclass
class FaultConfig:
    """What the server does besides answering. Rates are probabilities per attempt, decided by a
    hash of (seed, request fingerprint, attempt number), so a run is reproducible.

    ``script`` maps a marker (a substring of the raw request body) to the outcomes of successive
    attempts of each request that contains it, e.g. ``{"item-7": ["429", "500", "ok"]}``.
    Outcomes: ``"ok"``, any status code as a string (``"429"``, ``"500"``, ``"400"``, …),
    ``"refusal"``, ``"filter"`` (finish_reason content_filter), ``"empty"``, ``"slow:SECONDS"``.
    """

    latency: float = 0.0
    jitter: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1.0
    send_retry_after_ms: bool = True
    rate_500: float = 0.0
    rate_refusal: float = 0.0
    rate_empty: float = 0.0
    fixed_status: int | None = None
    fixed_message: str = "fixed failure injected by the loopback server"
    fixed_code: str = "injected"
    """The error ``code`` sent with ``fixed_status`` (e.g. ``insufficient_quota`` with 429)."""
    script: dict[str, list[str]] = field(default_factory=dict)
    api_key: str | None = None
    models: list[str] | None = None
    embedding_dim: int = 64
    seed: int = 0
    keep_bodies: int = 64


class ServerStats:
    """Counters of what the server received; updated on the server thread, read from any thread."""

    def __init__(self, keep_bodies: int = 64) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.by_endpoint: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[int] = collections.Counter()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.completions: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(0, keep_bodies))
        self.request_times: list[float] = []
        self.killed = False
        """Set by :func:`abort_server`: answers finished after it were never delivered, so they are
        not counted as completions (``answered_after_kill`` counts them)."""
        self.answered_after_kill = 0

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_endpoint.clear()
            self.by_status.clear()
            self.attempts.clear()
            self.completions.clear()
            self.max_in_flight = self.in_flight
            self.recent.clear()
            self.request_times.clear()

    def _begin(self, endpoint: str, fingerprint: str, body: dict[str, Any] | None) -> int:
        with self._lock:
            self.requests += 1
            self.by_endpoint[endpoint] += 1
            self.attempts[fingerprint] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.request_times.append(time.monotonic())
            if body is not None and self.recent.maxlen:
                self.recent.append({"endpoint": endpoint, "body": body})
            return self.attempts[fingerprint] - 1

    def _end(self, fingerprint: str, status: int) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.killed:
                self.answered_after_kill += 1
                return
            self.by_status[status] += 1
            if status == 200:
                self.completions[fingerprint] += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready summary (fingerprint counters summarised, not listed)."""
        with self._lock:
            return {
                "requests": self.requests,
                "by_endpoint": dict(self.by_endpoint),
                "by_status": {str(k): v for k, v in self.by_status.items()},
                "unique_fingerprints": len(self.attempts),
                "completed_fingerprints": len(self.completions),
                "max_attempts_per_fingerprint": max(self.attempts.values(), default=0),
                "max_completions_per_fingerprint": max(self.completions.values(), default=0),
                "duplicated_completions": sum(1 for c in self.completions.values() if c > 1),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "killed": self.killed,
                "answered_after_kill": self.answered_after_kill,
            }

    def completion_counts(self) -> dict[str, int]:
        """Answers delivered per request fingerprint (SHA-256 of the body), to compare servers."""
        with self._lock:
            return dict(self.completions)

    def recent_bodies(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """The last ``keep_bodies`` parsed request bodies (optionally of one endpoint)."""
        with self._lock:
            return [r["body"] for r in self.recent if endpoint is None or r["endpoint"] == endpoint]


# ---------------------------------------------------------------------------------------------
# The application


def _error(status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


class _Handlers:
    def __init__(self, config: FaultConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats

    # -- fault decisions -------------------------------------------------------------------

    def _unit(self, fingerprint: str, attempt: int, what: str) -> float:
        d = _digest(str(self.config.seed), fingerprint, str(attempt), what)
        return int.from_bytes(d[:8], "little") / 2.0**64

    def _outcome(self, raw: bytes, fingerprint: str, attempt: int, *, chat: bool) -> str:
        cfg = self.config
        if cfg.script:
            text = raw.decode("utf-8", errors="replace")
            for marker, outcomes in cfg.script.items():
                if marker in text:
                    return outcomes[attempt] if attempt < len(outcomes) else "ok"
        if cfg.rate_429 and self._unit(fingerprint, attempt, "429") < cfg.rate_429:
            return "429"
        if cfg.rate_500 and self._unit(fingerprint, attempt, "500") < cfg.rate_500:
            return "500"
        if chat and cfg.rate_refusal and self._unit(fingerprint, attempt, "refusal") < cfg.rate_refusal:
            return "refusal"
        if chat and cfg.rate_empty and self._unit(fingerprint, attempt, "empty") < cfg.rate_empty:
            return "empty"
        return "ok"

    async def _sleep(self, base: float | None = None) -> None:
        latency = self.config.latency if base is None else base
        if latency <= 0:
            return
        if self.config.jitter:
            latency *= 1.0 + self.config.jitter * (2.0 * random.random() - 1.0)
        await asyncio.sleep(max(0.0, latency))

    def _status_response(self, outcome: str) -> web.Response:
        status = int(outcome)
        if status == 429:
            headers = {"Retry-After": str(max(0, math.ceil(self.config.retry_after)))}
            if self.config.send_retry_after_ms:
                headers["retry-after-ms"] = str(round(self.config.retry_after * 1000))
            body = {
                "error": {
                    "message": "Rate limit reached (injected by the loopback server).",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            return web.json_response(body, status=429, headers=headers)
        if status >= 500:
            return _error(status, "The server had an error while processing your request.", type_="server_error")
        return _error(status, f"injected status {status}")

    def _gate(self, request: web.Request, model: str | None) -> web.Response | None:
        """Checks that apply before any answer: fixed status, API key, model name."""
        cfg = self.config
        if cfg.fixed_status is not None:
            return _error(cfg.fixed_status, cfg.fixed_message, code=cfg.fixed_code)
        if cfg.api_key is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if given != cfg.api_key:
                # Deliberately echoes the key, as a careless server might: the client must scrub it.
                return _error(401, f"Incorrect API key provided: {given}.", code="invalid_api_key")
        if cfg.models is not None and model is not None and model not in cfg.models:
            return _error(404, f"The model `{model}` does not exist.", code="model_not_found")
        return None

    async def _run(
        self,
        request: web.Request,
        endpoint: str,
        fingerprint: str,
        body: dict[str, Any] | None,
        answer: Callable[[str, int], Awaitable[web.Response]],
    ) -> web.Response:
        attempt = self.stats._begin(endpoint, fingerprint, body)
        status = 500
        try:
            response = await answer(fingerprint, attempt)
            status = response.status
            return response
        finally:
            self.stats._end(fingerprint, status)

    # -- endpoints -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        names = self.config.models or ["loopback-chat", "loopback-embed", "loopback-image"]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "spti-loopback"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "request body must be JSON with 'messages'")
        fingerprint = hashlib.sha256(raw).hexdigest()

        async def answer(fp: str, attempt: int) -> web.Response:
            gate = self._gate(request, body.get("model"))
            if gate is not None:
                return gate
            outcome = self._outcome(raw, fp, attempt, chat=True)
            if outcome.isdigit() and int(outcome) == 429:
                return self._status_response(outcome)
            if outcome.startswith("slow:"):
                await self._sleep(float(outcome[5:]))
                outcome = "ok"
            else:
                await self._sleep()
            if outcome.isdigit():
                return self._status_response(outcome)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            text = prompt_text(messages)
            content: str | None = chat_reply(text, seed=body.get("seed"), max_tokens=max_tokens)
            refusal = None
            finish = "stop"
            if outcome == "refusal":
                content, refusal = None, REFUSAL_TEXT
            elif outcome == "filter":
                content, finish = "", "content_filter"
            elif outcome == "empty":
                content = ""
            completion_tokens = len(content.split()) if content else 0
            prompt_tokens = max(1, len(text) // 4) + 85 * count_images(messages)
            payload = {
                "id": f"chatcmpl-{fp[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "loopback-chat"),
                "system_fingerprint": "spti-loopback",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
            return web.json_response(payload)

        return await self._run(request, "chat", fingerprint, body, answer)

    async def embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
            inputs = body["input"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "request body must be JSON with 'input'")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            return _error(400, "the loopback server embeds strings only")
        if any(t == "" for t in inputs):
            return _error(400, "'$.input' is invalid: empty strings are not allowed")
        fingerprint = hashlib.sha256(raw).hexdigest()

        async def answer(fp: str, attempt: int) -> web.Response:
            gate = self._gate(request, body.get("model"))
            if gate is not None:
                return gate
            outcome = self._outcome(raw, fp, attempt, chat=False)
            if outcome == "429":
                return self._status_response(outcome)
            await self._sleep(float(outcome[5:]) if outcome.startswith("slow:") else None)
            if outcome.isdigit():
                return self._status_response(outcome)
            dim = int(body.get("dimensions") or self.config.embedding_dim)
            b64 = body.get("encoding_format") == "base64"
            data = []
            for i, text in enumerate(inputs):
                v = embedding_vector(text, dim)
                emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
            tokens = sum(max(1, len(t) // 4) for t in inputs)
            payload = {
                "object": "list",
                "data": data,
                "model": body.get("model", "loopback-embed"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return web.json_response(payload)

        return await self._run(request, "embeddings", fingerprint, body, answer)

    def _image_payload(self, pngs: list[bytes]) -> web.Response:
        data = [{"b64_json": base64.b64encode(p).decode(), "revised_prompt": None} for p in pngs]
        return web.json_response({"created": int(time.time()), "data": data})

    @staticmethod
    def _size(size: Any) -> tuple[int, int] | None:
        try:
            w, h = str(size or "256x256").lower().split("x")
            width, height = int(w), int(h)
        except ValueError:
            return None
        if not (1 <= width <= 4096 and 1 <= height <= 4096):
            return None
        return width, height

    async def images(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
            prompt = str(body["prompt"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "request body must be JSON with 'prompt'")
        fingerprint = hashlib.sha256(raw).hexdigest()

        async def answer(fp: str, attempt: int) -> web.Response:
            gate = self._gate(request, body.get("model"))
            if gate is not None:
                return gate
            size = self._size(body.get("size"))
            if size is None:
                return _error(400, f"Invalid size {body.get('size')!r}; use WIDTHxHEIGHT")
            if body.get("response_format", "b64_json") != "b64_json":
                return _error(400, "the loopback server only returns response_format=b64_json")
            outcome = self._outcome(raw, fp, attempt, chat=False)
            if outcome == "429":
                return self._status_response(outcome)
            await self._sleep(float(outcome[5:]) if outcome.startswith("slow:") else None)
            if outcome.isdigit():
                return self._status_response(outcome)
            n = int(body.get("n") or 1)
            seed = body.get("seed")
            pngs = [_png(*size, *image_colors(prompt, None if seed is None else int(seed) + i)) for i in range(n)]
            return self._image_payload(pngs)

        return await self._run(request, "images", fingerprint, body, answer)

    async def image_edits(self, request: web.Request) -> web.Response:
        from PIL import Image

        form = await request.post()
        prompt = str(form.get("prompt", ""))
        upload = form.get("image") or form.get("image[]")
        if upload is None or not hasattr(upload, "file"):
            return _error(400, "multipart field 'image' is required")
        image_bytes = upload.file.read()
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        h.update(image_bytes)
        fingerprint = h.hexdigest()

        async def answer(fp: str, attempt: int) -> web.Response:
            gate = self._gate(request, fields.get("model"))
            if gate is not None:
                return gate
            size = self._size(fields.get("size"))
            if size is None:
                return _error(400, f"Invalid size {fields.get('size')!r}; use WIDTHxHEIGHT")
            outcome = self._outcome(json.dumps(fields).encode(), fp, attempt, chat=False)
            if outcome == "429":
                return self._status_response(outcome)
            await self._sleep()
            if outcome.isdigit():
                return self._status_response(outcome)
            try:
                source = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize(size)
            except Exception:
                return _error(400, "the uploaded image could not be read")
            top, _ = image_colors(prompt, None if "seed" not in fields else int(fields["seed"]))
            edited = Image.blend(source, Image.new("RGB", size, top), 0.5)
            buf = io.BytesIO()
            edited.save(buf, format="PNG", compress_level=1)
            return self._image_payload([buf.getvalue()])

        return await self._run(request, "image_edits", fingerprint, fields, answer)

    # -- control ---------------------------------------------------------------------------

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def get_completions(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.completion_counts())

    async def reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response({"ok": True})

    async def set_config(self, request: web.Request) -> web.Response:
        updates = await request.json()
        names = {f.name for f in dataclasses.fields(FaultConfig)}
        unknown = set(updates) - names
        if unknown:
            return _error(400, f"unknown settings: {sorted(unknown)}")
        for name, value in updates.items():
            setattr(self.config, name, value)
        return web.json_response(dataclasses.asdict(self.config))


def abort_server(runner: web.AppRunner, stats: ServerStats) -> None:
    """Stop as a crashed process would (call on the server's loop): stop listening, reset every open
    connection, and count no answer from now on (none can be delivered). Requests in flight see a
    reset connection, new ones a refused one."""
    with stats._lock:
        stats.killed = True
    for site in list(runner.sites):
        listener = getattr(site, "_server", None)
        if listener is not None:
            listener.close()
    server = runner.server
    for transport in list(getattr(server, "_connections", {}).values()):
        transport.abort()


def make_app(config: FaultConfig, stats: ServerStats) -> web.Application:
    """The aiohttp application (exposed for embedding in other test servers)."""
    handlers = _Handlers(config, stats)
    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/v1/chat/completions", handlers.chat)
    app.router.add_post("/v1/embeddings", handlers.embeddings)
    app.router.add_post("/v1/images/generations", handlers.images)
    app.router.add_post("/v1/images/edits", handlers.image_edits)
    app.router.add_get("/_spti/stats", handlers.get_stats)
    app.router.add_get("/_spti/completions", handlers.get_completions)
    app.router.add_post("/_spti/reset", handlers.reset)
    app.router.add_post("/_spti/config", handlers.set_config)
    return app


# ---------------------------------------------------------------------------------------------
# Running it


class LoopbackOpenAIServer:
    """The server on a background thread with its own event loop; a context manager.

    ``base_url`` (``http://127.0.0.1:PORT/v1``) is valid between ``start()`` and ``stop()``.
    ``config`` can be changed while it runs (e.g. ``server.config.fixed_status = 401``).
    """

    def __init__(self, config: FaultConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or FaultConfig()
        self.stats = ServerStats(self.config.keep_bodies)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LoopbackOpenAIServer:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def start_site() -> None:
            runner = web.AppRunner(make_app(self.config, self.stats), access_log=None, shutdown_timeout=0.25)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, backlog=1024)
            await site.start()
            server = getattr(site, "_server", None)
            if self.port == 0 and server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
            self._runner = runner

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(start_site())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="spti-loopback-openai", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise RuntimeError(f"loopback OpenAI server failed to start: {failure[0]}") from failure[0]
        return self

    def kill(self) -> None:
        """Stop abruptly, like a crashed server (see :func:`abort_server`); :attr:`stats` stay readable."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive() and self._runner:
            done = threading.Event()
            runner = self._runner

            def abort() -> None:
                try:
                    abort_server(runner, self.stats)
                finally:
                    done.set()

            self._loop.call_soon_threadsafe(abort)
            done.wait(10)
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> LoopbackOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spti.testing.openai_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument("--latency", type=float, default=0.0, help="mean seconds per answer")
    p.add_argument("--jitter", type=float, default=0.0, help="latency varies uniformly by ± this fraction")
    p.add_argument("--rate-429", type=float, default=0.0, help="fraction of attempts answered 429")
    p.add_argument("--retry-after", type=float, default=1.0, help="seconds advertised with 429")
    p.add_argument("--rate-500", type=float, default=0.0)
    p.add_argument("--rate-refusal", type=float, default=0.0)
    p.add_argument("--rate-empty", type=float, default=0.0)
    p.add_argument("--fixed-status", type=int, default=None, help="answer every request with this status")
    p.add_argument("--api-key", default=None, help="require this bearer key (401 otherwise)")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; print the address as one JSON line once listening.

    SIGUSR1 crashes it on purpose (:func:`abort_server`): connections are reset, and one last JSON
    line ``{"killed": true, "stats": ..., "completions": {fingerprint: count}}`` is printed."""
    args = _parse_args(argv)
    config = FaultConfig(
        latency=args.latency,
        jitter=args.jitter,
        rate_429=args.rate_429,
        retry_after=args.retry_after,
        rate_500=args.rate_500,
        rate_refusal=args.rate_refusal,
        rate_empty=args.rate_empty,
        fixed_status=args.fixed_status,
        api_key=args.api_key,
        embedding_dim=args.embedding_dim,
        seed=args.seed,
        keep_bodies=0,
    )
    stats = ServerStats(0)

    async def serve() -> None:
        runner = web.AppRunner(make_app(config, stats), access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=1024)
        await site.start()
        port = args.port
        server = getattr(site, "_server", None)
        if port == 0 and server is not None and server.sockets:
            port = server.sockets[0].getsockname()[1]
        print(
            json.dumps({"base_url": f"http://{args.host}:{port}/v1", "port": port, "pid": os.getpid()}),
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        killed = False

        def crash() -> None:
            nonlocal killed
            abort_server(runner, stats)
            killed = True
            stop.set()

        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGUSR1, crash)
        await stop.wait()
        if killed:
            report = {"killed": True, "stats": stats.snapshot(), "completions": stats.completion_counts()}
            print(json.dumps(report), flush=True)
        await runner.cleanup()

    asyncio.run(serve())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
