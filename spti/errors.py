"""Errors that the CLI shows as one clear line (no traceback) with a non-zero exit code."""

from __future__ import annotations


class SptiError(Exception):
    """A problem the user can fix; the message names the file or setting and says how."""

    exit_code: int = 2


class ModelNotFoundError(SptiError):
    """A model id or path could not be loaded (hub unreachable and not cached locally)."""


class BackendError(SptiError):
    """A model provider failed in a way that retrying will not fix (bad key, bad request, …)."""
