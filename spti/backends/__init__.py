"""Model backends. Interfaces in :mod:`spti.backends.base`; providers import heavy libraries lazily."""

from spti.backends.base import (
    Captioner,
    ChatMessage,
    Conversation,
    ImageEmbedder,
    ImageGenerator,
    TextEmbedder,
    TextGenerator,
    Upscaler,
)

__all__ = [
    "Captioner",
    "ChatMessage",
    "Conversation",
    "ImageEmbedder",
    "ImageGenerator",
    "TextEmbedder",
    "TextGenerator",
    "Upscaler",
]
