"""Memorisation, text-overlap and canary audits of a finished run. The results are NOT DP.

A DP guarantee is a statement about the mechanism; an audit looks at one output next to the data
it came from, to catch what the guarantee cannot show by itself: a bug that bypasses the noise, a
pretrained generator that already knew a private image, a caption copied into the release, or a
mechanism that leaks more than its claimed ε. Because an audit reads the private data and reports
on individual private items, everything it writes goes to ``RUN_DIR/private/`` (owner only), never
to ``release/``, and every output says so.

Three checks:

- **Memorisation (images).** Every released image gets its nearest private images in two feature
  spaces (any :func:`~spti.backends.factory.build_image_embedder` spec) and in pixel space. The
  private set is split in two halves A/B by privacy unit with a public seed; the nearest-neighbour
  distance of each B image to A is the *fresh sample* reference (what a new draw from the data
  distribution, not in the reference set, looks like), and released → A is measured against the
  same reference set. Both folds are used (B→A and A→B), so a copy of any private image can be
  caught. A released image closer than the low reference percentile is flagged for review; the
  release as a whole is suspect when such images are significantly more frequent than the
  reference predicts (binomial test), and a one-sided Mann–Whitney and KS test say whether the
  released images are closer than fresh samples overall. The pixel check (grayscale thumbnails,
  normalised cross-correlation over small shifts) flags near-duplicates whatever the features.
- **Text overlap.** Released descriptions against private captions: the share of 4- and 8-grams
  found in any private caption, and for candidate pairs that share a rare n-gram the longest common
  substring in words and characters; verbatim and near-verbatim copies are flagged. The same
  measures of held-out private captions against the other half are the reference.
- **Canaries.** ``2K`` procedurally drawn canaries (saturated colour codes, unlike any photo); K of
  them, chosen at random, are planted into a copy of the private folder, and the pipeline is rerun
  with the run's configuration, once without canaries (control) and once with. A canary is *matched*
  when a released sample lies closer to it than any private image does. Planted vs held-out
  matches give a one-run membership test (Steinke, Nasr & Jagielski 2023) and an ε lower bound.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.errors import SptiError

if TYPE_CHECKING:
    from PIL.Image import Image

    from spti.backends.base import ImageEmbedder
    from spti.config import RunConfig
    from spti.rundir import RunDirectory

__all__ = [
    "NOT_DP_BANNER",
    "AuditSettings",
    "canary_image",
    "one_run_epsilon_lower_bound",
    "run_audit",
    "run_canary_audit",
    "text_overlap",
]

NOT_DP_BANNER = "NOT differentially private — do not share"
NOT_DP_NOTE = (
    "This audit reads the private data and reports on individual private images and captions. Its results "
    "are NOT covered by the differential-privacy guarantee: keep them with the private data (run/private/, "
    "owner only) and never publish them."
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CANARY_PREFIX = "spti_canary_"
_CANARY_MARKER = ".spti_canary_audit"


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


# --------------------------------------------------------------------------------------------
# Loading and embedding images
# --------------------------------------------------------------------------------------------
@dataclass
class _ImageSet:
    """Images of one side of the audit: names, privacy units, features per space, pixel thumbnails."""

    names: list[str]
    paths: list[Path]
    units: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.names)


def _pixel_signature(image: Image, size: int) -> np.ndarray:
    from PIL import Image as PILImage

    gray = image.convert("L").resize((size, size), PILImage.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def _embed_images(
    names: Sequence[str],
    paths: Sequence[Path],
    units: Sequence[str],
    embedders: dict[str, ImageEmbedder],
    settings: AuditSettings,
    reporter: Any,
    label: str,
) -> _ImageSet:
    """Load each image once (batch by batch) and keep only its features and thumbnail.

    Holding 30k decoded images would not fit in memory; features and 1 KB thumbnails do. An
    unreadable file is reported and left out rather than stopping an audit that is otherwise fine.
    """
    from spti.data import load_image

    kept_names: list[str] = []
    kept_paths: list[Path] = []
    kept_units: list[str] = []
    feats: dict[str, list[np.ndarray]] = {spec: [] for spec in embedders}
    pixels: list[np.ndarray] = []
    step = max(16, settings.batch_size)
    with reporter.progress(f"audit: {label} images", len(paths)) as advance:
        for start in range(0, len(paths), step):
            batch: list[Image] = []
            for name, path, unit in zip(
                names[start : start + step], paths[start : start + step], units[start : start + step], strict=True
            ):
                try:
                    batch.append(load_image(path, size=settings.image_size))
                except SptiError as exc:
                    reporter.warn(f"audit: {exc}")
                    continue
                kept_names.append(name)
                kept_paths.append(Path(path))
                kept_units.append(unit)
            if batch:
                for spec, embedder in embedders.items():
                    feats[spec].append(np.asarray(embedder.embed(batch), dtype=np.float32))
                pixels.extend(_pixel_signature(im, settings.pixel_size) for im in batch)
            advance(min(step, len(paths) - start))
    out = _ImageSet(kept_names, kept_paths, kept_units)
    for spec, chunks in feats.items():
        out.features[spec] = (
            np.concatenate(chunks) if chunks else np.zeros((0, getattr(embedders[spec], "dim", 1)), np.float32)
        )
    size = settings.pixel_size
    out.pixels = np.stack(pixels) if pixels else np.zeros((0, size, size), dtype=np.uint8)
    return out


def _build_embedders(settings: AuditSettings) -> dict[str, ImageEmbedder]:
    from spti.backends.factory import build_image_embedder

    return {
        spec: build_image_embedder(spec, device=settings.device, batch_size=settings.batch_size)
        for spec in settings.features
    }


def _released_images(run: RunDirectory) -> list[Path]:
    folder = run.release / "images"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resolve_private_dir(run: RunDirectory, private_dir: str | Path | None) -> Path:
    """The private folder to audit against: the one given, else the one the run's manifest records."""
    if private_dir is None:
        manifest = run.private / "manifest.json"
        if not manifest.exists():
            raise SptiError(f"{run.root} records no private folder (no private/manifest.json); pass --private DIR")
        private_dir = json.loads(manifest.read_text())["root"]
    path = Path(private_dir).expanduser()
    if not path.exists():
        raise SptiError(f"private folder {path} does not exist; pass --private with the folder the run was made from")
    if not path.is_dir():
        raise SptiError(f"{path} is not a folder; pass --private with the folder of private images")
    return path.resolve()


def _private_entries(run: RunDirectory, private_dir: Path, reporter: Any) -> list[tuple[str, str]]:
    """(relpath, privacy unit) of the private images the run used, located under ``private_dir``.

    The manifest is the list of images that voted, with their units; a run without one (made from
    bring-your-own captions, say) has the folder scanned with the run's privacy unit instead.
    """
    manifest = run.private / "manifest.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text()).get("images", [])
        present = [(r["relpath"], str(r["unit"])) for r in rows if (private_dir / r["relpath"]).is_file()]
        if rows and not present:
            raise SptiError(
                f"{private_dir} does not hold the images of this run (e.g. {rows[0]['relpath']}); "
                "pass --private with the folder the run was made from"
            )
        if len(present) < len(rows):
            reporter.warn(f"audit: {len(rows) - len(present)} private images of the run are missing from {private_dir}")
        if present:
            return present
    from spti.data import scan_private_folder

    cfg = run.load_config()
    folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit)  # type: ignore[arg-type]
    return [(im.relpath, im.unit) for im in folder.images]


