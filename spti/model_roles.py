"""Model roles: each role of a run (caption, llm, text_embedding, image, ...) names its own provider,
model, endpoint (or fleet of endpoints) and API-key variable.

The spec syntax ``[provider:]model[@base_url]`` of the model flags, the ``[models.<role>]`` TOML
tables, and their checks. :class:`spti.config.RunConfig` resolves a role with :meth:`model_spec`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from spti.errors import SptiError

if TYPE_CHECKING:
    from spti.backends.openai.endpoints import Endpoint
    from spti.config import RunConfig

# --------------------------------------------------------------------------------------------
# Model roles: each names its own provider, model, endpoint and key variable
# --------------------------------------------------------------------------------------------
# role -> the RunConfig field holding its model (TOML table [models.<role>], CLI flag --<field>)
ROLE_FIELDS: dict[str, str] = {
    "caption": "caption_model",  # sees private images
    "llm": "llm_model",  # random / variation API: public text only
    "text_embedding": "embedding_model",  # text voting: sees private captions
    "image": "image_model",  # the vote generator (and by default the release one): public text only
    "release_image": "release_model",  # the generator of released images (default: image)
    "upscaler": "upscaler_model",  # local only
    "image_features": "image_embedder",  # local only: private images never leave the machine here
}
FIELD_ROLES: dict[str, str] = {v: k for k, v in ROLE_FIELDS.items()}
PROVIDERS: tuple[str, ...] = ("local", "openai")
LOCAL_ONLY_ROLES = frozenset({"upscaler", "image_features"})
TABLE_KEYS = ("provider", "model", "base_url", "api_key_env", "endpoints")
# the keys of a role's route: where its requests go (the model name stays in the role's field)
ROUTE_KEYS = ("provider", "base_url", "api_key_env", "endpoints")
_FLAGS = {
    "caption_model": "--caption-model",
    "llm_model": "--llm-model",
    "embedding_model": "--embedding-model",
    "image_model": "--image-model",
    "release_model": "--release-model",
    "upscaler_model": "--upscaler-model",
    "image_embedder": "--image-embedder",
}
# names people reach for that are servers or libraries, not providers: say what to write instead
_NOT_PROVIDERS = frozenset(
    {"vllm", "ollama", "llamacpp", "llama.cpp", "llama-cpp", "lmstudio", "litellm", "azure", "tgi", "sglang"}
    | {"hf", "huggingface", "transformers", "diffusers", "sentence-transformers", "gguf"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_AT = re.compile(r"@(?=https?://)", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    """One model role resolved: who serves it, which model, where, and which variable holds the key.

    ``base_url`` is the role's own endpoint (``None``: the run's ``base_url``, else
    ``$OPENAI_BASE_URL``, else the OpenAI API); ``api_key_env`` the name of the environment variable
    with its API key (``None``: ``OPENAI_API_KEY``). Never the key itself. ``endpoints``: a fleet
    from the role's ``endpoints = [...]`` table, each with its own key variable and limits
    (``Endpoint`` of :mod:`spti.backends.openai.endpoints`; ``base_url`` is then ``None``).
    """

    role: str
    provider: str
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def where(self) -> str | None:
        """The role's own server root(s), comma-joined for a fleet; ``None``: the run's."""
        return ",".join(e.base_url for e in self.endpoints) if self.endpoints else self.base_url

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}" + (f"@{self.where}" if self.where else "")


def role_label(role: str) -> str:
    field_name = ROLE_FIELDS[role]
    return f"{_FLAGS[field_name]} / [models.{role}]"


def parse_model_spec(text: Any, *, where: str = "model") -> tuple[str | None, str, str | None]:
    """``[provider:]model[@base_url]`` -> (provider or None, model, base_url or None).

    The prefix is a provider only when it is one (``local`` or ``openai``), so ``llama3:8b`` (an
    Ollama tag), ``repo:file.gguf`` and ``clip:ID`` stay model names; ``@`` starts the endpoint only
    when an http(s) URL follows. ``where`` names the flag or table in error messages.
    """
    if not isinstance(text, str) or not text.strip():
        raise SptiError(f"invalid setting: {where}: give a model name, e.g. openai:gpt-4o-mini or local:MODEL_ID")
    text = text.strip()
    base_url = None
    found = _URL_AT.search(text)
    if found:
        text, base_url = text[: found.start()], text[found.end() :]
    elif "@" in text and re.search(r"@[^@]*[:/.]", text):
        raise SptiError(
            f"invalid setting: {where} {text!r}: the endpoint after '@' must be an http(s) URL, "
            "e.g. openai:MODEL@http://gpu1:8000/v1"
        )
    provider = None
    head, sep, rest = text.partition(":")
    if sep and head.lower() in PROVIDERS:
        provider, text = head.lower(), rest
    elif sep and head.lower() in _NOT_PROVIDERS:
        raise SptiError(
            f"invalid setting: {where} {text!r}: {head!r} is not a provider; write openai:MODEL@URL for any "
            "OpenAI-compatible server (vLLM, llama.cpp, Ollama), or local:MODEL for this machine"
        )
    if not text:
        raise SptiError(f"invalid setting: {where}: no model after {head + ':'!r}, e.g. {head}:MODEL_ID")
    return provider, text, None if base_url is None else checked_base_url(base_url, where=where)


def checked_base_url(url: str, *, where: str) -> str:
    """An endpoint such as ``http://gpu1:8000/v1`` (trailing ``/`` dropped), or one clear error."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise SptiError(f"invalid setting: {where}: {url!r} is not an http(s) URL such as http://gpu1:8000/v1")
    return url.rstrip("/")


