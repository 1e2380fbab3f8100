"""Nearest private neighbours of released images and the held-out "fresh sample" reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.audit.images import _ImageSet
from spti.audit.settings import AuditSettings

if TYPE_CHECKING:
    pass


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
