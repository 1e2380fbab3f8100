"""The job machinery: what one request is, per-batch control, token buckets and the event-loop thread.

Everything here except :func:`_wait` runs on the backend's event-loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spti.errors import SptiError

if TYPE_CHECKING:
    from openai import AsyncOpenAI


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


def _shutdown(loop_thread: _LoopThread, clients: Sequence[Any]) -> None:
    if loop_thread.thread.is_alive():
        for client in clients:
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
