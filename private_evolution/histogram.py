"""The DP nearest-neighbour vote histogram, the only place where private data meet the population.

Each private row votes for its k nearest candidates (exact search, L2 or cosine) with weight 1/√k,
so every row's vote vector has L2 norm exactly 1. With privacy units (e.g. all images of one
person), a unit's rows' votes are summed and the sum is scaled to L2 norm ≤ 1. Adding or removing
one unit therefore moves the histogram by at most 1 in L2, and Gaussian noise N(0, σ²) on every bin
makes one release a Gaussian mechanism with noise multiplier σ.

Votes are canonical: a row's vote is a function of that row and the candidates only (identical
candidates are one bin, exact float64 re-scoring, ties to the lowest index), so no backend, chunk
boundary or float32 rounding can move a vote when another row is added or removed.
Search runs in chunks of private rows, so memory is O((N+M)·d + chunk·M), never the N×M matrix.
Backends: numpy (CPU), torch (CPU or GPU) and faiss (CPU, when installed) behind one function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "GaussianNoise",
    "NoisyHistogram",
    "clean_vote_histogram",
    "dp_histogram",
    "histogram_from_neighbors",
    "lookahead_embeddings",
    "merge_identical",
    "nearest_neighbors",
    "privatize",
    "weight_histogram",
]

Metric = Literal["l2", "cosine"]
Backend = Literal["auto", "numpy", "torch", "faiss"]
SearchPrecision = Literal["float32", "tf32", "bf16"]

# Bytes a search chunk may use for its chunk×M score block (and, for k > 1, the partition indices).
DEFAULT_CHUNK_BYTES = int(os.environ.get("PE_CHUNK_BYTES", 160 * 2**20))
GPU_CHUNK_BYTES = 2**30


# --------------------------------------------------------------------------------------------
# Canonical exact k-nearest-neighbour search
# --------------------------------------------------------------------------------------------
# Why two stages: the sensitivity bound needs each private row's vote to be a function of that row
# and the candidates only. A float32 matrix product is not: BLAS computes a one-row block by gemv
# and others by gemm, faiss and numpy sum in other orders, and bit-identical candidates (kept
# samples, copy fallbacks, cached render features) then win by a last-bit accident that depends on
# where the row falls in a chunk. So stage 1 (any backend, any precision) only *shortlists*, with a
# proven error margin, every candidate that can be among the row's k nearest; stage 2 re-scores the
# shortlist exactly in float64 by a computation that sees only (row, candidate), and breaks ties by
# the lowest candidate index. Bit-identical candidates are merged first: one bin, the lowest index.


def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch")


def _resolve_backend(backend: Backend, queries: Any, keys: Any, device: str | None) -> str:
    """The search backend, from public facts only (types, device, request): never from timings."""
    if backend not in ("auto", "numpy", "torch", "faiss"):
        raise ValueError(f"backend must be one of auto, numpy, torch, faiss; got {backend!r}")
    if backend != "auto":
        return backend
    if _is_torch_tensor(queries) or _is_torch_tensor(keys) or (device is not None and device != "cpu"):
        return "torch"
    return "numpy"


def _check_inputs(queries: Any, keys: Any, k: int, metric: str) -> tuple[int, int, int]:
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if len(queries.shape) != 2 or len(keys.shape) != 2:
        raise ValueError(
            f"embeddings must be 2-D (rows × dims); got private {tuple(queries.shape)} and "
            f"candidates {tuple(keys.shape)}"
        )
    n, d = queries.shape
    m, d2 = keys.shape
    if d != d2:
        raise ValueError(f"private embeddings have {d} dims but candidate embeddings have {d2}")
    if m == 0:
        raise ValueError("there are no candidates to vote for")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, {m}] (the number of candidates), got {k!r}")
    return n, m, d


def _chunk_rows(m: int, chunk_size: int | None, budget: int = 0) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    # float32 scores plus the shortlist mask per candidate
    return max(1, (budget or DEFAULT_CHUNK_BYTES) // (m * 5))


def _as_float64(x: Any) -> np.ndarray:
    if _is_torch_tensor(x):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("embeddings contain NaN or infinite values; check the embedding model's output")
    return arr


def _prepare_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """float64 rows, unit-normalised for cosine (row by row: a row's result never depends on others)."""
    if metric != "cosine":
        return x
    norms = np.sqrt(_tree_sum_columns(x * x))
    return x / np.maximum(norms, np.finfo(np.float64).tiny)[:, None]


def merge_identical(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-identical candidate rows as one: ``(first_index, group)`` with ``group[j]`` the group of j.

    ``first_index`` is ascending, so the representative of each group is its lowest index.
    """
    keys = np.ascontiguousarray(keys)
    rows = keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).reshape(-1)
    _, first, group = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups renumbered by their lowest index
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order].astype(np.int64), rank[group.reshape(-1)].astype(np.int64)


def _gamma(n: int, unit_roundoff: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of an n-term dot product, any order."""
    nu = n * unit_roundoff
    if nu >= 0.5:
        raise ValueError("the search precision is too low for this dimension to bound its error")
    return nu / (1.0 - nu)


class _Shortlister:
    """Stage 1: per private row, candidate indices that provably contain its exact k nearest.

    Scores s_ij = ||y_j||² − 2·q_i·y_j are computed in low precision: inputs rounded with unit
    roundoff u_in (2⁻²⁴ float32, 2⁻¹¹ TF32, 2⁻⁸ bfloat16), products accumulated with u_acc, the
    result stored with u_out. Whatever the summation order,
    |ŝ_ij − s_ij| ≤ [(2u_in + u_in²)(1 + γ) + γ_{d+4}(u_acc) + u_out]·(||q_i|| + max_j ||y_j||)² =: B_i,
    so every candidate whose exact score is among the k smallest has ŝ_ij ≤ ŝ_(k) + 2·B_i, where
    ŝ_(k) is the row's k-th smallest computed score. The margin also covers float64's own error.
    """

    def __init__(
        self,
        keys64: np.ndarray,
        k: int,
        input_roundoff: float = 2.0**-24,
        accumulate_roundoff: float = 2.0**-24,
        output_roundoff: float = 0.0,
    ) -> None:
        d = keys64.shape[1]
        self.k = k
        self.key_norm_max = float(np.sqrt(np.max(np.add.reduce(keys64 * keys64, axis=1))))
        acc = _gamma(d + 4, accumulate_roundoff)
        rounding = 2 * input_roundoff + input_roundoff**2
        self.gamma = rounding * (1 + acc) + acc + 2 * output_roundoff + _gamma(d + 4, 2.0**-53)

    def margin(self, q64: np.ndarray) -> np.ndarray:
        return self.margin_from_norms(np.sqrt(np.add.reduce(q64 * q64, axis=1)))

    def margin_from_norms(self, q_norm: Any) -> Any:
        """2·B_i from the rows' norms (numpy arrays or torch tensors alike)."""
        return 2.0 * self.gamma * (q_norm + self.key_norm_max) ** 2 * (1 + 1e-6) + 1e-300

    def from_scores(self, scores: np.ndarray, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the shortlist from a full block of computed scores (numpy arrays)."""
        kth = scores.min(axis=1) if self.k == 1 else np.partition(scores, self.k - 1, axis=1)[:, self.k - 1]
        limit = (kth.astype(np.float64) + margin).astype(np.float32)
        # float32 rounding of the limit may go down by half an ulp; nudge it up one ulp.
        limit = np.nextafter(limit, np.float32(np.inf))
        return np.nonzero(scores <= limit[:, None])


def _tree_sum_columns(x: Any) -> Any:
    """Row sums by a fixed pairwise tree over the columns (padded to a power of two with zeros).

    Every step is an elementwise IEEE addition, so a row's sum depends only on that row — not on
    the batch it is in, the device, or the library (numpy and torch give the same bits).
    """
    width = x.shape[1]
    size = 1 << max(0, (width - 1).bit_length())
    if size != width:
        pad = size - width
        x = np.pad(x, ((0, 0), (0, pad))) if isinstance(x, np.ndarray) else _torch_pad(x, pad)
    while size > 1:
        size //= 2
        x = x[:, :size] + x[:, size:]
    return x[:, 0]


def _torch_pad(x: Any, pad: int) -> Any:
    import torch

    return torch.nn.functional.pad(x, (0, pad))


def _first_k_per_row(rows: Any, cols: Any, dist: Any, n: int, k: int) -> tuple[Any, Any]:
    """The k best (dist, then lowest col) of each row, from flat (row, col, dist) triples."""
    if isinstance(rows, np.ndarray):
        order = np.lexsort((cols, dist, rows))
        rows_sorted = rows[order]
        first = np.searchsorted(rows_sorted, np.arange(n))
        counts = np.diff(np.append(first, rows_sorted.size))
        take = first[:, None] + np.arange(k)[None, :]
        ok = bool((counts >= k).all())
        picked_cols, picked_dist = cols[order], dist[order]
    else:
        import torch

        # lexicographic (row, dist, col) by three stable sorts, least significant key first
        order = torch.argsort(cols, stable=True)
        order = order[torch.argsort(dist[order], stable=True)]
        order = order[torch.argsort(rows[order], stable=True)]
        rows_sorted = rows[order]
        first = torch.searchsorted(rows_sorted, torch.arange(n, device=rows.device))
        counts = torch.diff(first, append=torch.tensor([rows_sorted.numel()], device=rows.device))
        take = first[:, None] + torch.arange(k, device=rows.device)[None, :]
        ok = bool((counts >= k).all())
        picked_cols, picked_dist = cols[order], dist[order]
    if not ok:
        raise RuntimeError("internal error: a shortlist holds fewer than k candidates")
    return picked_cols[take], picked_dist[take]


def _rescore_exact(q64: Any, keys64: Any, rows: Any, cols: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: the k nearest of each row among its shortlist, by exact float64 squared distance.

    Works on numpy arrays or torch tensors (on their device). Each distance is a fixed tree sum
    over one (row, candidate) difference, so it is the same whatever else is in the block; ties go
    to the lower candidate index.
    """
    n = q64.shape[0]
    step = max(1, (64 * 2**20) // (8 * q64.shape[1]))
    parts = []
    for start in range(0, rows.shape[0], step):
        r, c = rows[start : start + step], cols[start : start + step]
        diff = q64[r] - keys64[c]
        parts.append(_tree_sum_columns(diff * diff))
    if isinstance(q64, np.ndarray):
        dist = np.concatenate(parts) if parts else np.empty(0)
        idx, d = _first_k_per_row(rows, cols, dist, n, k)
        return idx, d
    import torch

    dist = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=q64.device)
    idx, d = _first_k_per_row(rows, cols, dist, n, k)
    return idx.cpu().numpy(), d.cpu().numpy()


def _shortlist_numpy(
    q64: np.ndarray, y_t: np.ndarray, y_sq: np.ndarray, sl: _Shortlister, extra_margin: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``y_t`` is −2·Yᵀ in float32 (C-contiguous), computed once per search."""
    scores = q64.astype(np.float32) @ y_t
    scores += y_sq
    return sl.from_scores(scores, sl.margin(q64) + extra_margin)


# Search precisions of the torch backend: (input roundoff, accumulation roundoff, output roundoff).
SEARCH_PRECISIONS = {
    "float32": (2.0**-24, 2.0**-24, 0.0),
    "tf32": (2.0**-11, 2.0**-24, 0.0),
    "bf16": (2.0**-8, 2.0**-24, 2.0**-8),
}


def _shortlist_torch(q64: Any, y_t: Any, y_sq_t: Any, sl: _Shortlister, precision: str) -> tuple[Any, Any]:
    """Stage 1 on the tensors' device. ``q64`` is a float64 tensor; ``y_t`` the keys in the search
    dtype, ``y_sq_t`` their squared norms (float32).

    The shortlist of a row is every candidate within the margin of its k-th best score. Most rows'
    shortlists fit in their k + 7 best, taken with one ``topk``; a row whose shortlist might reach
    past them (near-ties, or a loose bf16 margin) takes its whole margin set from the score row.
    """
    import torch

    if precision == "bf16":
        scores = (q64.to(torch.bfloat16) @ y_t.T).float().mul_(-2.0).add_(y_sq_t)
    else:
        scores = torch.addmm(y_sq_t, q64.float(), y_t.T, alpha=-2.0)
    m = scores.shape[1]
    kprime = min(m, sl.k + 7)
    top_v, top_i = torch.topk(scores, kprime, dim=1, largest=False, sorted=True)
    margin = sl.margin_from_norms(torch.sqrt((q64 * q64).sum(dim=1)))
    limit = (top_v[:, sl.k - 1].double() + margin).float()
    limit = torch.nextafter(limit, torch.full_like(limit, float("inf")))
    # complete: every candidate outside the k' best scores above the limit, so none can be needed
    complete = (top_v[:, -1] > limit) | (kprime == m)
    keep = (top_v <= limit[:, None]) & complete[:, None]
    rows, pos = torch.nonzero(keep, as_tuple=True)
    cols = top_i[rows, pos]
    wide = torch.nonzero(~complete, as_tuple=True)[0]
    if wide.numel():
        r2, c2 = torch.nonzero(scores[wide] <= limit[wide, None], as_tuple=True)
        rows, cols = torch.cat([rows, wide[r2]]), torch.cat([cols, c2])
    return rows, cols


@contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """float32 products in true float32 (no TF32) unless TF32 was asked for; restored after."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _shortlist_faiss(
    q64: np.ndarray, index: Any, y_t: np.ndarray, y_sq: np.ndarray, sl: _Shortlister, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """faiss returns the k' best by its own float32 arithmetic; rows whose shortlist might reach past
    k' are completed from a full score row (rare: only near-ties deeper than k')."""
    q32 = np.ascontiguousarray(q64, dtype=np.float32)
    kprime = min(m, sl.k + 16)
    d, i = index.search(q32, kprime)
    q_sq = np.add.reduce(q64 * q64, axis=1)
    scores = d.astype(np.float64) - q_sq[:, None]  # faiss gives ||q−y||²; compare on ||y||² − 2q·y
    margin = sl.margin(q64) + 2.0 * sl.gamma * q_sq  # faiss's ||q||² term carries its own error
    limit = scores[:, sl.k - 1] + margin
    incomplete = (scores[:, -1] <= limit) & (kprime < m)
    keep = scores <= limit[:, None]
    keep[incomplete] = False
    rows, pos = np.nonzero(keep)
    cols = i[rows, pos]
    if incomplete.any():
        extra_rows = np.flatnonzero(incomplete)
        r2, c2 = _shortlist_numpy(q64[extra_rows], y_t, y_sq, sl, 2.0 * sl.gamma * q_sq[extra_rows])
        rows = np.concatenate([rows, extra_rows[r2]])
        cols = np.concatenate([cols, c2])
    return rows.astype(np.int64), cols.astype(np.int64)


def nearest_neighbors(
    queries: np.ndarray | torch.Tensor,
    keys: np.ndarray | torch.Tensor,
    *,
    k: int = 1,
    metric: Metric = "l2",
    backend: Backend = "auto",
    chunk_size: int | None = None,
    device: str | None = None,
    search_precision: SearchPrecision | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact, canonical k nearest ``keys`` of every row of ``queries``.

    Returns ``(indices, distances)``, nearest first, distances as float64 squared L2 or cosine
    distance (1 − cos). Canonical: a row's answer depends only on that row and ``keys`` — not on the
    backend, the precision of the search, the chunking or the other rows. Bit-identical keys count
    as one (the lowest index answers for all), so a row gets ``min(k, distinct keys)`` neighbours;
    ties in exact distance go to the lower index.

    ``backend="auto"`` is torch for tensors or a non-CPU ``device`` and numpy otherwise; ``faiss``
    on request. ``search_precision`` (torch only; default TF32 on CUDA, float32 elsewhere) is the
    precision of the candidate search: whatever it is, every row's few best candidates are
    re-scored exactly in float64 with a proven margin, so the votes do not change. ``queries`` may
    be a memory-mapped ``.npy`` (``np.load(path, mmap_mode="r")``): rows are read a chunk at a time.
    Memory beyond the inputs is O(chunk_size · M).
    """
    n, _m, d = _check_inputs(queries, keys, k, metric)
    chosen = _resolve_backend(backend, queries, keys, device)
    keys64 = _prepare_rows(_as_float64(keys), metric)
    first, _ = merge_identical(keys64)
    uniq64 = np.ascontiguousarray(keys64[first])
    m_u = uniq64.shape[0]
    k_eff = min(k, m_u)
    if n == 0:
        return np.empty((0, k_eff), dtype=np.int64), np.empty((0, k_eff), dtype=np.float64)
    if chosen == "torch":
        return _nearest_torch(queries, uniq64, first, k_eff, metric, chunk_size, device, search_precision)
    if search_precision not in (None, "float32"):
        raise ValueError(f"search_precision {search_precision!r} needs the torch backend")
    y32 = uniq64.astype(np.float32)
    y_sq = np.add.reduce(y32.astype(np.float64) ** 2, axis=1).astype(np.float32)
    y_t = np.ascontiguousarray((-2.0 * y32).T)
    sl = _Shortlister(uniq64, k_eff)
    if chosen == "faiss":
        import faiss

        index = faiss.IndexFlatL2(d)
        index.add(y32)
        chunk = _chunk_rows(m_u, chunk_size, 1 << 30)
    else:
        chunk = _chunk_rows(m_u, chunk_size)
    indices = np.empty((n, k_eff), dtype=np.int64)
    dists = np.empty((n, k_eff), dtype=np.float64)
    for start in range(0, n, chunk):
        q64 = _prepare_rows(_as_float64(queries[start : start + chunk]), metric)
        if chosen == "faiss":
            rows, cols = _shortlist_faiss(q64, index, y_t, y_sq, sl, m_u)
        else:
            rows, cols = _shortlist_numpy(q64, y_t, y_sq, sl)
        idx, dist = _rescore_exact(q64, uniq64, rows.astype(np.int64), cols.astype(np.int64), k_eff)
        indices[start : start + chunk] = first[idx]
        dists[start : start + chunk] = dist / 2.0 if metric == "cosine" else dist
    return indices, dists


def _nearest_torch(
    queries: Any,
    uniq64: np.ndarray,
    first: np.ndarray,
    k: int,
    metric: str,
    chunk_size: int | None,
    device: str | None,
    precision: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Both stages on the torch device: low-precision search, float64 re-score, in row chunks."""
    import torch

    if device is not None:
        dev = torch.device(device)
    else:
        dev = queries.device if _is_torch_tensor(queries) else torch.device("cpu")
    # TF32's proven margin is tight enough that nearly every row's shortlist fits its k + 7 best;
    # bf16's is 8× looser, which pays only when nearest neighbours are well separated.
    precision = precision or ("tf32" if dev.type == "cuda" else "float32")
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"search_precision must be one of {', '.join(SEARCH_PRECISIONS)}, got {precision!r}")
    if dev.type == "mps":
        raise ValueError("the torch backend needs float64 for the exact re-score, which MPS lacks; use cpu or cuda")
    sl = _Shortlister(uniq64, k, *SEARCH_PRECISIONS[precision])
    m_u = uniq64.shape[0]
    keys_t = torch.from_numpy(uniq64).to(dev)
    y_t = keys_t.to(torch.bfloat16) if precision == "bf16" else keys_t.float()
    y_sq = (keys_t.float() * keys_t.float()).sum(dim=1)
    chunk = _chunk_rows(m_u, chunk_size, GPU_CHUNK_BYTES if dev.type == "cuda" else 0)
    n = queries.shape[0]
    indices = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=np.float64)
    with torch.inference_mode(), _matmul_precision(precision):
        for start in range(0, n, chunk):
            block = queries[start : start + chunk]
            if _is_torch_tensor(block):
                q64 = block.to(dev, torch.float64)
                if not torch.isfinite(q64).all():
                    raise ValueError("embeddings contain NaN or infinite values; check the embedding model's output")
            else:
                q64 = torch.from_numpy(_as_float64(block)).to(dev)
            if metric == "cosine":
                q64 = (
                    q64 / torch.clamp(torch.sqrt(_tree_sum_columns(q64 * q64)), min=np.finfo(np.float64).tiny)[:, None]
                )
            rows, cols = _shortlist_torch(q64, y_t, y_sq, sl, precision)
            idx, dist = _rescore_exact(q64, keys_t, rows, cols, k)
            indices[start : start + chunk] = first[idx]
            dists[start : start + chunk] = dist / 2.0 if metric == "cosine" else dist
    return indices, dists


# --------------------------------------------------------------------------------------------
# Votes → clean histogram (NOT private)
# --------------------------------------------------------------------------------------------
def histogram_from_neighbors(indices: np.ndarray, num_candidates: int, units: np.ndarray | None = None) -> np.ndarray:
    """The clean vote histogram from each private row's k nearest candidates. **Not private.**

    Sample level (``units=None``): each row gives 1/√k to each of its k neighbours (L2 norm 1).
    Unit level: a unit's row votes are summed and the sum is scaled to L2 norm ≤ 1.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError("indices must be (N, k)")
    n, k = indices.shape
    if n and (indices.min() < 0 or indices.max() >= num_candidates):
        raise ValueError("neighbour indices out of range")
    if k > 1 and (np.diff(np.sort(indices, axis=1), axis=1) == 0).any():
        raise ValueError("a private row lists the same candidate twice among its k neighbours")
    weight = 1.0 / math.sqrt(k)
    if units is None:
        return np.bincount(indices.ravel(), minlength=num_candidates).astype(np.float64) * weight
    units = np.asarray(units)
    if units.shape != (n,):
        raise ValueError(f"units must give one id per private row: expected shape ({n},), got {units.shape}")
    _, unit_code = np.unique(units, return_inverse=True)
    unit_code = unit_code.reshape(-1).astype(np.int64)
    # (unit, candidate) pairs with their summed weight
    pair = np.repeat(unit_code, k) * np.int64(num_candidates) + indices.ravel()
    pair_id, pair_count = np.unique(pair, return_counts=True)
    pair_unit = pair_id // num_candidates
    pair_cand = pair_id % num_candidates
    pair_weight = pair_count * weight
    unit_norm = np.sqrt(np.bincount(pair_unit, weights=pair_weight**2))
    scale = 1.0 / np.maximum(unit_norm, 1.0)
    return np.bincount(pair_cand, weights=pair_weight * scale[pair_unit], minlength=num_candidates)


def weight_histogram(weights: np.ndarray, units: np.ndarray | None = None) -> np.ndarray:
    """The clean histogram of free-form votes over K public keys. **Not private.**

    ``weights`` is (N, K), non-negative: row i's affinity to each key (e.g. which public attribute
    values its caption mentions). Each row's vector is scaled to L2 norm ≤ 1; with units, a unit's
    rows are summed and the sum is scaled to norm ≤ 1 — so, as for nearest-neighbour votes, adding
    or removing one unit moves the histogram by at most 1 in L2.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be (rows, keys), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    rows = w / np.maximum(np.sqrt(np.add.reduce(w * w, axis=1)), 1.0)[:, None]
    if units is None:
        return rows.sum(axis=0)
    units = np.asarray(units)
    if units.shape != (w.shape[0],):
        raise ValueError(f"units must give one id per row: expected shape ({w.shape[0]},), got {units.shape}")
    _, code = np.unique(units, return_inverse=True)
    per_unit = np.zeros((int(code.max()) + 1 if code.size else 0, w.shape[1]))
    np.add.at(per_unit, code.reshape(-1), rows)
    per_unit /= np.maximum(np.sqrt(np.add.reduce(per_unit * per_unit, axis=1)), 1.0)[:, None]
    return per_unit.sum(axis=0)


def clean_vote_histogram(
    private: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    *,
    k: int = 1,
    metric: Metric = "l2",
    units: np.ndarray | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    device: str | None = None,
) -> np.ndarray:
    """The noiseless vote histogram. **Not private**: for tests and analysis, never for release."""
    idx, _ = nearest_neighbors(
        private, candidates, k=k, metric=metric, backend=backend, chunk_size=chunk_size, device=device
    )
    return histogram_from_neighbors(idx, int(candidates.shape[0]), units)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------
class GaussianNoise:
    """Standard-normal draws from a generator seeded with fresh OS entropy.

    There is deliberately no seed argument: the user's ``--seed`` controls public randomness only,
    and noise that could be replayed from a known seed would void the guarantee.
    """

    def __init__(self) -> None:
        self._rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence()))

    def standard_normal(self, size: int) -> np.ndarray:
        return self._rng.standard_normal(size)


