"""OpenAI-compatible providers: captions, chat, text embeddings and images over HTTP.

Modules: :mod:`.backend` (client, event-loop thread, limits, retries, cache, usage),
:mod:`.endpoints` (the :class:`Endpoint` of a fleet and its formats), :mod:`.fleet` (routing over
endpoints), :mod:`.provider` (the providers' shared base), :mod:`.chat` (captioner, text generator),
:mod:`.embeddings`, :mod:`.images`, :mod:`.usage` (prices, usage counters, failures),
:mod:`.runtime` (jobs, batch control, token buckets, loop thread) and :mod:`.helpers`.
``spti.backends.openai_api`` re-exports the public names.
"""

from spti.backends.openai.backend import ConnectionOptions, OpenAIBackend
from spti.backends.openai.chat import OpenAICaptioner, OpenAITextGenerator
from spti.backends.openai.embeddings import OpenAITextEmbedder
from spti.backends.openai.endpoints import Endpoint, parse_endpoints
from spti.backends.openai.helpers import DEFAULT_BASE_URL, describe_endpoint, resolve_base_url, split_base_urls
from spti.backends.openai.images import OpenAIImageGenerator
from spti.backends.openai.usage import DEFAULT_PRICES, ModelPrice, RequestFailure

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_PRICES",
    "ConnectionOptions",
    "Endpoint",
    "ModelPrice",
    "OpenAIBackend",
    "OpenAICaptioner",
    "OpenAIImageGenerator",
    "OpenAITextEmbedder",
    "OpenAITextGenerator",
    "RequestFailure",
    "describe_endpoint",
    "parse_endpoints",
    "resolve_base_url",
    "split_base_urls",
]
