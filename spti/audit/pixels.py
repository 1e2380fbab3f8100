"""Pixel-space near duplicates: normalised cross-correlation of small grayscale thumbnails."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from spti.audit.images import _ImageSet
from spti.audit.nearest import _quantiles
from spti.audit.settings import AuditSettings

if TYPE_CHECKING:
    pass


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
