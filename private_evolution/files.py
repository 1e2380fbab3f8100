"""Atomic file writes, append-only JSONL and pickle-free array storage for checkpoints.

File modes: every write here creates its file owner-only (0600) unless a ``mode`` is given,
because most of what a PE run writes is either private or not meant to be shared; callers that
publish a file (a release) pass ``mode=0o644``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PRIVATE_FILE_MODE = 0o600
SHARED_FILE_MODE = 0o644


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write ``data`` so that readers see either the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = PRIVATE_FILE_MODE) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = PRIVATE_FILE_MODE) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", mode=mode)


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any], *, mode: int = PRIVATE_FILE_MODE) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    atomic_write_text(path, text, mode=mode)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class JsonlRecovery:
    """What :func:`recover_jsonl` found: the good rows, the bad lines it skipped, a torn tail it cut."""

    rows: list[dict[str, Any]]
    bad_lines: list[int]
    truncated_bytes: int


def recover_jsonl(path: str | os.PathLike[str], *, repair: bool = False) -> JsonlRecovery:
    """Rows of an append-only JSONL file that may have been killed mid-write.

    A last line without its newline is a torn write: it is ignored, and with ``repair=True`` cut
    off the file so that the next append starts on a clean line. A bad line in the middle (not a
    JSON object) is skipped and reported; the rows after it are still read.
    """
    path = Path(path)
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # everything after the last newline is a torn tail
    body, tail = data[:cut], data[cut:]
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for lineno, line in enumerate(body.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(lineno)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(lineno)
    if tail and repair:
        with open(path, "r+b") as fh:
            fh.truncate(cut)
    return JsonlRecovery(rows=rows, bad_lines=bad, truncated_bytes=len(tail))


def open_private_append(path: str | os.PathLike[str]) -> io.TextIOWrapper:
    """Open ``path`` for appending text, creating it owner-only (0600) if it does not exist."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    return open(fd, "a", encoding="utf-8")


def atomic_save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays as .npz. Object arrays are refused, so loading never needs pickle."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npy(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    if arr.dtype == object:
        raise TypeError("refusing to save an object array: it would need pickle")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