def checked_spec(spec: ModelSpec, where: str) -> ModelSpec:
    if spec.provider not in PROVIDERS:
        raise SptiError(f"invalid setting: {where}: provider {spec.provider!r}; use one of {', '.join(PROVIDERS)}")
    if spec.role in LOCAL_ONLY_ROLES and spec.provider != "local":
        raise SptiError(
            f"invalid setting: {where}: {spec.role} runs locally only (no OpenAI-compatible API for it); "
            f"drop 'openai:' and name a local model"
        )
    if spec.provider == "local" and spec.where:
        raise SptiError(
            f"invalid setting: {where}: a local model has no endpoint ({spec.where}); "
            f"write openai:{spec.model}@{spec.where} for a model served over the OpenAI protocol"
        )
    if spec.api_key_env is not None:
        if spec.provider == "local":
            raise SptiError(f"invalid setting: {where}: api_key_env is for openai models; a local model needs no key")
        if spec.api_key_env.startswith("sk-") or not _ENV_NAME.fullmatch(spec.api_key_env):
            raise SptiError(
                f"invalid setting: {where}: api_key_env must name the environment variable that holds the key "
                "(e.g. OPENAI_API_KEY), never the key itself"
            )
    return spec


def model_spec_with(cfg: RunConfig, field_name: str, value: Any) -> ModelSpec:
    """The spec ``field_name`` (a role's model field) would give its role if set to ``value`` (a flag):
    the value names the role whole, so a bare name takes the run's provider."""
    role = FIELD_ROLES[field_name]
    probe = dataclasses.replace(cfg, models={k: v for k, v in cfg.models.items() if k != role})
    setattr(probe, field_name, value)
    return probe.model_spec(role)


def fleet_of(table: dict[str, Any], *, where: str) -> tuple[Endpoint, ...]:
    """The endpoints of a role's ``endpoints = [...]`` list (none without one): each entry checked,
    and given the role's ``api_key_env`` where it names no key variable of its own."""
    if "endpoints" not in table:
        return ()
    from spti.backends.openai.endpoints import parse_endpoints

    try:
        return tuple(
            parse_endpoints(
                table.get("base_url"), endpoints=table["endpoints"], api_key_env=table.get("api_key_env"), where=where
            )
        )
    except SptiError as exc:
        message = str(exc)
        raise SptiError(message if where in message else f"invalid setting: {where}: {message}") from None


def read_model_tables(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """``[models.<role>]`` tables (``provider``, ``model``, ``base_url``, ``api_key_env``), checked."""
    out: dict[str, dict[str, Any]] = {}
    for role, table in tables.items():
        label = f"{where}: [models.{role}]"
        if role not in ROLE_FIELDS:
            raise SptiError(f"{label}: unknown role; use one of {', '.join(ROLE_FIELDS)}")
        if not isinstance(table, dict):
            raise SptiError(f'{label}: must be a table, e.g. [models.{role}] provider = "openai" model = "..."')
        table = {k.replace("-", "_"): v for k, v in table.items()}
        unknown = sorted(set(table) - set(TABLE_KEYS))
        if any("key" in k for k in unknown):
            raise SptiError(f"{label}: never write an API key in a file; name its variable with api_key_env")
        if unknown:
            raise SptiError(f"{label}: unknown key(s) {', '.join(unknown)}; use {', '.join(TABLE_KEYS)}")
        for key, value in table.items():
            if not isinstance(value, str) and key != "endpoints":
                raise SptiError(f"{label}: {key} must be a string")
        if "model" not in table:
            raise SptiError(f'{label}: needs model = "..." (the model the role uses)')
        spec_provider, model, url = parse_model_spec(table["model"], where=label)
        if spec_provider is not None or url is not None:
            raise SptiError(f"{label}: model names the model only; put the provider and endpoint in provider, base_url")
        base_url = table.get("base_url")
        if base_url is not None:
            base_url = table["base_url"] = checked_base_url(base_url, where=f"{label} base_url")
        endpoints = fleet_of(table, where=label)
        if endpoints:
            table["endpoints"] = [e.as_table() for e in endpoints]
        provider = table.get("provider") or ("openai" if base_url or endpoints else None)
        if provider is not None:  # else the run's provider, checked with the run's settings
            checked_spec(ModelSpec(role, provider, model, base_url, table.get("api_key_env"), endpoints), label)
        out[role] = table
    return out
