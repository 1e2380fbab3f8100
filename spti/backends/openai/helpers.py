"""Small helpers of the OpenAI-compatible providers: URLs, Retry-After, seeds, image coding, token estimates."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from spti.backends.base import Conversation
from spti.errors import SptiError

if TYPE_CHECKING:
    from PIL.Image import Image


log = logging.getLogger("spti.backends.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Status codes that a later attempt can succeed on. 408/409 are what OpenAI's own SDK retries.
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# 400 codes that mean "the provider's moderation said no to this item", not "the request is wrong".
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "moderation_blocked"})
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+)")


def split_base_urls(base_url: str | None = None) -> list[str]:
    """The server roots named by ``base_url`` (else ``$OPENAI_BASE_URL``, else the OpenAI API),
    split at commas (``http://gpu1:8000/v1,http://gpu2:8000/v1`` is a fleet of two), each
    checked to be an http(s) URL and stripped of a trailing ``/``."""
    text = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    urls = [part.strip().rstrip("/") for part in text.split(",")]
    if not all(urls):
        raise SptiError(f"base_url {text!r} has an empty entry; separate several endpoints with single commas")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SptiError(f"base_url {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return urls


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$OPENAI_BASE_URL``, else the OpenAI API; checked to be http(s).

    Several comma-separated URLs (a fleet) are each checked and come back joined by commas."""
    return ",".join(split_base_urls(base_url))


def _describe_one(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def describe_endpoint(base_url: str | None = None) -> str:
    """The URL private data would be sent to (as :func:`resolve_base_url` picks it), without any
    user:password part, for the "private images are sent to …" notice; a fleet's URLs are joined
    by ``", "``. Needs no network, no key and not the ``openai`` package."""
    return ", ".join(_describe_one(url) for url in split_base_urls(base_url))


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms`` first, then ``Retry-After``
    (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _derive_seed(seed: int, item: str) -> int:
    """One seed per item, so identical prompts in a batch sample differently yet reproducibly."""
    digest = hashlib.sha256(f"{seed}/{item}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _pixel_digest(image: Image) -> str:
    """Hash of the pixels (not of one PNG encoding), so a new Pillow never invalidates the cache."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _encode_image(image: Image, fmt: str, max_side: int | None) -> bytes:
    from PIL import Image as PILImage

    img = image if image.mode == "RGB" else image.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _decode_image(data: bytes) -> Image:
    from PIL import Image as PILImage

    img = PILImage.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _conversation_tokens(conversation: Conversation) -> int:
    total = 0
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            total += _approx_tokens(content) + 4
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "text":
                    total += _approx_tokens(str(part.get("text", "")))
                else:
                    total += 765
    return total


def _usage_numbers(usage: Any) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    prompt = getattr(usage, "prompt_tokens", None) or getattr(usage, "input_tokens", None) or 0
    completion = getattr(usage, "completion_tokens", None) or getattr(usage, "output_tokens", None) or 0
    return int(prompt), int(completion)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