@dataclass(frozen=True)
class NoisyHistogram:
    """A DP release: noisy votes per candidate. Safe to persist and publish.

    ``raw`` is clean + N(0, σ²); ``values`` is ``raw`` with bins below ``threshold`` set to 0
    (post-processing). It holds nothing else computed from the private data: in particular not
    the number of voters, which under add/remove neighbours is itself private.
    """

    values: np.ndarray
    raw: np.ndarray
    noise_multiplier: float
    threshold: float

    def __post_init__(self) -> None:
        for arr in (self.values, self.raw):
            arr.setflags(write=False)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {
            "values": self.values,
            "raw": self.raw,
            "noise_multiplier": np.float64(self.noise_multiplier),
            "threshold": np.float64(self.threshold),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> NoisyHistogram:
        return cls(
            values=np.array(arrays["values"], dtype=np.float64),
            raw=np.array(arrays["raw"], dtype=np.float64),
            noise_multiplier=float(arrays["noise_multiplier"]),
            threshold=float(arrays["threshold"]),
        )


# A replacement noise source, for tests only (e.g. replaying the same draws to compare runs).
NoiseSource = GaussianNoise | Callable[[int], np.ndarray]


def _standard_normal(count: int, source: NoiseSource | None) -> np.ndarray:
    src = source if source is not None else GaussianNoise()
    draw = src.standard_normal if isinstance(src, GaussianNoise) else src
    z = np.asarray(draw(count), dtype=np.float64)
    if z.shape != (count,):
        raise ValueError("noise source returned the wrong number of draws")
    return z


def privatize(
    clean: np.ndarray,
    *,
    noise_multiplier: float,
    threshold: float = 0.0,
    _noise: NoiseSource | None = None,
) -> NoisyHistogram:
    """Add N(0, σ²) to every bin of a sensitivity-1 histogram (empty bins too), then apply H.

    ``_noise`` replaces the OS-entropy generator; it exists for tests and must never be set in use.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    clean = np.asarray(clean, dtype=np.float64)
    noise = noise_multiplier * _standard_normal(clean.shape[0], _noise) if noise_multiplier > 0 else 0.0
    raw = clean + noise
    values = np.where(raw < threshold, 0.0, raw)
    return NoisyHistogram(values=values, raw=raw, noise_multiplier=float(noise_multiplier), threshold=float(threshold))


def dp_histogram(
    private: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    *,
    noise_multiplier: float,
    k: int = 1,
    metric: Metric = "l2",
    units: np.ndarray | None = None,
    threshold: float = 0.0,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    device: str | None = None,
    _noise: NoiseSource | None = None,
) -> NoisyHistogram:
    """One DP release: vote, add Gaussian noise, threshold. Only the noisy histogram is returned.

    The release is (ε, δ)-DP for the σ given, with add/remove-one-unit neighbours (one private
    row when ``units`` is None). Account for it before calling (see ``PrivacyLedger.charge``).
    """
    clean = clean_vote_histogram(
        private,
        candidates,
        k=k,
        metric=metric,
        units=units,
        backend=backend,
        chunk_size=chunk_size,
        device=device,
    )
    noisy = privatize(clean, noise_multiplier=noise_multiplier, threshold=threshold, _noise=_noise)
    del clean
    return noisy


def lookahead_embeddings(variation_embeddings: np.ndarray) -> np.ndarray:
    """Candidate embeddings as the mean of their variations' embeddings, shape (M, L, d) → (M, d)."""
    arr = np.asarray(variation_embeddings)
    if arr.ndim != 3:
        raise ValueError(f"expected (candidates, variations, dims), got shape {arr.shape}")
    return arr.mean(axis=1)
