"""The DP nearest-neighbour vote histogram, the only place where private data meet the population.

Each private row votes for its k nearest candidates (exact search, L2 or cosine) with weight 1/√k,
so every row's vote vector has L2 norm exactly 1. With privacy units (e.g. all images of one
person), a unit's rows' votes are summed and the sum is scaled to L2 norm ≤ 1. Adding or removing
one unit therefore moves the histogram by at most 1 in L2, and Gaussian noise N(0, σ²) on every bin
makes one release a Gaussian mechanism with noise multiplier σ.

Search runs in chunks of private rows, so memory is O((N+M)·d + chunk·M), never the N×M matrix.
Backends: numpy (CPU), torch (CPU or GPU) and faiss (CPU, when installed) behind one function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
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
    "nearest_neighbors",
    "privatize",
]

Metric = Literal["l2", "cosine"]
Backend = Literal["auto", "numpy", "torch", "faiss"]

# Bytes a search chunk may use for its chunk×M score block (and, for k > 1, the partition indices).
DEFAULT_CHUNK_BYTES = int(os.environ.get("PE_CHUNK_BYTES", 192 * 2**20))
GPU_CHUNK_BYTES = 2**30


# --------------------------------------------------------------------------------------------
# Exact k-nearest-neighbour search
# --------------------------------------------------------------------------------------------
def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch")


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: Backend, queries: Any, keys: Any, device: str | None) -> str:
    if backend != "auto":
        return backend
    if _is_torch_tensor(queries) or _is_torch_tensor(keys) or (device is not None and device != "cpu"):
        return "torch"
    return "faiss" if _faiss_available() else "numpy"


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


def _chunk_rows(m: int, k: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    per_row = m * (4 + (8 if k > 1 else 0))
    return max(1, DEFAULT_CHUNK_BYTES // per_row)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def _smallest_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k smallest scores per row, nearest first (ties: lower index)."""
    if k == 1:
        idx = np.argmin(scores, axis=1)[:, None]
    else:
        part = np.argpartition(scores, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, vals), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
    return idx.astype(np.int64, copy=False), np.take_along_axis(scores, idx, axis=1)


def _knn_numpy(q: np.ndarray, y: np.ndarray, k: int, metric: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = q.shape[0]
    if metric == "cosine":
        q, y = _normalize_rows(q), _normalize_rows(y)
        # score = -cos; distance = 1 - cos
        yt = np.ascontiguousarray((-y).T)
        offset = np.zeros(0, dtype=q.dtype)
    else:
        # ||q - y||² = ||q||² - 2 q·y + ||y||²; rank by -2 q·y + ||y||² and add ||q||² back after.
        yt = np.ascontiguousarray((-2.0 * y).T)
        offset = np.einsum("ij,ij->i", y, y)
    indices = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=q.dtype)
    for start in range(0, n, chunk):
        qc = q[start : start + chunk]
        scores = qc @ yt
        if metric == "l2":
            scores += offset
        idx, val = _smallest_k(scores, k)
        val = np.maximum(val + np.einsum("ij,ij->i", qc, qc)[:, None], 0) if metric == "l2" else 1.0 + val
        indices[start : start + chunk] = idx
        dists[start : start + chunk] = val
    return indices, dists


