"""Prices, per-model usage counters and the record of items that got no answer."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


_SNAPSHOT = re.compile(r"(.+)-\d{4}-\d{2}-\d{2}")


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
    ``policy``, ``transient``), and a short detail with no private content. ``endpoint`` is the
    API path (``chat/completions``); ``server`` the label of the endpoint that answered last."""

    endpoint: str
    model: str
    item: str
    reason: str
    detail: str = ""
    server: str = ""


class _UsageLedger:
    """Thread-safe counters per model and per (endpoint, model): updated on the event-loop
    thread, read from the caller's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, _ModelUsage] = {}
        self._by_server: dict[str, dict[str, _ModelUsage]] = {}

    def add(self, model: str, server: str | None = None, **counts: int) -> None:
        with self._lock:
            targets = [self._by_model.setdefault(model, _ModelUsage())]
            if server is not None:
                targets.append(self._by_server.setdefault(server, {}).setdefault(model, _ModelUsage()))
            for usage in targets:
                for name, value in counts.items():
                    setattr(usage, name, getattr(usage, name) + int(value))

    def snapshot(self) -> dict[str, _ModelUsage]:
        with self._lock:
            return {m: _ModelUsage(**vars(u)) for m, u in self._by_model.items()}

    def snapshot_servers(self) -> dict[str, dict[str, _ModelUsage]]:
        with self._lock:
            return {s: {m: _ModelUsage(**vars(u)) for m, u in by.items()} for s, by in self._by_server.items()}
