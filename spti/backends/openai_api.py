"""OpenAI-compatible providers (re-exported from the :mod:`spti.backends.openai` package).

Kept so that ``from spti.backends.openai_api import OpenAIBackend, ...`` keeps working; the code
lives in ``spti/backends/openai/`` (see that package's docstring for the module layout).
"""

from spti.backends.openai import (
    DEFAULT_BASE_URL,
    DEFAULT_PRICES,
    ConnectionOptions,
    Endpoint,
    ModelPrice,
    OpenAIBackend,
    OpenAICaptioner,
    OpenAIImageGenerator,
    OpenAITextEmbedder,
    OpenAITextGenerator,
    RequestFailure,
    describe_endpoint,
    parse_endpoints,
    resolve_base_url,
    split_base_urls,
)
from spti.backends.openai.helpers import _retry_after  # used by the tests

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
    "_retry_after",
    "describe_endpoint",
    "parse_endpoints",
    "resolve_base_url",
    "split_base_urls",
]
