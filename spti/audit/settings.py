"""What an audit is told: its settings (all public choices), its constants and JSON helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.errors import SptiError

if TYPE_CHECKING:
    pass


NOT_DP_BANNER = "NOT differentially private — do not share"
NOT_DP_NOTE = (
    "This audit reads the private data and reports on individual private images and captions. Its results "
    "are NOT covered by the differential-privacy guarantee: keep them with the private data (run/private/, "
    "owner only) and never publish them."
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CANARY_PREFIX = "spti_canary_"
_CANARY_MARKER = ".spti_canary_audit"
#: Where a canary rerun writes its outputs (never ``release``: they are not for sharing).
CANARY_RUN_OUTPUTS = "audit_outputs"


@dataclass(frozen=True)
class AuditSettings:
    """Every knob of an audit; all of them are public choices (nothing is tuned on the private data)."""

    features: tuple[str, ...] = ("wavelet", "clip")
    percentile: float = 1.0  # reference percentile under which a released image is "too close"
    alpha: float = 0.01  # significance level of the release-level tests
    seed: int = 0  # public seed of the A/B split and of the canaries
    neighbours: int = 3  # nearest private images listed per released image and feature space
    image_size: int = 256  # images are loaded centre-cropped to this square, as the pipeline does
    pixel_size: int = 32  # side of the grayscale thumbnail of the pixel check
    max_shift: int = 3  # pixels (at pixel_size) searched in each direction by the pixel check
    ncc_threshold: float = 0.97  # normalised cross-correlation from which a pair is a near-duplicate
    ngram_sizes: tuple[int, ...] = (4, 8)
    verbatim_min_words: int = 6  # a shorter text contained in another is only "verbatim" from this length
    near_verbatim_words: int = 8  # a shared run of this many words is near-verbatim
    near_verbatim_char_ratio: float = 0.8  # … or a shared substring covering this share of the shorter text
    text_candidates: int = 5  # private captions compared in full per released description
    text_reference_limit: int = 2000  # held-out private captions used as the text reference
    device: str = "auto"
    batch_size: int = 32
    html_pairs: int = 24  # closest pairs shown in the report besides the flagged ones

    def validate(self) -> AuditSettings:
        if not self.features:
            raise SptiError("an audit needs at least one image feature space (--features)")
        if not 0 < self.percentile < 50:
            raise SptiError(f"--percentile {self.percentile}: use a value in (0, 50), e.g. 1")
        if not 0 < self.alpha < 1:
            raise SptiError(f"significance level {self.alpha} must be in (0, 1)")
        if not 0 < self.ncc_threshold <= 1:
            raise SptiError(f"NCC threshold {self.ncc_threshold} must be in (0, 1]")
        if self.pixel_size < 8 or self.pixel_size % 2:
            raise SptiError(f"pixel size {self.pixel_size} must be an even number >= 8")
        if not 0 <= self.max_shift < self.pixel_size // 4:
            raise SptiError(f"max shift {self.max_shift} must be in [0, {self.pixel_size // 4})")
        if not self.ngram_sizes or min(self.ngram_sizes) < 1:
            raise SptiError("n-gram sizes must be positive")
        return self


class _QuietReporter:
    """Stands in for :class:`spti.pipeline.Reporter` when the caller passes none."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def progress(self, description: str, total: int | None) -> Any:
        from contextlib import nullcontext

        return nullcontext(lambda n=1: None)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy to Python, non-finite floats to None, private ``_keys`` dropped."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
