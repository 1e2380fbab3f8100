"""Endpoint fleets: several servers (or several API keys) behind one role.

An :class:`Endpoint` is one server root plus where its key comes from and, optionally, its own
limits. A role may list several (a vLLM replica set, several API keys of one provider); the
backend then routes each request to the endpoint with the fewest requests in flight.

How a fleet is written (see ``docs/openai.md``):

- ``base_url = "http://gpu1:8000/v1,http://gpu2:8000/v1"``: commas separate endpoints that share
  one key (``api_key_env`` of the role, else ``$OPENAI_API_KEY``) and the role's limits;
- ``endpoints = [{base_url = "...", api_key_env = "KEY_A", max_concurrency = 64}, ...]`` in a
  per-role TOML table: each endpoint with its own key variable and limits.

:func:`parse_endpoints` turns either form into a list of :class:`Endpoint`; TOML tables never hold
keys themselves (``api_key`` is refused there), only the names of the variables that hold them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from spti.backends.openai.helpers import _describe_one, split_base_urls
from spti.errors import SptiError

__all__ = ["Endpoint", "parse_endpoints"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TABLE_KEYS = ("base_url", "api_key_env", "max_concurrency", "requests_per_minute", "tokens_per_minute", "name")


@dataclass(frozen=True)
class Endpoint:
    """One server of a fleet.

    ``base_url``: server root including ``/v1``. ``api_key_env``: the environment variable with its
    key (``None``: the backend's ``api_key``, else ``$OPENAI_API_KEY``). ``api_key``: the key itself,
    for Python callers only (never in a config file, never in reprs). ``max_concurrency``,
    ``requests_per_minute``, ``tokens_per_minute``: this endpoint's own limits (``None``: the
    backend's values, applied to each endpoint separately). ``name``: its label in usage reports
    and messages (default: the URL, plus the key variable when two endpoints share a URL).
    """

    base_url: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False, compare=False)
    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        urls = split_base_urls(self.base_url) if self.base_url else []
        if len(urls) != 1:
            raise SptiError(f"an endpoint has one base_url, got {self.base_url!r}; list several endpoints instead")
        object.__setattr__(self, "base_url", urls[0])
        if self.api_key_env is not None and (
            self.api_key_env.startswith("sk-") or not _ENV_NAME.fullmatch(self.api_key_env)
        ):
            raise SptiError(
                f"endpoint {_describe_one(urls[0])}: api_key_env must name the environment variable that holds "
                "the key (e.g. OPENAI_API_KEY), never the key itself"
            )
        if self.max_concurrency is not None and int(self.max_concurrency) < 1:
            raise SptiError(f"endpoint {_describe_one(urls[0])}: max_concurrency must be at least 1")
        for limit in (self.requests_per_minute, self.tokens_per_minute):
            if limit is not None and float(limit) <= 0:
                raise SptiError(f"endpoint {_describe_one(urls[0])}: rate limits must be positive, got {limit}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, where: str = "endpoints") -> Endpoint:
        """One entry of an ``endpoints = [...]`` TOML list; unknown keys and inline keys are refused."""
        if not isinstance(table, Mapping):
            raise SptiError(f"invalid setting: {where}: each endpoint is a table such as {{base_url = '...'}}")
        if "api_key" in table:
            raise SptiError(
                f"invalid setting: {where}: do not write API keys into config files; put the key in an environment "
                "variable and name it with api_key_env"
            )
        unknown = sorted(set(table) - set(_TABLE_KEYS))
        if unknown:
            raise SptiError(f"invalid setting: {where}: unknown key {unknown[0]!r}; use {', '.join(_TABLE_KEYS)}")
        if not isinstance(table.get("base_url"), str):
            raise SptiError(f"invalid setting: {where}: each endpoint needs base_url = 'http(s)://HOST:PORT/v1'")
        try:
            return cls(**{k: table[k] for k in _TABLE_KEYS if k in table})
        except SptiError as exc:
            raise SptiError(f"invalid setting: {where}: {exc}") from None

    def resolve_key(self, default: str | None) -> str | None:
        """The key to send: ``api_key``, else ``$api_key_env`` (which must then be set), else ``default``."""
        if self.api_key is not None:
            return self.api_key
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise SptiError(
                    f"endpoint {_describe_one(self.base_url)} reads its API key from ${self.api_key_env} "
                    f"(api_key_env), which is not set; export {self.api_key_env}=..."
                )
            return key
        return default

    def as_table(self) -> dict[str, Any]:
        """The TOML form (no key), e.g. to save a run's settings."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key" and getattr(self, f.name)}


def parse_endpoints(
    base_url: str | None = None,
    *,
    endpoints: Sequence[Endpoint | Mapping[str, Any] | str] | None = None,
    api_key_env: str | None = None,
    where: str = "endpoints",
) -> list[Endpoint]:
    """The endpoints of one role: from ``endpoints`` (tables, URLs or :class:`Endpoint`), else from
    ``base_url`` split at commas (else ``$OPENAI_BASE_URL``, else the OpenAI API). ``api_key_env``
    is the role's key variable, used by endpoints that name none. Needs no network and no key."""
    if endpoints is not None and base_url:
        raise SptiError(f"invalid setting: {where}: give base_url or endpoints, not both")
    out: list[Endpoint] = []
    if endpoints is None:
        out = [Endpoint(url, api_key_env=api_key_env) for url in split_base_urls(base_url)]
    else:
        if isinstance(endpoints, str | Mapping) or not endpoints:
            raise SptiError(f"invalid setting: {where}: endpoints is a non-empty list of tables")
        for i, entry in enumerate(endpoints):
            label = f"{where}[{i}]"
            if isinstance(entry, Endpoint):
                endpoint = entry
            elif isinstance(entry, str):
                endpoint = Endpoint(entry)
            else:
                endpoint = Endpoint.from_mapping(entry, where=label)
            if endpoint.api_key_env is None and endpoint.api_key is None and api_key_env is not None:
                endpoint = Endpoint(**{**vars(endpoint), "api_key_env": api_key_env})
            out.append(endpoint)
    names = [e.name for e in out if e.name]
    if len(names) != len(set(names)):
        raise SptiError(f"invalid setting: {where}: endpoint names must be distinct, got {names}")
    return out
