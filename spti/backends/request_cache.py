"""A content-addressed cache of model-provider responses in one SQLite file.

Why: a run that stops (Ctrl-C, crash, quota) and resumes must not pay twice for an answer it
already received, and must get the *same* answer back so the resumed run matches the one that
stopped. Each successful response is stored under the SHA-256 of what determines it (endpoint,
model, request body, parameters and the caller's item key), the moment it arrives.

What is stored: the key (a hash), endpoint, model, the response payload and its token usage.
Never the request itself (private images stay out of this file) and never credentials. The
responses can still be private (captions of private images, embeddings of private captions), so
the file lives in ``RUN_DIR/private/``, owner-only (0600, and so are its -wal/-shm files).

Concurrency: one connection guarded by a lock, so any thread (the provider's event-loop thread,
the caller's thread) can use it; WAL mode and a busy timeout let a second process read while
another writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spti.errors import SptiError

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key       TEXT PRIMARY KEY,
    endpoint  TEXT NOT NULL,
    model     TEXT NOT NULL,
    created   REAL NOT NULL,
    value     BLOB NOT NULL,
    usage     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# SQLite limits the number of bound parameters per statement (999 in old builds).
_LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class CachedResponse:
    """One stored answer: the raw payload bytes and the usage it cost when it was first fetched."""

    value: bytes
    usage: dict[str, int]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"__bytes_sha256__": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def cache_key(*, endpoint: str, model: str, request: Mapping[str, Any], item_key: str | None = None) -> str:
    """SHA-256 over a canonical JSON of everything that determines the answer.

    ``request`` is the body as sent (minus anything secret); ``bytes`` values are replaced by
    their hash so callers can describe images by their pixels rather than one PNG encoding.
    ``item_key`` names the sample, so identical prompts meant as different samples differ.

    ``endpoint`` is the API path (``chat/completions``), never the server: the key names the
    logical model and the request, not which replica answered, so one cache serves a whole fleet
    of endpoints and a resumed run gets the same answers from whichever replica is up. Servers
    that share a model name are taken to serve the same model.
    """
    document = {
        "v": _SCHEMA_VERSION,
        "endpoint": endpoint,
        "model": model,
        "request": _canonical(request),
        "item_key": item_key,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _create_owner_only(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it: its -wal and -shm files copy that mode.

    An existing cache made with a looser mode (older spti) is tightened, with its side files.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if side.stat().st_mode & 0o077:
                os.chmod(side, 0o600)


class RequestCache:
    """SQLite-backed map from request hash to response; safe to share between threads.

    ``path`` is created with its parent folders; ``":memory:"`` gives a throw-away cache.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            _create_owner_only(Path(self.path))
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode syncs at checkpoints only: a power cut may lose the last few
            # answers (they are then fetched again), never corrupt the file.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)",
                (str(_SCHEMA_VERSION),),
            )
        except sqlite3.DatabaseError as exc:
            raise SptiError(
                f"request cache {self.path} cannot be opened ({exc}); move it away to start a fresh cache"
            ) from exc
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RequestCache({self.path!r})"

    def get(self, key: str) -> CachedResponse | None:
        """The stored answer for ``key``, or ``None``."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """Stored answers for those of ``keys`` that are present (one query per 500 keys)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CachedResponse] = {}
        with self._lock:
            self._check_open()
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, value, usage FROM responses WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, value, usage in rows:
                    found[key] = CachedResponse(bytes(value), json.loads(usage))
        return found

    def put(self, key: str, *, endpoint: str, model: str, value: bytes, usage: Mapping[str, int] | None = None) -> None:
        """Store one successful answer (a later ``put`` under the same key replaces it)."""
        row = (key, endpoint, model, time.time(), sqlite3.Binary(value), json.dumps(dict(usage or {})))
        with self._lock:
            self._check_open()
            self._conn.execute(
                "INSERT OR REPLACE INTO responses(key, endpoint, model, created, value, usage) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; further use raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Fails when another process holds the file; its own close will checkpoint.
            with contextlib.suppress(sqlite3.DatabaseError):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SptiError(f"request cache {self.path} is closed")
