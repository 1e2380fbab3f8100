"""Routing requests over a fleet of endpoints (runs on the backend's event-loop thread).

Rules, in the order :meth:`_Fleet.acquire` applies them:

- an endpoint marked **down** gets no requests until its down period ends; it is then probed with
  one request at a time, and back up after one success (down again, for twice as long, after a
  failure). An endpoint is marked down after ``down_after`` consecutive connection errors,
  timeouts or 5xx answers, but never the last endpoint still up: with nowhere else to go the
  requests retry with back-off as a single endpoint would;
- an endpoint that answered 429 is **cooling** until its ``Retry-After`` ends: it gets new requests
  only while every endpoint up is cooling (then each request waits out its own ``Retry-After``,
  as with a single endpoint);
- among the rest, the endpoint with the fewest requests in flight below its own concurrency
  bound; ties go round-robin. A retry avoids the endpoint that just failed when another has a
  free slot. With no free slot anywhere the request waits for one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from spti.backends.openai.runtime import _Control, _TokenBucket


@dataclass(eq=False)
class _Replica:
    """One endpoint of a fleet: its client, limits and health."""

    label: str
    base_url: str
    secret: str = field(repr=False)
    max_concurrency: int
    key_env: str | None = None
    rpm: _TokenBucket | None = None
    tpm: _TokenBucket | None = None
    client: AsyncOpenAI | None = field(default=None, repr=False)
    transport: str = "httpx"
    in_flight: int = 0
    failures: int = 0
    """Consecutive connection errors, timeouts and 5xx answers."""
    down_until: float = 0.0
    down_period: float = 0.0
    """Length of the last down period; non-zero until the endpoint answers again (half-open)."""
    disabled: str = ""
    """Why this endpoint takes no more requests at all (an exhausted quota), or empty."""
    cooling_until: float = 0.0
    times_down: int = 0

    def state(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self.disabled:
            return "disabled"
        if self.down_until > now:
            return "down"
        if self.down_period:
            return "probing"
        if self.cooling_until > now:
            return "cooling"
        return "up"


class _Fleet:
    """The endpoints of one backend and the waiting room for a free slot."""

    def __init__(self, replicas: list[_Replica], *, down_after: int, down_seconds: float, max_down: float) -> None:
        self.replicas = replicas
        self.down_after = max(1, int(down_after))
        self.down_seconds = float(down_seconds)
        self.max_down = float(max_down)
        self.capacity = sum(r.max_concurrency for r in replicas)
        self._rr = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    # -- choosing ----------------------------------------------------------------------------

    def _pick(self, avoid: _Replica | None, now: float) -> _Replica | None:
        replicas = self.replicas
        n = len(replicas)
        if n == 1:  # the single-endpoint fast path: never down, never disabled
            r = replicas[0]
            return r if r.in_flight < r.max_concurrency else None
        best: _Replica | None = None
        best_rank: tuple[bool, int] | None = None
        best_index = 0
        # A cooling endpoint (429) gets nothing new while any endpoint up is not cooling.
        warm = any(not r.disabled and r.down_until <= now and r.cooling_until <= now for r in replicas)
        for step in range(n):
            index = (self._rr + step) % n
            r = replicas[index]
            if r.disabled or r.down_until > now or (warm and r.cooling_until > now):
                continue
            limit = 1 if r.down_period else r.max_concurrency  # half-open: one probe at a time
            if r.in_flight >= limit:
                continue
            rank = (r is avoid, r.in_flight)
            if best_rank is None or rank < best_rank:
                best, best_rank, best_index = r, rank, index
        if best is not None:
            self._rr = (best_index + 1) % n
        return best

    def _next_change(self, now: float) -> float:
        """Seconds until a down endpoint may be probed or a cooling one takes requests again
        (capped, so waiters re-check now and then)."""
        ends = [t - now for r in self.replicas for t in (r.down_until, r.cooling_until) if t > now]
        return max(0.001, min([0.5, *ends]))

    def has_alternative(self, failed: _Replica) -> bool:
        """Whether another endpoint is up, not cooling and not failing: a retry goes there at once."""
        now = time.monotonic()
        return any(
            r is not failed
            and not r.disabled
            and r.down_until <= now
            and r.cooling_until <= now
            and not r.down_period
            and r.failures == 0
            for r in self.replicas
        )

    async def acquire(self, avoid: _Replica | None, control: _Control) -> _Replica | None:
        """A slot on the best endpoint (see the module docstring); ``None`` when the batch stops."""
        loop = asyncio.get_running_loop()
        while True:
            if control.stopping:
                self._wake_one()  # pass the wake-up on, so every waiter sees the stop
                return None
            now = time.monotonic()
            replica = self._pick(avoid, now)
            if replica is not None:
                replica.in_flight += 1
                return replica
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            handle = loop.call_later(self._next_change(now), _wake, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            finally:
                handle.cancel()

    def release(self, replica: _Replica) -> None:
        replica.in_flight -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- health --------------------------------------------------------------------------------

    def succeeded(self, replica: _Replica) -> None:
        if replica.failures or replica.down_period:
            replica.failures = 0
            replica.down_period = 0.0

    def failed(self, replica: _Replica) -> bool:
        """Count a connection error, timeout or 5xx; True if the endpoint was just marked down."""
        replica.failures += 1
        now = time.monotonic()
        if replica.down_until > now:  # requests sent before it was marked down, failing now
            return False
        probe = bool(replica.down_period)
        if not probe and replica.failures < self.down_after:
            return False
        others_up = any(r is not replica and not r.disabled and r.down_until <= now for r in self.replicas)
        if not others_up:
            return False
        replica.down_period = min(self.max_down, replica.down_period * 2 if replica.down_period else self.down_seconds)
        replica.down_until = now + replica.down_period
        replica.times_down += 1
        return True

    def cool(self, replica: _Replica, seconds: float) -> None:
        """A 429: send this endpoint nothing new for ``seconds`` while others have room."""
        replica.cooling_until = max(replica.cooling_until, time.monotonic() + seconds)

    def disable(self, replica: _Replica, why: str) -> bool:
        """Take an endpoint out for good (its quota is spent); False if it is the last one."""
        if all(r.disabled or r is replica for r in self.replicas):
            return False
        replica.disabled = why
        return True


def _wake(waiter: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        if not waiter.done():
            waiter.set_result(None)
