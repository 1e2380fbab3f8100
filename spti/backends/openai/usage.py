"""Prices, per-model usage counters and the record of items that got no answer."""

from __future__ import annotations

import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SNAPSHOT = re.compile(r"(.+)-\d{4}-\d{2}-\d{2}")

# The shipped price table (dated; ``spti plan --prices FILE`` and ``prices=`` override it).
PRICES_FILE = Path(__file__).resolve().parents[2] / "prices.toml"


@dataclass(frozen=True)
class ModelPrice:
    """USD per one million input / output tokens, and per generated image where billed per image.

    ``image_prices`` holds ``(size, quality, usd)`` per image (``"1024x1024"``, ``"medium"``): the
    price of an image whose server reported no tokens for it (gpt-image-1 bills its output tokens,
    which a compatible server may not report). ``image_input_tokens``: the input tokens one private
    image costs a vision model (for the plan)."""

    input_per_million: float
    output_per_million: float = 0.0
    per_image: float = 0.0
    image_prices: tuple[tuple[str, str, float], ...] = ()
    image_input_tokens: int | None = None

    def image_price(self, size: str | None, quality: str | None = None) -> float | None:
        """USD for one image at ``size`` (``"WxH"``) and ``quality`` (``None``: ``auto``), else None."""
        quality = quality or "auto"
        for s, q, usd in self.image_prices:
            if s in (size, "*") and q == quality:
                return usd
        if not self.image_prices and self.per_image:
            return self.per_image
        return None


@dataclass(frozen=True)
class PriceTable:
    """A dated price table: per model (at api.openai.com) and per (endpoint, model) elsewhere."""

    date: str
    source: str
    models: dict[str, ModelPrice]
    endpoints: dict[str, dict[str, ModelPrice]]
    path: str = ""


def _model_price(name: str, table: Any, where: str) -> ModelPrice:
    from spti.errors import SptiError

    if not isinstance(table, dict):
        raise SptiError(f"{where}: [models.{name!r}] must be a table")
    unknown = sorted(set(table) - {"input_per_1m", "output_per_1m", "per_image", "image_input_tokens"})
    if unknown:
        raise SptiError(f"{where}: {name}: unknown key(s) {', '.join(unknown)}")
    images: list[tuple[str, str, float]] = []
    per_image = table.get("per_image", {})
    if isinstance(per_image, int | float):  # one price for any size
        per_image = {"*": {"auto": per_image}}
    for size, by_quality in per_image.items():
        if not isinstance(by_quality, dict):
            by_quality = {"auto": by_quality}
        for quality, usd in by_quality.items():
            images.append((size, quality, float(usd)))
    output = float(table.get("output_per_1m", 0.0))
    # billed per image (no token price): the flat price the backend charges each image it counts
    flat = 0.0
    if images and not output:
        flat = next((u for s, q, u in images if s in ("1024x1024", "*") and q == "auto"), images[0][2])
    tokens = table.get("image_input_tokens")
    return ModelPrice(
        float(table.get("input_per_1m", 0.0)),
        output,
        flat,
        tuple(images),
        int(tokens) if tokens is not None else None,
    )


def load_price_table(path: str | Path | None = None, *, base: PriceTable | None = None) -> PriceTable:
    """The shipped table (``path=None``), or ``path`` read over ``base`` (entries replace entries)."""
    from spti.errors import SptiError

    file = Path(path) if path is not None else PRICES_FILE
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SptiError(f"price table {file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SptiError(f"price table {file} is not valid TOML: {exc}") from None
    models = dict(base.models) if base else {}
    endpoints = {k: dict(v) for k, v in base.endpoints.items()} if base else {}
    for name, table in (data.get("models") or {}).items():
        models[name] = _model_price(name, table, str(file))
    for url, by_model in (data.get("endpoints") or {}).items():
        for name, table in by_model.items():
            endpoints.setdefault(url.rstrip("/"), {})[name] = _model_price(name, table, str(file))
    date = str(data.get("date") or (base.date if base else "undated"))
    source = str(data.get("source") or (base.source if base else ""))
    return PriceTable(date, source, models, endpoints, str(file))


def _shipped_prices() -> dict[str, ModelPrice]:
    try:
        return load_price_table().models
    except Exception:  # a broken install must not break the backend: no prices, costs say unknown
        return {}


# Public list prices (USD) from the shipped table spti/prices.toml; pass ``prices=`` to override.
DEFAULT_PRICES: dict[str, ModelPrice] = _shipped_prices()


def price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
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
    unmetered_images: int = 0  # images whose answer reported no output tokens (priced per image)


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
        if counts.get("images") and not counts.get("completion_tokens"):
            counts["unmetered_images"] = counts["images"]
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


def price_model_usage(
    model: str,
    counts: Mapping[str, Any],
    price: ModelPrice | None,
    *,
    image_size: str | None = None,
    image_quality: str | None = None,
) -> tuple[float, bool]:
    """USD of one model's counts (``requests``, ``prompt_tokens``, ``completion_tokens``, ``images``,
    ``unmetered_images``) and whether that is the whole cost.

    Tokens at the token prices; images billed per image at ``per_image``; an image whose server
    reported no output tokens (``unmetered_images``) of a token-billed image model at its per-image
    price for ``image_size``/``image_quality``: with no such price, the cost is not known (never a
    silent 0). No price at all: 0 and not known, once the model made a request."""
    if price is None:
        return 0.0, not counts.get("requests")
    if price == ModelPrice(0.0):  # priced as free (a self-served endpoint)
        return 0.0, True
    cost = (
        counts.get("prompt_tokens", 0) * price.input_per_million / 1e6
        + counts.get("completion_tokens", 0) * price.output_per_million / 1e6
    )
    known = True
    images, unmetered = counts.get("images", 0), counts.get("unmetered_images", 0)
    if price.per_image or not price.output_per_million:  # billed per image (dall-e)
        if images:
            each = price.image_price(image_size, image_quality) if image_size else None
            each = price.per_image if each is None else each
            cost += images * each
            known = bool(each)
    elif unmetered:
        each = price.image_price(image_size, image_quality)
        if each is None:
            known = False
        else:
            cost += unmetered * each
    return cost, known
