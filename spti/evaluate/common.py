"""Names, constants and small helpers shared by the parts of :mod:`spti.evaluate`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from spti.errors import SptiError

METRICS: tuple[str, ...] = ("fid", "fd-dinov2", "fd-clip", "precision-recall", "clip-score", "wavelet", "text-fd")
IMAGE_METRICS = frozenset({"fid", "fd-dinov2", "fd-clip", "precision-recall", "clip-score", "wavelet"})

NOT_DP_WARNING = (
    "NOT differentially private: these results are computed from the private images and captions "
    "outside the DP mechanism. They are for the data owner only; do not share or publish them."
)
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINOV2 = "facebook/dinov2-small"
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

WAVELET = "haar"
WAVELET_LEVELS = 4
WAVELET_MAX_SIZE = 256  # common analysis size cap: enough for 4 levels, cheap to transform
SUBSET_SEED = 0  # --max-images picks a fixed pseudo-random subset, the same on every call

PROTOCOLS = ("native", "paper")
PAPER_SIZE = 256  # the paper's Resize(256) + CenterCrop(256) on both sides before FID
PAPER_REFERENCE_SIZE = 20_000  # private reference images drawn (from --seed) under --protocol paper
PAPER_RELEASE_SIZE = 2_000  # what the paper compared its reference with

# the metrics each feature space serves (for one "skipped …" line per space that cannot load)
ROLE_METRICS = {
    "inception": ("fid",),
    "dinov2": ("fd-dinov2",),
    "clip": ("fd-clip", "clip-score"),
}

Progress = Callable[[str], None]


def parse_metrics(value: str | Iterable[str] | None) -> list[str]:
    """Metric names from a comma list (or a sequence); ``None`` or ``"all"`` means every metric."""
    if value is None:
        return list(METRICS)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [m.strip().lower() for m in items if m.strip()]
    if not names or names == ["all"]:
        return list(METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise SptiError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)} (comma-separated)")
    return list(dict.fromkeys(names))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows; a torn last line (a run killed mid-write) is ignored, as the pipeline does."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def unavailable(reason: str, **info: Any) -> dict[str, Any]:
    return {"status": "unavailable", "reason": reason, **info}


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (the writer refuses NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value