def _knn_faiss(q: np.ndarray, y: np.ndarray, k: int, metric: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    q = np.ascontiguousarray(q, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if metric == "cosine":
        q, y = _normalize_rows(q), _normalize_rows(y)
        index = faiss.IndexFlatIP(y.shape[1])
    else:
        index = faiss.IndexFlatL2(y.shape[1])
    index.add(y)
    n = q.shape[0]
    indices = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        d, i = index.search(q[start : start + chunk], k)
        indices[start : start + chunk] = i
        dists[start : start + chunk] = 1.0 - d if metric == "cosine" else d
    return indices, dists


def _knn_torch(q: Any, y: Any, k: int, metric: str, chunk: int, device: str | None) -> tuple[np.ndarray, np.ndarray]:
    import torch

    def as_tensor(x: Any) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device) if device is not None else t

    qt, yt = as_tensor(q), as_tensor(y)
    if yt.device != qt.device:
        yt = yt.to(qt.device)
    if not qt.is_floating_point():
        qt = qt.float()
    yt = yt.to(qt.dtype)
    if metric == "cosine":
        qt = torch.nn.functional.normalize(qt, dim=1)
        yt = torch.nn.functional.normalize(yt, dim=1)
        ymat = -yt.T.contiguous()
        offset = None
    else:
        ymat = (-2.0 * yt).T.contiguous()
        offset = (yt * yt).sum(dim=1)
    n = qt.shape[0]
    out_i = torch.empty((n, k), dtype=torch.int64, device=qt.device)
    out_d = torch.empty((n, k), dtype=qt.dtype, device=qt.device)
    with torch.inference_mode():
        for start in range(0, n, chunk):
            qc = qt[start : start + chunk]
            scores = qc @ ymat if offset is None else torch.addmm(offset, qc, ymat)
            if k == 1:
                val, idx = scores.min(dim=1, keepdim=True)
            else:
                val, idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
            val = (val + (qc * qc).sum(dim=1, keepdim=True)).clamp_min(0) if offset is not None else 1.0 + val
            out_i[start : start + chunk] = idx
            out_d[start : start + chunk] = val
    return out_i.cpu().numpy(), out_d.float().cpu().numpy()


# Both CPU backends do the same exact search through a BLAS matrix product, but which kernel each
# gets depends on the machine (measured here: numpy from 0.28× to 1.12× the time of faiss). For
# large problems, ``auto`` times both on the first rows and keeps the faster for the rest.
CALIBRATE_MIN_WORK = 2e10  # N·M·d multiply-adds below which the choice does not matter
_CPU_CHOICE: dict[tuple[int, int, int, str, str], str] = {}


def _knn_calibrated(
    q: np.ndarray, y: np.ndarray, k: int, metric: str, chunk: int, faiss_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    import time

    key = (y.shape[0], y.shape[1], k, metric, q.dtype.str)
    start = 0
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if key not in _CPU_CHOICE:
        # Alternate the two on consecutive row blocks (every result is kept: no work is wasted)
        # and compare each one's best block, so one noisy block cannot decide.
        probe = max(1, min(q.shape[0] // 8, chunk, 4096))
        best = {"numpy": float("inf"), "faiss": float("inf")}
        for name in ("numpy", "faiss", "numpy", "faiss"):
            block = q[start : start + probe]
            t0 = time.perf_counter()
            if name == "numpy":
                parts.append(_knn_numpy(block, y, k, metric, chunk))
            else:
                parts.append(_knn_faiss(block, y, k, metric, faiss_chunk))
            best[name] = min(best[name], (time.perf_counter() - t0) / max(len(block), 1))
            start += len(block)
        _CPU_CHOICE[key] = "numpy" if best["numpy"] <= best["faiss"] else "faiss"
    rest = q[start:]
    if len(rest):
        if _CPU_CHOICE[key] == "numpy":
            parts.append(_knn_numpy(rest, y, k, metric, chunk))
        else:
            parts.append(_knn_faiss(rest, y, k, metric, faiss_chunk))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.float32)


def nearest_neighbors(
    queries: np.ndarray | torch.Tensor,
    keys: np.ndarray | torch.Tensor,
    *,
    k: int = 1,
    metric: Metric = "l2",
    backend: Backend = "auto",
    chunk_size: int | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ``keys`` of every row of ``queries``.

    Returns ``(indices, distances)``, both ``(N, k)``, nearest first; distances are squared L2 or
    cosine distance (1 − cos). ``backend="auto"`` picks torch for tensors or a non-CPU ``device``;
    on the CPU, numpy, or (when installed) whichever of faiss and numpy is faster on this machine,
    timed on the first rows of a large problem. Memory beyond the inputs is O(chunk_size · M).
    """
    n, m, _ = _check_inputs(queries, keys, k, metric)
    chosen = _resolve_backend(backend, queries, keys, device)
    on_gpu = chosen == "torch" and (
        (device is not None and device.startswith("cuda")) or str(getattr(queries, "device", "cpu")).startswith("cuda")
    )
    # GPUs want big blocks to stay busy; 1 GiB of scores is still small next to their memory.
    chunk = _chunk_rows(m, k, chunk_size) if not on_gpu or chunk_size else max(1, GPU_CHUNK_BYTES // (m * 4))
    if n == 0:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
    if chosen == "torch":
        return _knn_torch(queries, keys, k, metric, chunk, device)
    q = np.asarray(queries)
    y = np.asarray(keys)
    if not (np.isfinite(q).all() and np.isfinite(y).all()):
        raise ValueError("embeddings contain NaN or infinite values; check the embedding model's output")
    dtype = np.result_type(q.dtype, y.dtype, np.float32)
    q, y = q.astype(dtype, copy=False), y.astype(dtype, copy=False)
    faiss_chunk = chunk if chunk_size is not None else max(chunk, 1 << 16)
    if backend == "auto" and chosen == "faiss" and n * m * q.shape[1] >= CALIBRATE_MIN_WORK:
        return _knn_calibrated(q, y, k, metric, chunk, faiss_chunk)
    if chosen == "faiss":
        # faiss tiles queries × database internally with bounded buffers; bigger calls keep its
        # threads busy, and the only per-call memory is the N×k result.
        return _knn_faiss(q, y, k, metric, faiss_chunk)
    if chosen == "numpy":
        return _knn_numpy(q, y, k, metric, chunk)
    raise ValueError(f"backend must be one of auto, numpy, torch, faiss; got {backend!r}")


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
    (post-processing).
    """

    values: np.ndarray
    raw: np.ndarray
    noise_multiplier: float
    threshold: float
    num_voters: int

    def __post_init__(self) -> None:
        for arr in (self.values, self.raw):
            arr.setflags(write=False)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {
            "values": self.values,
            "raw": self.raw,
            "noise_multiplier": np.float64(self.noise_multiplier),
            "threshold": np.float64(self.threshold),
            "num_voters": np.int64(self.num_voters),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> NoisyHistogram:
        return cls(
            values=np.array(arrays["values"], dtype=np.float64),
            raw=np.array(arrays["raw"], dtype=np.float64),
            noise_multiplier=float(arrays["noise_multiplier"]),
            threshold=float(arrays["threshold"]),
            num_voters=int(arrays["num_voters"]),
        )


NoiseSource = GaussianNoise | Callable[[int], np.ndarray]


def privatize(
    clean: np.ndarray,
    *,
    noise_multiplier: float,
    threshold: float = 0.0,
    num_voters: int = 0,
    noise: NoiseSource | None = None,
) -> NoisyHistogram:
    """Add N(0, σ²) to every bin of a sensitivity-1 histogram, then apply the threshold H."""
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    clean = np.asarray(clean, dtype=np.float64)
    source = noise if noise is not None else GaussianNoise()
    draw = source.standard_normal if isinstance(source, GaussianNoise) else source
    if noise_multiplier > 0:
        z = np.asarray(draw(clean.shape[0]), dtype=np.float64)
        if z.shape != clean.shape:
            raise ValueError("noise source returned the wrong number of draws")
        raw = clean + noise_multiplier * z
    else:
        raw = clean.copy()
    values = np.where(raw < threshold, 0.0, raw)
    return NoisyHistogram(
        values=values,
        raw=raw,
        noise_multiplier=float(noise_multiplier),
        threshold=float(threshold),
        num_voters=int(num_voters),
    )


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
    noise: NoiseSource | None = None,
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
    num_voters = int(private.shape[0]) if units is None else len(np.unique(np.asarray(units)))
    noisy = privatize(clean, noise_multiplier=noise_multiplier, threshold=threshold, num_voters=num_voters, noise=noise)
    del clean
    return noisy


def lookahead_embeddings(variation_embeddings: np.ndarray) -> np.ndarray:
    """Candidate embeddings as the mean of their variations' embeddings, shape (M, L, d) → (M, d)."""
    arr = np.asarray(variation_embeddings)
    if arr.ndim != 3:
        raise ValueError(f"expected (candidates, variations, dims), got shape {arr.shape}")
    return arr.mean(axis=1)