# --------------------------------------------------------------------------------------------
# Nearest neighbours and the held-out reference
# --------------------------------------------------------------------------------------------
def _knn(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in Euclidean distance (not squared), ``k`` clipped to the number of keys."""
    from private_evolution.histogram import nearest_neighbors

    k = min(k, len(keys))
    if len(queries) == 0 or k == 0:
        return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.float64)
    idx, d2 = nearest_neighbors(queries.astype(np.float32), keys.astype(np.float32), k=k, metric="l2")
    return idx, np.sqrt(np.maximum(d2.astype(np.float64), 0.0))


def split_units(units: Sequence[str], seed: int) -> np.ndarray:
    """True for rows in half A. Whole privacy units go to one half, chosen with a public seed.

    Splitting by unit matters: with one folder per person, a B photo whose person also has photos in
    A would make "fresh" samples look far closer than a new person would, and the reference would
    hide memorisation of that person. Under image-level units, another photo of the same person is
    exactly what DP allows the release to resemble.
    """
    distinct = sorted(set(units))
    order = np.random.default_rng([seed, 0xA0D17]).permutation(len(distinct))
    in_a = {distinct[i] for i in order[: (len(distinct) + 1) // 2]}
    return np.array([u in in_a for u in units], dtype=bool)


def _order_threshold(reference: np.ndarray, percentile: float) -> tuple[float, int, float]:
    """Threshold at an order statistic of the reference, its rank j, and P(fresh sample < it) = j/(n+1).

    Taking an order statistic rather than an interpolated percentile makes the null rate exact for
    exchangeable samples, which matters for small private sets: with 7 reference distances, "the
    1st percentile" can only mean "below the smallest", which a fresh sample does 1 time in 8.
    """
    ref = np.sort(reference)
    n = len(ref)
    j = max(1, math.floor(percentile / 100.0 * (n + 1)))
    j = min(j, n)
    return float(ref[j - 1]), j, j / (n + 1)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    qs = {"min": 0.0, "p01": 1.0, "p05": 5.0, "p50": 50.0, "p95": 95.0, "max": 100.0}
    return {name: float(np.percentile(values, q)) for name, q in qs.items()}


def _one_sided_tests(released: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mann–Whitney U and KS, one-sided: are released distances smaller than fresh-sample ones?"""
    from scipy import stats

    if len(released) == 0 or len(reference) == 0:
        return {"mann_whitney_p": None, "ks_p": None}
    mw = stats.mannwhitneyu(released, reference, alternative="less")
    # scipy's 'greater': the first sample's CDF lies above the second's, i.e. its values are smaller
    ks = stats.ks_2samp(released, reference, alternative="greater")
    return {
        "mann_whitney_u": float(mw.statistic),
        "mann_whitney_p": float(mw.pvalue),
        "ks_statistic": float(ks.statistic),
        "ks_p": float(ks.pvalue),
    }


def _fold(released: np.ndarray, held_in: np.ndarray, held_out: np.ndarray, settings: AuditSettings) -> dict[str, Any]:
    """One fold: released → held_in against held_out → held_in (the fresh-sample reference)."""
    from scipy import stats

    _, d_rel = _knn(released, held_in, 1)
    _, d_ref = _knn(held_out, held_in, 1)
    d_rel, d_ref = d_rel[:, 0], d_ref[:, 0]
    threshold, rank, null_rate = _order_threshold(d_ref, settings.percentile)
    below = (d_rel < threshold) | (d_rel <= 0.0)
    count = int(below.sum())
    binom = stats.binomtest(count, len(d_rel), null_rate, alternative="greater").pvalue if len(d_rel) else 1.0
    return {
        "threshold": threshold,
        "reference_size": len(d_ref),
        "reference_rank": rank,
        "expected_fraction": null_rate,
        "num_below": count,
        "fraction_below": count / len(d_rel) if len(d_rel) else 0.0,
        "binomial_p": float(binom),
        **_one_sided_tests(d_rel, d_ref),
        "_released": d_rel,
        "_reference": d_ref,
        "_below": below,
    }


def _feature_audit(spec: str, released: _ImageSet, private: _ImageSet, in_a: np.ndarray, s: AuditSettings) -> dict:
    """Nearest private images of every released image in one space, and the two-fold reference test."""
    rel, priv = released.features[spec], private.features[spec]
    nn_idx, nn_dist = _knn(rel, priv, s.neighbours)
    out: dict[str, Any] = {
        "spec": spec,
        "dim": int(priv.shape[1]) if priv.ndim == 2 else 0,
        "distance": "euclidean",
        "_nn_idx": nn_idx,
        "_nn_dist": nn_dist,
    }
    if in_a.all() or not in_a.any():
        out["reference"] = None
        out["note"] = "fewer than two privacy units: no held-out reference, nearest neighbours only"
        out["_below"] = np.zeros(len(released), dtype=bool)
        out["_score"] = np.full(len(released), np.inf)
        return out
    folds = {
        "A": _fold(rel, priv[in_a], priv[~in_a], s),  # released → A vs B → A
        "B": _fold(rel, priv[~in_a], priv[in_a], s),  # released → B vs A → B
    }
    below = folds["A"]["_below"] | folds["B"]["_below"]
    # distance relative to the fold threshold: < 1 is "closer than the reference percentile"
    score = np.minimum(
        folds["A"]["_released"] / max(folds["A"]["threshold"], 1e-12),
        folds["B"]["_released"] / max(folds["B"]["threshold"], 1e-12),
    )
    bonferroni = min(1.0, 2 * min(folds["A"]["binomial_p"], folds["B"]["binomial_p"]))
    mw = [f["mann_whitney_p"] for f in folds.values() if f["mann_whitney_p"] is not None]
    closer_p = min(1.0, 2 * min(mw)) if mw else None
    out.update(
        folds=folds,
        num_flagged=int(below.sum()),
        fraction_flagged=float(below.mean()) if len(below) else 0.0,
        expected_fraction_at_most=folds["A"]["expected_fraction"] + folds["B"]["expected_fraction"],
        excess_p=bonferroni,
        suspected=bool(bonferroni < s.alpha),
        closer_than_fresh_p=closer_p,
        closer_than_fresh=bool(closer_p is not None and closer_p < s.alpha),
        released_quantiles=_quantiles(np.concatenate([folds["A"]["_released"], folds["B"]["_released"]])),
        reference_quantiles=_quantiles(np.concatenate([folds["A"]["_reference"], folds["B"]["_reference"]])),
        _below=below,
        _score=score,
    )
    return out


# --------------------------------------------------------------------------------------------
# Pixel-space near duplicates
# --------------------------------------------------------------------------------------------
def _box_sums(x: np.ndarray, w: int) -> np.ndarray:
    """Sums of every w×w window of the last two axes (integral image), in float64."""
    integral = np.zeros((*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1))
    integral[..., 1:, 1:] = x.cumsum(axis=-2, dtype=np.float64).cumsum(axis=-1)
    return integral[..., w:, w:] - integral[..., :-w, w:] - integral[..., w:, :-w] + integral[..., :-w, :-w]


def _template_ncc(queries: np.ndarray, keys: np.ndarray, max_shift: int) -> np.ndarray:
    """Best normalised cross-correlation of each query with each of its keys over small shifts.

    ``queries`` is (b, S, S), ``keys`` (b, c, S, S), both in [0, 1]. The central (S − 2s)² crop of
    a query is matched against every window of the key within ±s pixels (template matching), so a
    translated copy still scores ~1; NCC ignores brightness and contrast, so a brightened copy does
    too. Two flat (constant) patches count as a match when they are equally bright. Returns (b, c).
    """
    s = max_shift
    size = queries.shape[-1]
    w = size - 2 * s
    t = queries[:, s : size - s, s : size - s].astype(np.float64)
    t_mean = t.mean(axis=(1, 2), keepdims=True)
    t0 = t - t_mean
    t_norm = np.sqrt((t0 * t0).sum(axis=(1, 2)))  # (b,)
    n = w * w
    sums = _box_sums(keys, w)  # (b, c, 2s+1, 2s+1)
    sq = _box_sums(keys.astype(np.float64) ** 2, w)
    k_norm = np.sqrt(np.maximum(sq - sums * sums / n, 0.0))
    num = np.empty_like(sums)
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            # t0 has zero mean, so Σ t0·(window − mean) = Σ t0·window
            num[:, :, dy, dx] = np.einsum("bij,bcij->bc", t0, keys[:, :, dy : dy + w, dx : dx + w])
    flat_t = (t_norm < 1e-3 * w)[:, None, None, None]
    flat_k = k_norm < 1e-3 * w
    with np.errstate(invalid="ignore", divide="ignore"):
        ncc = num / (t_norm[:, None, None, None] * k_norm)
    same_flat = flat_t & flat_k & (np.abs(sums / n - t_mean[:, :, :, None]) < 2 / 255)
    ncc = np.where(flat_t | flat_k, np.where(same_flat, 1.0, 0.0), ncc)
    return ncc.reshape(*ncc.shape[:2], -1).max(axis=-1)


def _pixel_search(
    queries: np.ndarray, keys: np.ndarray, *, max_shift: int, candidates: int = 8, block: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest key of each query in pixel space: (index, best NCC, mean absolute difference).

    An exact search over all pairs and shifts would cost N·M·(2s+1)²; instead the candidates are
    the nearest keys at half resolution by NCC (cosine of centred thumbnails) and by plain L2, and
    only those are compared at full resolution with the shift search. A copy is its own nearest
    neighbour in both, so it is never missed.
    """
    n = len(queries)
    if n == 0 or len(keys) == 0:
        return np.zeros(n, np.int64), np.zeros(n), np.ones(n)
    from private_evolution.histogram import nearest_neighbors

    def small(x: np.ndarray) -> np.ndarray:
        s = x.shape[-1] // 2
        return x.astype(np.float32).reshape(len(x), s, 2, s, 2).mean(axis=(2, 4)).reshape(len(x), -1) / 255.0

    qs, ks = small(queries), small(keys)
    qc, kc = qs - qs.mean(axis=1, keepdims=True), ks - ks.mean(axis=1, keepdims=True)
    c = min(candidates, len(keys))
    by_ncc, _ = nearest_neighbors(qc, kc, k=c, metric="cosine")
    by_l2, _ = nearest_neighbors(qs, ks, k=c, metric="l2")
    cands = np.concatenate([by_ncc, by_l2], axis=1)  # a key found by both is scored twice: harmless
    best_idx = np.zeros(n, np.int64)
    best_ncc = np.zeros(n)
    mad = np.ones(n)
    for start in range(0, n, block):
        q = queries[start : start + block].astype(np.float32) / 255.0
        cand = cands[start : start + block]
        k = keys[cand].astype(np.float32) / 255.0  # (b, 2c, S, S)
        scores = _template_ncc(q, k, max_shift)
        j = np.argmax(scores, axis=1)
        rows = np.arange(len(q))
        best_idx[start : start + block] = cand[rows, j]
        best_ncc[start : start + block] = scores[rows, j]
        mad[start : start + block] = np.abs(k[rows, j] - q).mean(axis=(1, 2))
    return best_idx, best_ncc, mad


def _pixel_audit(released: _ImageSet, private: _ImageSet, in_a: np.ndarray, s: AuditSettings) -> dict[str, Any]:
    idx, ncc, mad = _pixel_search(released.pixels, private.pixels, max_shift=s.max_shift)
    dup = ncc >= s.ncc_threshold
    out: dict[str, Any] = {
        "thumbnail": f"{s.pixel_size}x{s.pixel_size} grayscale",
        "max_shift": s.max_shift,
        "ncc_threshold": s.ncc_threshold,
        "num_near_duplicates": int(dup.sum()),
        "max_ncc": float(ncc.max()) if len(ncc) else None,
        "released_quantiles": _quantiles(ncc),
        "_idx": idx,
        "_ncc": ncc,
        "_mad": mad,
        "_dup": dup,
    }
    if in_a.any() and not in_a.all():
        # context: how alike distinct private images already are (bursts, same-person photos)
        _, ref_a, _ = _pixel_search(private.pixels[~in_a], private.pixels[in_a], max_shift=s.max_shift)
        _, ref_b, _ = _pixel_search(private.pixels[in_a], private.pixels[~in_a], max_shift=s.max_shift)
        ref = np.concatenate([ref_a, ref_b])
        out["reference_quantiles"] = _quantiles(ref)
        out["reference_above_threshold"] = int((ref >= s.ncc_threshold).sum())
        out["_reference"] = ref
    return out


# --------------------------------------------------------------------------------------------
# Text overlap
# --------------------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _gram_hashes(words: Sequence[str], n: int) -> list[int]:
    return [hash("\x1f".join(words[i : i + n])) for i in range(len(words) - n + 1)]


def _longest_common_run(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Longest common contiguous run of two integer sequences: (length, end index in ``a``).

    Dynamic programming row by row, vectorised over ``b``: O(len a) numpy steps of O(len b).
    """
    if len(a) == 0 or len(b) == 0:
        return 0, 0
    prev = np.zeros(len(b) + 1, dtype=np.int32)
    best, best_end = 0, 0
    for i in range(len(a)):
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == a[i], prev[:-1] + 1, 0)
        m = int(cur.max())
        if m > best:
            best, best_end = m, i + 1
        prev = cur
    return best, best_end


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class _CaptionIndex:
    """n-gram sets of a caption corpus and postings of its smallest n-gram, for candidate search.

    N-grams are stored as 64-bit hashes: 30k captions × ~70 n-grams fit in a few tens of MB.
    Postings of very common n-grams ("a photo of a") are skipped for candidate search, as they
    pair every description with thousands of captions and say nothing about copying.
    """

    def __init__(self, texts: Sequence[str], sizes: Sequence[int]) -> None:
        self.texts = list(texts)
        self.words = [_words(t) for t in self.texts]
        self.sizes = tuple(sorted(set(sizes)))
        self.n = self.sizes[0]
        self.grams: dict[int, set[int]] = {n: set() for n in self.sizes}
        self.postings: dict[int, list[int]] = defaultdict(list)
        self.exact: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, w in enumerate(self.words):
            for n in self.sizes:
                self.grams[n].update(_gram_hashes(w, n))
            for h in set(_gram_hashes(w, self.n)):
                self.postings[h].append(i)
            self.exact[tuple(w)].append(i)
        self.max_postings = max(50, len(self.texts) // 100)
        self.vocab: dict[str, int] = {}

    def ids(self, words: Sequence[str]) -> np.ndarray:
        return np.array([self.vocab.setdefault(w, len(self.vocab)) for w in words], dtype=np.int64)

    def overlap(self, words: Sequence[str], n: int) -> float | None:
        grams = set(_gram_hashes(words, n))
        return len(grams & self.grams[n]) / len(grams) if grams else None

    def candidates(self, words: Sequence[str], limit: int) -> list[int]:
        exact = self.exact.get(tuple(words), [])
        counts: Counter[int] = Counter()
        common: list[int] = []
        for h in set(_gram_hashes(words, self.n)):
            posting = self.postings.get(h)
            if not posting:
                continue
            if len(posting) > self.max_postings:
                common.append(h)
                continue
            counts.update(posting)
        if not counts:  # only common n-grams shared: still look at a few of their captions
            for h in common:
                counts.update(self.postings[h][: self.max_postings])
        ranked = [i for i, _ in counts.most_common(limit)]
        return list(dict.fromkeys([*exact[:limit], *ranked]))[: max(limit, len(exact[:limit]))]


def _match_texts(queries: Sequence[str], index: _CaptionIndex, s: AuditSettings) -> list[dict[str, Any]]:
    """For each query text: n-gram overlap with the corpus and its closest corpus text by shared runs."""
    rows = []
    for text in queries:
        words = _words(text)
        row: dict[str, Any] = {
            "words": len(words),
            "overlap": {str(n): index.overlap(words, n) for n in index.sizes},
            "match": None,
            "lcs_words": 0,
            "lcs_chars": 0,
            "verbatim": False,
            "near_verbatim": False,
        }
        cands = index.candidates(words, s.text_candidates)
        if cands:
            q_ids = index.ids(words)
            scored = []
            for j in cands:
                length, end = _longest_common_run(q_ids, index.ids(index.words[j]))
                scored.append((length, j, end))
            length, j, end = max(scored, key=lambda t: (t[0], -t[1]))
            norm_q = " ".join(text.lower().split())
            norm_c = " ".join(index.texts[j].lower().split())
            a, b = (norm_q, norm_c) if len(norm_q) <= len(norm_c) else (norm_c, norm_q)
            lcs_chars, _ = _longest_common_run(_codes(a), _codes(b))
            other = index.words[j]
            shorter_words = min(len(words), len(other))
            shorter_chars = min(len(norm_q), len(norm_c))
            verbatim = bool(words) and (
                list(words) == list(other) or (length == shorter_words and shorter_words >= s.verbatim_min_words)
            )
            near = not verbatim and (
                length >= s.near_verbatim_words
                or (shorter_chars >= 24 and lcs_chars >= s.near_verbatim_char_ratio * shorter_chars)
            )
            row.update(
                match=j,
                lcs_words=int(length),
                lcs_chars=int(lcs_chars),
                shared=" ".join(words[end - length : end]) if length else "",
                verbatim=verbatim,
                near_verbatim=bool(near),
            )
        rows.append(row)
    return rows


def text_overlap(
    released: Sequence[str],
    private: Sequence[str],
    *,
    private_units: Sequence[str] | None = None,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """Released descriptions against private captions, with held-out private captions as reference.

    Only candidate pairs that share an n-gram are compared in full, so the cost grows with the
    number of texts, not with their product (10k descriptions × 30k captions: about 20 s on one
    core). ``items`` holds one row per released text: its n-gram overlap, the index of its closest
    private caption (``match``), the longest shared run in words and characters, and the flags.
    """
    s = (settings or AuditSettings()).validate()
    index = _CaptionIndex(private, s.ngram_sizes)
    rows = _match_texts(released, index, s)
    out: dict[str, Any] = {
        "num_released": len(released),
        "num_private": len(private),
        "ngram_sizes": list(index.sizes),
        "mean_ngram_overlap": {
            str(n): _mean([r["overlap"][str(n)] for r in rows if r["overlap"][str(n)] is not None]) for n in index.sizes
        },
        "num_verbatim": sum(r["verbatim"] for r in rows),
        "num_near_verbatim": sum(r["near_verbatim"] for r in rows),
        "lcs_words_quantiles": _quantiles(np.array([r["lcs_words"] for r in rows], dtype=float)),
        "items": rows,
        "_index": index,
    }
    units = list(private_units) if private_units is not None else [str(i) for i in range(len(private))]
    in_a = split_units(units, s.seed) if len(private) > 1 else np.ones(len(private), bool)
    if in_a.any() and not in_a.all():
        a_texts = [t for t, a in zip(private, in_a, strict=True) if a]
        b_texts = [t for t, a in zip(private, in_a, strict=True) if not a]
        if len(b_texts) > s.text_reference_limit:
            pick = np.random.default_rng([s.seed, 0x7E47]).choice(len(b_texts), s.text_reference_limit, replace=False)
            b_texts = [b_texts[i] for i in sorted(pick)]
        ref = _match_texts(b_texts, _CaptionIndex(a_texts, s.ngram_sizes), s)
        out["reference"] = {
            "what": "held-out private captions (half B) against the other half (A)",
            "num_queries": len(ref),
            "mean_ngram_overlap": {
                str(n): _mean([r["overlap"][str(n)] for r in ref if r["overlap"][str(n)] is not None])
                for n in index.sizes
            },
            "lcs_words_quantiles": _quantiles(np.array([r["lcs_words"] for r in ref], dtype=float)),
            "fraction_verbatim": _mean([float(r["verbatim"]) for r in ref]),
            "fraction_near_verbatim": _mean([float(r["near_verbatim"]) for r in ref]),
        }
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --------------------------------------------------------------------------------------------
# Canaries
# --------------------------------------------------------------------------------------------
_CANARY_PALETTE = np.array(
    [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 255),
        (255, 128, 0),
        (128, 0, 255),
    ],
    dtype=np.uint8,
)


def canary_image(index: int, *, size: int = 256, seed: int = 0) -> Image:
    """A canary: a 4×4 code of saturated colours under a black geometric overlay.

    Unlike any photograph (fully saturated flat blocks, hard edges), different for every index (8¹⁶
    colour codes), and coarse enough that low-frequency features (wavelet) and pixel thumbnails
    tell canaries apart as well as deep features do.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rng = np.random.default_rng([seed, 0xCA7A2, index])
    code = rng.integers(len(_CANARY_PALETTE), size=(4, 4))
    image = PILImage.fromarray(_CANARY_PALETTE[code]).resize((size, size), PILImage.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    width = max(1, size // 48)
    pattern = int(rng.integers(3))
    if pattern == 0:  # concentric rings
        step = size // int(rng.integers(5, 9))
        for r in range(step, size, step):
            c = size / 2
            draw.ellipse((c - r, c - r, c + r, c + r), outline=(0, 0, 0), width=width)
    elif pattern == 1:  # diagonal stripes
        step = size // int(rng.integers(5, 9))
        for x in range(-size, 2 * size, step):
            draw.line((x, 0, x + size, size), fill=(0, 0, 0), width=width)
    else:  # grid of diamonds
        step = size // int(rng.integers(3, 6))
        for cy in range(step // 2, size, step):
            for cx in range(step // 2, size, step):
                h = step // 3
                draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], outline=(0, 0, 0), width=width)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(255, 255, 255), width=max(2, size // 32))
    return image


def one_run_epsilon_lower_bound(guesses: int, correct: int, *, confidence: float = 0.95) -> float:
    """ε below which ``correct`` right membership guesses out of ``guesses`` would be too unlikely.

    Steinke, Nasr & Jagielski (2023), "Privacy auditing with one (1) training run": when each canary
    is planted with probability 1/2 and the mechanism is ε-DP, the number of correct guesses is
    dominated by Binomial(guesses, e^ε/(1+e^ε)). The bound is the largest ε whose tail probability
    of the observed count stays below 1 − confidence (δ is ignored: pure-ε form).
    """
    from scipy import stats

    if guesses <= 0 or correct <= 0:
        return 0.0
    alpha = 1.0 - confidence

    def tail(eps: float) -> float:
        return float(stats.binom.sf(correct - 1, guesses, 1.0 / (1.0 + math.exp(-eps))))

    if tail(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 50.0
    if tail(hi) <= alpha:
        return hi
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= alpha else (lo, mid)
    return lo


def _two_run_epsilon_lower_bound(tp: int, n_pos: int, fp: int, n_neg: int, delta: float, confidence: float) -> float:
    """ln((TPR_low − δ) / FPR_high) with Clopper–Pearson bounds: the classic two-dataset test."""
    from scipy import stats

    if n_pos == 0 or n_neg == 0 or tp == 0:
        return 0.0
    alpha = (1 - confidence) / 2
    tpr_lo = float(stats.beta.ppf(alpha, tp, n_pos - tp + 1))
    fpr_hi = float(stats.beta.ppf(1 - alpha, fp + 1, n_neg - fp)) if fp < n_neg else 1.0
    if tpr_lo - delta <= 0 or fpr_hi <= 0:
        return 0.0
    return max(0.0, math.log((tpr_lo - delta) / fpr_hi))


def _canary_matches(
    canaries: _ImageSet, released: _ImageSet, private: _ImageSet, s: AuditSettings
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which canaries a release matches, with the per-space thresholds and distances.

    A released image matches a canary in a feature space when it is closer to that canary than
    (a) any non-canary private image is to any canary, and (b) half the distance between the two
    closest canaries (so the match names one canary, not the canary style). Both come from
    canaries and private images only, never from the release being scored, so the threshold is the
    same for the planted run and the controls. Pixel-space NCC ≥ the near-duplicate threshold also
    counts.
    """
    matched = np.zeros(len(canaries), dtype=bool)
    detail: dict[str, Any] = {}
    for spec, feats in canaries.features.items():
        _, to_private = _knn(feats, private.features[spec], 1)
        _, to_canary = _knn(feats, feats, 2)
        inter = to_canary[:, 1] if to_canary.shape[1] > 1 else np.array([np.inf])
        threshold = float(min(to_private.min() if to_private.size else np.inf, 0.5 * inter.min()))
        idx, dist = _knn(feats, released.features[spec], 1)
        hit = dist[:, 0] < threshold if dist.size else np.zeros(len(canaries), bool)
        matched |= hit
        detail[spec] = {
            "threshold": threshold,
            "distances": dist[:, 0].tolist() if dist.size else [],
            "nearest_released": [released.names[i] for i in idx[:, 0]] if idx.size else [],
            "matched": hit.tolist(),
        }
    idx, ncc, _ = _pixel_search(canaries.pixels, released.pixels, max_shift=s.max_shift)
    hit = ncc >= s.ncc_threshold if len(released) else np.zeros(len(canaries), bool)
    matched |= hit
    detail["pixel"] = {
        "threshold": s.ncc_threshold,
        "ncc": ncc.tolist(),
        "nearest_released": [released.names[i] for i in idx] if len(released) else [],
        "matched": hit.tolist(),
    }
    return matched, detail


def _fmt_eps(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value or "?")


def _default_pipeline(cfg: RunConfig, private_dir: Path, run: RunDirectory, reporter: Any) -> Any:
    from spti.pipeline import synthesize

    return synthesize(cfg, private_dir, run, reporter)


def run_canary_audit(
    run_dir: str | Path,
    private_dir: str | Path | None,
    k: int,
    *,
    settings: AuditSettings | None = None,
    reporter: Any = None,
    pipeline: Callable[..., Any] | None = None,
    keep_copy: bool = False,
    _shared: tuple[dict[str, ImageEmbedder], _ImageSet] | None = None,
) -> dict[str, Any]:
    """Plant ``k`` canaries into a copy of the private folder, rerun the pipeline, count matches.

    Two runs, both with the run's saved configuration (same ε, iterations, voting, models, seed)
    under ``RUN_DIR/private/canary_audit/``: a control on the copy without canaries, then the same
    copy with the k planted canaries. ``2k`` canaries are drawn; which k are planted is random (public
    seed), the other k are held out. The user's folder is only read.

    ``pipeline(cfg, private_dir, run_directory, reporter)`` defaults to :func:`spti.pipeline.synthesize`;
    tests pass a deliberately leaky one to show the audit catches a leak.
    """
    from private_evolution.files import atomic_write_json
    from spti.rundir import RunDirectory

    s = (settings or AuditSettings()).validate()
    reporter = reporter or _QuietReporter()
    pipeline = pipeline or _default_pipeline
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise SptiError(f"--canaries {k}: use a number of canaries between 1 and 1000 (0 skips the canary audit)")
    run = RunDirectory(run_dir)
    cfg = run.load_config()
    private_root = resolve_private_dir(run, private_dir)
    entries = _private_entries(run, private_root, reporter)
    clash = [rel for rel, _ in entries if rel.split("/")[0].startswith(CANARY_PREFIX)]
    if clash:
        raise SptiError(f"private image {clash[0]} uses the canary name prefix {CANARY_PREFIX!r}; rename it")
    if cfg.provider == "openai":
        reporter.warn(
            "canary audit: the pipeline runs twice more; private images and canaries are sent again to the "
            "hosted provider, at the cost of two full runs"
        )

    work = run.ensure_private() / "canary_audit"
    if work.exists():
        if not (work / _CANARY_MARKER).exists():
            raise SptiError(f"{work} exists and was not made by spti audit; move it away")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / _CANARY_MARKER).write_text("made by spti audit; safe to delete\n")

    # the canaries: 2k drawn, k planted at random (the one-run audit needs the coin flips)
    order = np.random.default_rng([s.seed, 0xC0FFEE]).permutation(2 * k)
    planted = np.zeros(2 * k, dtype=bool)
    planted[order[:k]] = True
    canary_dir = work / "canaries"
    canary_dir.mkdir()
    canary_paths = []
    for i in range(2 * k):
        path = canary_dir / f"canary_{i:03d}_{'planted' if planted[i] else 'heldout'}.png"
        canary_image(i, size=max(64, cfg.voting_size), seed=s.seed).save(path, format="PNG")
        canary_paths.append(path)

    copy = work / "private_copy"
    reporter.info(f"canary audit: copying {len(entries)} private images to {copy}")
    for rel, _ in entries:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(private_root / rel, target)

    runs: dict[str, RunDirectory] = {}
    try:
        for name in ("control", "canaries"):
            if name == "canaries":
                for i in np.flatnonzero(planted):
                    folder = copy / f"{CANARY_PREFIX}{int(i):03d}"  # its own folder: one unit either way
                    folder.mkdir()
                    shutil.copyfile(canary_paths[i], folder / "canary.png")
            target = RunDirectory(work / f"run_{name}")
            target.create(cfg)
            reporter.info(f"canary audit: pipeline run '{name}' in {target.root}")
            pipeline(cfg, copy, target, reporter)
            runs[name] = target
    finally:
        if not keep_copy:
            shutil.rmtree(copy, ignore_errors=True)

    if _shared is not None:
        embedders, private = _shared
    else:
        embedders = _build_embedders(s)
        rels = [rel for rel, _ in entries]
        private = _embed_images(
            rels, [private_root / r for r in rels], [u for _, u in entries], embedders, s, reporter, "private"
        )
    names = [p.name for p in canary_paths]
    canaries = _embed_images(names, canary_paths, names, embedders, s, reporter, "canary")
    results: dict[str, Any] = {}
    for name, target in runs.items():
        paths = _released_images(target)
        released = _embed_images(
            [p.name for p in paths], paths, [p.name for p in paths], embedders, s, reporter, f"{name} run's released"
        )
        matched, detail = _canary_matches(canaries, released, private, s)
        results[name] = {"run_dir": str(target.root), "num_released": len(released), "matched": matched, **detail}

    in_canary_run = results["canaries"]["matched"]
    in_control = results["control"]["matched"]
    tp = int((in_canary_run & planted).sum())
    held = int((in_canary_run & ~planted).sum())
    ctrl = int((in_control & planted).sum())
    rate = tp / k
    baseline = max(held, ctrl) / k
    privacy_path = runs["canaries"].release / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {}
    delta = float(privacy.get("delta") or 0.0)
    guesses = int(in_canary_run.sum())
    one_run = one_run_epsilon_lower_bound(guesses, tp)
    two_run = _two_run_epsilon_lower_bound(tp, k, ctrl, k, delta, 0.95)
    min_k = math.ceil(math.log(0.05) / math.log(0.5))  # perfect separation needs 0.5^K < 0.05
    statement = (
        f"{tp}/{k} planted canaries were matched by a released sample, against {held}/{k} held-out canaries in "
        f"the same run and {ctrl}/{k} of the same canaries in a control run without them. "
        f"One-run audit: ε ≥ {one_run:.3g} at 95% confidence (claimed ε = {_fmt_eps(privacy.get('epsilon'))})."
    )
    if k < min_k:
        statement += (
            f" With K = {k}, even a perfect leak cannot prove ε > 0 at 95% confidence (needs K ≥ {min_k}): "
            "read the counts, not the bound."
        )
    elif one_run == 0.0 and tp <= held:
        statement += " No sign that planted canaries are released more often than unplanted ones."
    out = {
        "not_dp": True,
        "k": k,
        "num_canaries": 2 * k,
        "planted": [names[i] for i in np.flatnonzero(planted)],
        "held_out": [names[i] for i in np.flatnonzero(~planted)],
        "counts": {
            "planted_matched": tp,
            "held_out_matched": held,
            "control_matched": ctrl,
            "planted": k,
            "held_out": k,
        },
        "planted_match_rate": rate,
        "baseline_match_rate": baseline,
        "ratio": (rate / baseline) if baseline > 0 else None,
        "ratio_note": None if baseline > 0 else ("no canary matched" if tp == 0 else "no control matched: unbounded"),
        "epsilon_lower_bound_one_run": one_run,
        "epsilon_lower_bound_two_run": two_run,
        "epsilon_claimed": privacy.get("epsilon"),
        "delta": delta,
        "statement": statement,
        "threshold_rule": (
            "per feature space: closer to the canary than any private image is to any canary, and than half the "
            "distance between the two closest canaries; or pixel NCC >= the near-duplicate threshold"
        ),
        "canary_dir": str(canary_dir),
        "runs": {name: _jsonable(res) for name, res in results.items()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(work / "canary_audit.json", _jsonable(out))
    # thumbnails for the report: each canary with its nearest released image in the canaried run
    out["_pairs"] = [
        (
            canary_paths[i],
            runs["canaries"].release / "images" / results["canaries"]["pixel"]["nearest_released"][i]
            if results["canaries"]["pixel"]["nearest_released"]
            else None,
            bool(planted[i]),
            bool(in_canary_run[i]),
        )
        for i in range(2 * k)
    ]
    return out


# --------------------------------------------------------------------------------------------
# The whole audit
# --------------------------------------------------------------------------------------------
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


def run_audit(
    run_dir: str | Path,
    private_dir: str | Path | None = None,
    *,
    settings: AuditSettings | None = None,
    canaries: int = 0,
    reporter: Any = None,
    canary_pipeline: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Audit a run; write ``private/audit.json``, ``private/audit.html`` and ``private/audit_neighbours.jsonl``.

    Returns the JSON-safe result (what ``audit.json`` holds). Nothing is written outside
    ``RUN_DIR/private/``.
    """
    from private_evolution.files import atomic_write_json, atomic_write_jsonl, read_jsonl
    from spti.rundir import RunDirectory

    s = (settings or AuditSettings()).validate()
    reporter = reporter or _QuietReporter()
    run = RunDirectory(run_dir)
    if not run.exists():
        raise SptiError(f"{run.root} is not an spti run directory (no config.toml)")
    released_paths = _released_images(run)
    captions_path = run.release / "captions.jsonl"
    released_rows = read_jsonl(captions_path) if captions_path.exists() else []
    if not released_paths and not released_rows:
        raise SptiError(f"{run.root} has released nothing yet (no release/images, no release/captions.jsonl)")
    # a text-only release (evolve without render, or bring-your-own captions) needs no private folder
    needs_images = bool(released_paths) or canaries > 0
    private_root = resolve_private_dir(run, private_dir) if needs_images or private_dir is not None else None

    embedders: dict[str, ImageEmbedder] = {}
    released = _ImageSet([], [], [])
    private = _ImageSet([], [], [])
    if private_root is not None and released_paths:
        if len(s.features) < 2:
            reporter.warn("audit: one feature space only; a copy it maps far away is left to the pixel check")
        entries = _private_entries(run, private_root, reporter)
        embedders = _build_embedders(s)
        released = _embed_images(
            [f"images/{p.name}" for p in released_paths],
            released_paths,
            [p.name for p in released_paths],
            embedders,
            s,
            reporter,
            "released",
        )
        rels = [rel for rel, _ in entries]
        private = _embed_images(
            rels, [private_root / r for r in rels], [u for _, u in entries], embedders, s, reporter, "private"
        )
        if len(private) == 0:
            raise SptiError(f"no private image of the run could be read under {private_root}")
    in_a = split_units(private.units, s.seed)
    features = {spec: _feature_audit(spec, released, private, in_a, s) for spec in embedders}
    pixel = _pixel_audit(released, private, in_a, s)

    # text
    text: dict[str, Any] | None = None
    private_caps_path = run.private / "captions.jsonl"
    if released_rows and private_caps_path.exists():
        from spti.pipeline import _read_jsonl_tolerant

        caps = [r for r in _read_jsonl_tolerant(private_caps_path) if r.get("caption")]
        if caps:
            text = text_overlap(
                [str(r.get("text", "")) for r in released_rows],
                [r["caption"] for r in caps],
                private_units=[str(r.get("unit", r.get("relpath", i))) for i, r in enumerate(caps)],
                settings=s,
            )
            text["_private_keys"] = [str(r.get("relpath", i)) for i, r in enumerate(caps)]

    canary = None
    if canaries:
        canary = run_canary_audit(
            run.root,
            private_root,
            canaries,
            settings=s,
            reporter=reporter,
            pipeline=canary_pipeline,
            _shared=(embedders, private) if embedders else None,
        )

    result = _assemble(run, private_root, released, private, in_a, features, pixel, text, released_rows, canary, s)
    run.ensure_private()
    atomic_write_jsonl(run.private / "audit_neighbours.jsonl", _neighbour_rows(released, private, features, pixel))
    atomic_write_json(run.private / "audit.json", result)
    from private_evolution.files import atomic_write_text

    atomic_write_text(
        run.private / "audit.html",
        _render_html(result, released, private, features, pixel, text, released_rows, canary, s),
    )
    for name in ("audit.json", "audit.html", "audit_neighbours.jsonl"):
        os.chmod(run.private / name, 0o600)
    return result


def _released_flags(features: dict[str, dict], pixel: dict[str, Any], n: int) -> list[list[str]]:
    flags: list[list[str]] = [[] for _ in range(n)]
    for i in np.flatnonzero(pixel["_dup"]):
        flags[i].append("pixel_near_duplicate")
    for spec, f in features.items():
        for i in np.flatnonzero(f["_below"]):
            flags[i].append(f"closer_than_fresh:{spec}")
    return flags


def _neighbour_rows(
    released: _ImageSet, private: _ImageSet, features: dict[str, dict], pixel: dict[str, Any]
) -> list[dict[str, Any]]:
    flags = _released_flags(features, pixel, len(released))
    rows = []
    for i, name in enumerate(released.names):
        nearest = {
            spec: [
                {"private": private.names[j], "distance": float(d)}
                for j, d in zip(f["_nn_idx"][i], f["_nn_dist"][i], strict=True)
            ]
            for spec, f in features.items()
        }
        rows.append(
            {
                "released": name,
                "flags": flags[i],
                "nearest": nearest,
                "pixel": {
                    "private": private.names[int(pixel["_idx"][i])],
                    "ncc": float(pixel["_ncc"][i]),
                    "mean_abs_diff": float(pixel["_mad"][i]),
                },
                "relative_distance": {
                    spec: (float(f["_score"][i]) if math.isfinite(float(f["_score"][i])) else None)
                    for spec, f in features.items()
                },
            }
        )
    return rows


def _assemble(
    run: RunDirectory,
    private_root: Path | None,
    released: _ImageSet,
    private: _ImageSet,
    in_a: np.ndarray,
    features: dict[str, dict],
    pixel: dict[str, Any],
    text: dict[str, Any] | None,
    released_rows: list[dict[str, Any]],
    canary: dict[str, Any] | None,
    s: AuditSettings,
) -> dict[str, Any]:
    from spti import __version__

    flags = _released_flags(features, pixel, len(released))
    flagged = []
    for i in (i for i, f in enumerate(flags) if f):
        item: dict[str, Any] = {"released": released.names[i], "reasons": flags[i]}
        item["pixel"] = {"private": private.names[int(pixel["_idx"][i])], "ncc": float(pixel["_ncc"][i])}
        for spec, f in features.items():
            if len(f["_nn_idx"][i]):
                item[spec] = {
                    "private": private.names[int(f["_nn_idx"][i][0])],
                    "distance": float(f["_nn_dist"][i][0]),
                    "relative_distance": float(f["_score"][i]),
                }
        flagged.append(item)
    text_flagged = []
    if text is not None:
        for row, r in zip(released_rows, text["items"], strict=True):
            if r["verbatim"] or r["near_verbatim"]:
                text_flagged.append(
                    {
                        "index": row.get("index"),
                        "text": row.get("text"),
                        "private": text["_private_keys"][r["match"]],
                        "private_caption": text["_index"].texts[r["match"]],
                        "kind": "verbatim" if r["verbatim"] else "near_verbatim",
                        "lcs_words": r["lcs_words"],
                        "lcs_chars": r["lcs_chars"],
                        "shared": r.get("shared", ""),
                    }
                )
    feature_summary = {spec: {k: v for k, v in f.items() if k != "spec"} for spec, f in features.items()}
    suspected_spaces = [spec for spec, f in features.items() if f.get("suspected")]
    closer = [spec for spec, f in features.items() if f.get("closer_than_fresh")]
    near_dups = pixel["num_near_duplicates"]
    n_text = len(text_flagged)
    memorisation = bool(near_dups or suspected_spaces)
    parts = []
    if len(released) == 0:
        parts.append("no released images, so no image check")
    elif near_dups:
        parts.append(f"{near_dups} released image(s) are pixel near-duplicates of private images")
    else:
        parts.append("no released image is a pixel near-duplicate of a private image")
    if suspected_spaces:
        parts.append(f"too many released images are closer than fresh private samples in {', '.join(suspected_spaces)}")
    if closer:
        parts.append(f"released images are closer to the private set than fresh samples overall in {', '.join(closer)}")
    if text is not None:
        parts.append(
            f"{n_text} released description(s) copy a private caption (verbatim or near-verbatim)"
            if n_text
            else "no released description copies a private caption"
        )
    if canary is not None:
        parts.append(canary["statement"])
    verdict = {
        "memorization_suspected": memorisation,
        "text_copy_suspected": bool(n_text),
        "near_duplicates": near_dups,
        "feature_spaces_suspected": suspected_spaces,
        "closer_than_fresh": closer,
        "summary": "; ".join(p.rstrip(".") for p in parts) + ".",
    }
    result = {
        "not_dp": True,
        "warning": NOT_DP_NOTE,
        "banner": NOT_DP_BANNER,
        "run_dir": str(run.root),
        "private_dir": str(private_root) if private_root is not None else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spti_version": __version__,
        "verdict": verdict,
        "extractors": list(features),
        "num_released_images": len(released),
        "num_released_texts": len(released_rows),
        "num_private_images": len(private),
        "split": {
            "seed": s.seed,
            "by": "privacy unit",
            "units_a": len(set(np.asarray(private.units)[in_a].tolist())),
            "units_b": len(set(np.asarray(private.units)[~in_a].tolist())),
            "images_a": int(in_a.sum()),
            "images_b": int((~in_a).sum()),
        },
        "settings": asdict(s),
        "features": feature_summary,
        "pixel": pixel,
        "num_flagged": len(flagged),
        "flagged": flagged[:1000],
        "text": (
            None
            if text is None
            else {
                **{k: v for k, v in text.items() if not k.startswith("_") and k != "items"},
                "flagged": text_flagged[:1000],
            }
        ),
        "text_note": None if text is not None else "no private captions (image voting) or no released descriptions",
        "canary": canary,
        "details": "audit_neighbours.jsonl (one row per released image: nearest private images, flags)",
    }
    return _jsonable(result)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def _thumb(path: Path | None, size: int = 96) -> str:
    if path is None:
        return ""
    from PIL import Image as PILImage

    from spti.data import load_image

    try:
        image = load_image(path)
    except SptiError:
        return ""
    image.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    # small images are shown at the same size as the others (pixelated), so pairs line up
    scale = size / max(image.width, image.height)
    width, height = round(image.width * scale), round(image.height * scale)
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="">'


def _fmt_overlap(values: dict[str, float | None] | None) -> str:
    return ", ".join(f"{n}-grams {v:.1%}" for n, v in (values or {}).items() if v is not None) or "n/a"


def _fmt_quantiles(q: dict[str, float] | None) -> str:
    if not q:
        return "n/a"
    return f"median {q['p50']:.3g}, 95th percentile {q['p95']:.3g}, max {q['max']:.3g}"


def _histograms(features: dict[str, dict], pixel: dict[str, Any]) -> str:
    """Nearest-neighbour distances of released images vs fresh private samples, one panel per space."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(spec, f) for spec, f in features.items() if f.get("folds")]
    total = len(panels) + (1 if "_reference" in pixel else 0)
    if total == 0:
        return ""
    fig = Figure(figsize=(4.2 * total, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, total, squeeze=False)[0]
    for ax, (spec, f) in zip(axes, panels, strict=False):
        ref = np.concatenate([f["folds"][k]["_reference"] for k in ("A", "B")])
        rel = np.concatenate([f["folds"][k]["_released"] for k in ("A", "B")])
        bins = np.histogram_bin_edges(np.concatenate([ref, rel]), bins=30)
        ax.hist(ref, bins=bins, alpha=0.6, density=len(ref) > 0, label="private → other half (fresh)")
        ax.hist(rel, bins=bins, alpha=0.6, density=len(rel) > 0, label="released → half")
        for k in ("A", "B"):
            ax.axvline(f["folds"][k]["threshold"], color="red", linestyle="--", linewidth=1)
        ax.set_title(spec[:40], fontsize=9)
        ax.set_xlabel("nearest-neighbour distance", fontsize=8)
        ax.legend(fontsize=7)
    if "_reference" in pixel:
        ax = axes[-1]
        bins = np.linspace(-1, 1, 41)
        ax.hist(pixel["_reference"], bins=bins, alpha=0.6, density=True, label="private → other half")
        ax.hist(pixel["_ncc"], bins=bins, alpha=0.6, density=len(pixel["_ncc"]) > 0, label="released → private")
        ax.axvline(pixel["ncc_threshold"], color="red", linestyle="--", linewidth=1)
        ax.set_title("pixel NCC (higher = closer)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="nearest-neighbour distance histograms">'


def _render_html(
    result: dict[str, Any],
    released: _ImageSet,
    private: _ImageSet,
    features: dict[str, dict],
    pixel: dict[str, Any],
    text: dict[str, Any] | None,
    released_rows: list[dict[str, Any]],
    canary: dict[str, Any] | None,
    s: AuditSettings,
) -> str:
    esc = html.escape
    flags = _released_flags(features, pixel, len(released))
    # pairs to show: every flagged image, then the closest by NCC and by each space
    order: list[int] = [i for i, f in enumerate(flags) if f][:200]
    candidates = [np.argsort(-pixel["_ncc"])] + [np.argsort(f["_score"]) for f in features.values() if "folds" in f]
    for ranking in candidates:
        for i in ranking[: max(1, s.html_pairs // len(candidates))]:
            if int(i) not in order:
                order.append(int(i))
    thumbs: dict[Path, str] = {}

    def thumb(path: Path) -> str:
        if path not in thumbs:
            thumbs[path] = _thumb(path)
        return thumbs[path]

    pair_rows = []
    for i in order:
        j = int(pixel["_idx"][i])
        cells = [f"<td>{thumb(released.paths[i])}<br>{esc(released.names[i])}</td>"]
        cells.append(f"<td>{thumb(private.paths[j])}<br>{esc(private.names[j])}<br>NCC {pixel['_ncc'][i]:.3f}</td>")
        for f in features.values():
            if not len(f["_nn_idx"][i]):
                cells.append("<td></td>")
                continue
            j = int(f["_nn_idx"][i][0])
            rel = float(f["_score"][i])
            rel_txt = f"<br>×{rel:.2f} of threshold" if math.isfinite(rel) else ""
            cells.append(
                f"<td>{thumb(private.paths[j])}<br>{esc(private.names[j])}<br>"
                f"distance {f['_nn_dist'][i][0]:.4g}{rel_txt}</td>"
            )
        cells.append(f"<td class='{'flag' if flags[i] else ''}'>{esc(', '.join(flags[i])) or 'none'}</td>")
        pair_rows.append("<tr>" + "".join(cells) + "</tr>")
    pair_header = "".join(f"<th>nearest private: {esc(spec)}</th>" for spec in features)

    feature_rows = []
    for spec, f in features.items():
        if not f.get("folds"):
            feature_rows.append(f"<tr><th>{esc(spec)}</th><td colspan=5>{esc(f.get('note', ''))}</td></tr>")
            continue
        fa, fb = f["folds"]["A"], f["folds"]["B"]
        mw = "n/a" if f["closer_than_fresh_p"] is None else f"{f['closer_than_fresh_p']:.3g}"
        feature_rows.append(
            f"<tr><th>{esc(spec)}</th><td>{f['num_flagged']}/{len(released)}</td>"
            f"<td>≤ {f['expected_fraction_at_most']:.3g}</td><td>{f['excess_p']:.3g}</td>"
            f"<td>{mw}</td><td>A: {fa['threshold']:.4g}, B: {fb['threshold']:.4g}</td></tr>"
        )

    text_html = "<p>No text check: " + esc(result.get("text_note") or "") + "</p>"
    if text is not None:
        trs = []
        ranked = sorted(range(len(text["items"])), key=lambda i: -text["items"][i]["lcs_words"])
        for i in ranked[:50]:
            r, row = text["items"][i], released_rows[i]
            kind = "verbatim" if r["verbatim"] else ("near-verbatim" if r["near_verbatim"] else "")
            cap = text["_index"].texts[r["match"]] if r["match"] is not None else ""
            ov = ", ".join(f"{n}-gram {v:.2f}" for n, v in r["overlap"].items() if v is not None)
            trs.append(
                f"<tr><td>{esc(str(row.get('index', i)))}</td><td>{esc(str(row.get('text', '')))}</td>"
                f"<td>{esc(cap)}</td><td>{r['lcs_words']} words / {r['lcs_chars']} chars</td><td>{esc(ov)}</td>"
                f"<td class='{'flag' if kind else ''}'>{kind}</td></tr>"
            )
        ref = text.get("reference") or {}
        ref_txt = (
            f"Reference (held-out private captions vs the other half): mean n-gram overlap "
            f"{_fmt_overlap(ref.get('mean_ngram_overlap'))}; longest shared run "
            f"{_fmt_quantiles(ref.get('lcs_words_quantiles'))} words."
            if ref
            else ""
        )
        text_html = (
            f"<p>{text['num_verbatim']} verbatim and {text['num_near_verbatim']} near-verbatim of "
            f"{text['num_released']} released descriptions against {text['num_private']} private captions; "
            f"mean n-gram overlap {_fmt_overlap(text['mean_ngram_overlap'])}. {ref_txt}</p>"
            "<table><tr><th>#</th><th>released description</th><th>closest private caption</th>"
            "<th>longest common substring</th><th>n-gram overlap</th><th>flag</th></tr>" + "".join(trs) + "</table>"
        )

    canary_html = ""
    if canary is not None:
        c = canary["counts"]
        ratio = canary["ratio"] if canary["ratio"] is not None else canary["ratio_note"]
        tiles = "".join(
            f"<tr><td>{_thumb(cp)}</td><td>{_thumb(rp)}</td><td>{'planted' if pl else 'held out'}</td>"
            f"<td class='{'flag' if m else ''}'>{'matched' if m else 'not matched'}</td></tr>"
            for cp, rp, pl, m in canary.get("_pairs", [])
        )
        canary_html = (
            "<h2>Canary audit</h2>"
            f"<p>{esc(canary['statement'])}</p>"
            f"<table><tr><th>planted matched</th><td>{c['planted_matched']}/{c['planted']}</td></tr>"
            f"<tr><th>held-out matched (same run)</th><td>{c['held_out_matched']}/{c['held_out']}</td></tr>"
            f"<tr><th>control run matched</th><td>{c['control_matched']}/{c['planted']}</td></tr>"
            f"<tr><th>ratio</th><td>{esc(str(ratio))}</td></tr></table>"
            "<table><tr><th>canary</th><th>nearest released (canary run, pixels)</th><th></th><th></th></tr>"
            + tiles
            + "</table>"
        )

    verdict = result["verdict"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spti audit (NOT DP)</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1300px;color:#222}}
.banner{{background:#b00020;color:#fff;padding:1rem 1.5rem;font-size:1.3rem;font-weight:bold;border-radius:4px}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.85rem}} th{{background:#f4f4f4}} td.flag{{background:#fde2e2;font-weight:bold}}
img{{image-rendering:pixelated}}
</style></head><body>
<div class="banner">{esc(NOT_DP_BANNER)}</div>
<p>{esc(NOT_DP_NOTE)}</p>
<h1>Audit of {esc(result["run_dir"])}</h1>
<p><b>{"Memorisation suspected" if verdict["memorization_suspected"] else "No memorisation detected"}.</b>
{esc(verdict["summary"])}</p>
<p>{result["num_released_images"]} released images, {result["num_private_images"]} private images in
{esc(str(result["private_dir"]))}; split by privacy unit (seed {s.seed}): {result["split"]["images_a"]} in A,
{result["split"]["images_b"]} in B.</p>
<h2>Feature spaces</h2>
<table><tr><th>space</th><th>flagged (closer than fresh)</th><th>expected fraction</th>
<th>excess p (binomial)</th><th>closer-than-fresh p (Mann–Whitney)</th><th>thresholds</th></tr>
{"".join(feature_rows)}</table>
<p>Pixel check: {pixel["num_near_duplicates"]} near-duplicate(s) (NCC ≥ {s.ncc_threshold} on
{s.pixel_size}² grayscale, shifts ±{s.max_shift}).</p>
{_histograms(features, pixel)}
<h2>Flagged and closest released–private pairs</h2>
<table><tr><th>released</th><th>nearest private: pixels</th>{pair_header}<th>flags</th></tr>
{"".join(pair_rows)}</table>
<h2>Text overlap</h2>
{text_html}
{canary_html}
<div class="banner">{esc(NOT_DP_BANNER)}</div>
</body></html>
"""
