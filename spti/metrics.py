"""Evaluation metrics as pure functions over arrays: Fréchet distance, improved precision/recall,
CLIP score, wavelet energy spectra, text statistics.

Nothing here loads a model or reads a file: :mod:`spti.evaluate` extracts features and calls these.
Statistics are computed in float64 whatever the input dtype, because Fréchet distances subtract
large traces from each other and float32 loses the difference.

None of these numbers is differentially private when computed on private data: they are for the
owner of the data (see :mod:`spti.evaluate`).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "PrecisionRecall",
    "WaveletSpectrum",
    "clip_score",
    "frechet_distance",
    "frechet_distance_features",
    "gaussian_stats",
    "image_energy_fractions",
    "kth_neighbour_distances",
    "nearest_neighbour_distances",
    "precision_recall",
    "round_metrics",
    "text_stats",
    "tokenize_words",
    "wavelet_band_names",
    "wavelet_energy_spectrum",
]

# Distance blocks hold at most this many entries (float64: 32 MiB), whatever the set sizes.
_BLOCK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------------
# Fréchet distance between Gaussians fitted to features
# --------------------------------------------------------------------------------------------
def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples × dimensions), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``features`` (n × d), the Gaussian FID fits.

    Needs at least two samples: one sample has no covariance. With fewer samples than dimensions
    the covariance is rank-deficient; :func:`frechet_distance` copes, but the distance is then
    biased upward and only comparable with values computed on the same sample sizes.
    """
    x = _as_features(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """Principal square root and its relative residual ||X² − A||_F / ||A||_F.

    The residual is computed here because scipy deprecated returning it; singular products make
    scipy warn, and the residual is the check that decides what to do about it.
    """
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(matrix)
    if not np.isfinite(root).all():
        return root, float("inf")
    norm = float(np.linalg.norm(matrix))
    residual = float(np.linalg.norm(root @ root - matrix)) / (norm if norm > 0 else 1.0)
    return root, residual


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    eps: float = 1e-6,
    max_residual: float = 1e-3,
    max_imaginary: float = 1e-3,
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 − mu2||² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)``.

    The product of two covariances estimated from few samples is singular, and the square root
    of a singular matrix is ill-conditioned: when scipy's result is not finite or does not square
    back to the product (relative residual above ``max_residual``), ``eps·I`` is added to both
    covariances and the root recomputed. Rounding leaves a small imaginary part in the root of a
    real product with a (numerically) negative eigenvalue; it is dropped when its largest
    diagonal entry is below ``max_imaginary`` relative to the real diagonal, and anything larger
    raises ``ValueError``, since it means the inputs are not covariance matrices. Tiny negative
    results from rounding are returned as 0.
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}")
    root, residual = _sqrtm(s1 @ s2)
    if residual > max_residual:
        offset = np.eye(d) * eps
        root, residual = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(root).all():
            raise ValueError("the covariance product has no finite square root, even regularised")
    if np.iscomplexobj(root):
        diag = np.diagonal(root)
        scale = max(1.0, float(np.abs(diag.real).max(initial=0.0)))
        worst = float(np.abs(diag.imag).max(initial=0.0))
        if worst > max_imaginary * scale:
            raise ValueError(
                f"square root of the covariance product has an imaginary component of {worst:.3g}: "
                "the inputs are not valid covariance matrices"
            )
        root = root.real
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))
    return max(value, 0.0)


def frechet_distance_features(a: np.ndarray, b: np.ndarray, **kwargs: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when they are Inception pool3).

    With at least as many dimensions as the smaller set has samples (e.g. FID of a few hundred
    images in 2048-d), both covariances have rank below ``d`` and the trace term is computed
    exactly in sample space: with centred data ``A`` (n × d) and ``B`` (m × d),
    ``tr((Σa Σb)^½) = ||A Bᵀ||_* / √((n−1)(m−1))`` (the nonzero eigenvalues of ``Σa Σb`` are the
    squared singular values of ``A Bᵀ`` scaled). When the other set is larger than ``d`` (a few
    thousand selected candidates against a large private set), the same eigenvalues come from the
    smaller set's ``n × n`` matrix ``A Σb Aᵀ / (n−1)`` (symmetric, ``eigvalsh``), so memory stays
    at ``d²`` rather than ``n·m``. That avoids ``sqrtm`` exactly where it is slowest (minutes for
    2048-d on a laptop CPU) and least stable (a singular product), with no ``eps`` bias.
    Otherwise :func:`frechet_distance` (``sqrtm``) is used; ``kwargs`` go to it.
    """
    fa, fb = _as_features(a, "a"), _as_features(b, "b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    n, m = fa.shape[0], fb.shape[0]
    if min(n, m) < 2:
        raise ValueError(f"need at least 2 samples in each set, got {n} and {m}")
    if min(n, m) > fa.shape[1]:
        return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb), **kwargs)
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    ca, cb = fa - mu_a, fb - mu_b
    trace_a = float(np.einsum("ij,ij->", ca, ca)) / (n - 1)
    trace_b = float(np.einsum("ij,ij->", cb, cb)) / (m - 1)
    small, big = (ca, cb) if n <= m else (cb, ca)
    if big.shape[0] <= fa.shape[1]:
        trace_root = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum()) / np.sqrt((n - 1) * (m - 1))
    else:
        # the larger set has more rows than dimensions: its d × d covariance is smaller than the
        # n × m cross product, and Σs Σb shares its nonzero eigenvalues with the symmetric PSD
        # Cs Σb Csᵀ / (ns − 1) (ns × ns), whose eigenvalues eigvalsh computes stably
        cov_big = big.T @ big / (big.shape[0] - 1)
        inner = small @ cov_big @ small.T / (small.shape[0] - 1)
        trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    return max(float(diff @ diff) + trace_a + trace_b - 2.0 * trace_root, 0.0)


def round_metrics(selected_embeddings: np.ndarray, private_embeddings: np.ndarray) -> dict[str, Any]:
    """Owner-only metrics of one PE round: the Fréchet distance, in the voting space, between the
    candidates the round selected and the private set.

    Returns ``{"fd_voting_space": float | None, "num_selected": int}``; the PE loop adds
    ``"round"`` and appends the object as one line to ``RUN_DIR/private/metrics_by_round.jsonl``,
    which ``spti evaluate`` plots. With fewer than two rows on a side there is no covariance and
    ``fd_voting_space`` is ``None`` (JSON ``null``; a run must not fail over a diagnostic).
    Selected sets are usually smaller than the voting space is wide (2,000 candidates in Inception's
    2,048 dimensions); :func:`frechet_distance_features` then takes the exact sample-space route
    (an SVD of the n × m cross product, no ``sqrtm`` of a singular matrix, no ``eps`` bias).

    NOT differentially private: it reads the private embeddings outside the DP mechanism, so it is
    for the data owner and must never reach ``release/``.
    """
    selected = _as_features(selected_embeddings, "selected_embeddings")
    private = _as_features(private_embeddings, "private_embeddings")
    if selected.shape[1] != private.shape[1]:
        raise ValueError(f"embedding dimensions differ: {selected.shape[1]} vs {private.shape[1]}")
    fd = frechet_distance_features(selected, private) if min(len(selected), len(private)) >= 2 else None
    return {"fd_voting_space": fd, "num_selected": int(selected.shape[0])}


# --------------------------------------------------------------------------------------------
# Nearest neighbours and improved precision / recall
# --------------------------------------------------------------------------------------------
def _distance_blocks(
    query: np.ndarray, reference: np.ndarray, *, block_entries: int = _BLOCK_ENTRIES
) -> Iterator[tuple[int, np.ndarray]]:
    """Euclidean distances query × reference, yielded as (first row, block) so memory stays bounded."""
    ref_sq = np.einsum("ij,ij->i", reference, reference)
    rows = max(1, block_entries // max(1, reference.shape[0]))
    for start in range(0, query.shape[0], rows):
        q = query[start : start + rows]
        sq = np.einsum("ij,ij->i", q, q)[:, None] + ref_sq[None, :] - 2.0 * (q @ reference.T)
        yield start, np.sqrt(np.maximum(sq, 0.0))


def kth_neighbour_distances(features: np.ndarray, k: int, *, block_entries: int = _BLOCK_ENTRIES) -> np.ndarray:
    """Distance from each sample to its ``k``-th nearest other sample of the same set.

    The sample itself sits at distance 0 in its own row, so the ``k``-th other neighbour is the
    ``k + 1``-th smallest entry; exact duplicates count as neighbours at distance 0.
    """
    x = _as_features(features, "features")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in 1..{x.shape[0] - 1} for {x.shape[0]} samples, got {k}")
    out = np.empty(x.shape[0])
    for start, block in _distance_blocks(x, x, block_entries=block_entries):
        out[start : start + block.shape[0]] = np.partition(block, k, axis=1)[:, k]
    return out


def nearest_neighbour_distances(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    exclude_self: bool = False,
    block_entries: int = _BLOCK_ENTRIES,
) -> np.ndarray:
    """Distance from each query row to its nearest reference row.

    ``exclude_self=True`` is for ``query is reference``: each row's own entry is skipped, giving
    the within-set nearest-neighbour distance (the scale against which copies are judged).
    """
    if exclude_self:
        return kth_neighbour_distances(reference, 1, block_entries=block_entries)
    q, r = _as_features(query, "query"), _as_features(reference, "reference")
    if r.shape[0] == 0:
        raise ValueError("reference set is empty")
    out = np.empty(q.shape[0])
    for start, block in _distance_blocks(q, r, block_entries=block_entries):
        out[start : start + block.shape[0]] = block.min(axis=1)
    return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block_entries: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius): the k-NN manifold estimate."""
    inside = np.zeros(points.shape[0], dtype=bool)
    for start, block in _distance_blocks(points, centres, block_entries=block_entries):
        inside[start : start + block.shape[0]] = (block <= radii[None, :]).any(axis=1)
    return float(inside.mean())


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision (fake samples on the real manifold) and recall (real samples on the fake one)."""

    precision: float
    recall: float
    k: int
    n_real: int
    n_fake: int


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, *, block_entries: int = _BLOCK_ENTRIES
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

    Each set's manifold is estimated as the union of balls around its samples, each ball reaching
    the sample's ``k``-th nearest neighbour in its own set. Precision is the fraction of fake
    samples inside the real manifold (fidelity); recall the fraction of real samples inside the fake
    manifold (diversity / coverage). Unlike FID the two failure modes are reported apart. Distances
    are computed block by block, never as a full n × m matrix.
    """
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    for name, arr in (("real", r), ("fake", f)):
        if arr.shape[0] <= k:
            raise ValueError(f"{name} set has {arr.shape[0]} samples; k={k} needs more than {k}")
    real_radii = kth_neighbour_distances(r, k, block_entries=block_entries)
    fake_radii = kth_neighbour_distances(f, k, block_entries=block_entries)
    return PrecisionRecall(
        precision=_coverage(f, r, real_radii, block_entries),
        recall=_coverage(r, f, fake_radii, block_entries),
        k=k,
        n_real=r.shape[0],
        n_fake=f.shape[0],
    )


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------
def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean over pairs of ``100 · max(cos(image_i, text_i), 0)`` (the definition torchmetrics uses).

    Row ``i`` of both arrays is one image and the text it should show. Embeddings are normalised
    here, so raw projected CLIP features can be passed.
    """
    a, b = _as_features(image_emb, "image_emb"), _as_features(text_emb, "text_emb")
    if a.shape != b.shape:
        raise ValueError(f"need paired embeddings of the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("no image/text pairs")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-12)
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


# --------------------------------------------------------------------------------------------
# Wavelet energy spectrum
# --------------------------------------------------------------------------------------------
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what PIL's "L" mode uses


def _grayscale(image: Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., :3] @ _LUMA
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected an image or an H×W(×C) array, got shape {arr.shape}")
    return arr


def wavelet_band_names(levels: int) -> tuple[str, ...]:
    """Band names from coarse to fine: ``A{L}`` (approximation), then ``LH{j}``, ``HL{j}``, ``HH{j}``
    for j = L … 1, level 1 being the finest (half the pixel grid's Nyquist band and above)."""
    names = [f"A{levels}"]
    for j in range(levels, 0, -1):
        names += [f"LH{j}", f"HL{j}", f"HH{j}"]
    return tuple(names)


def image_energy_fractions(image: Image | np.ndarray, *, wavelet: str = "haar", levels: int = 4) -> np.ndarray:
    """Fraction of one image's (zero-mean, grayscale) energy in each band of :func:`wavelet_band_names`.

    The mean is removed first: the DC term of a photograph holds almost all of its energy and
    would leave every other band at a negligible fraction; what the spectrum is for is how the
    *variation* splits between coarse structure and fine detail. With ``periodization`` and an
    orthogonal wavelet the transform preserves energy, so the fractions are a partition of the
    pixel variance. A constant image has no variation; it counts as all-approximation.
    """
    import pywt

    gray = _grayscale(image)
    limit = pywt.dwt_max_level(min(gray.shape), pywt.Wavelet(wavelet).dec_len)
    if not 1 <= levels <= limit:
        raise ValueError(f"{levels} wavelet levels need a larger image than {gray.shape[1]}×{gray.shape[0]}")
    coeffs = pywt.wavedec2(gray - gray.mean(), wavelet, mode="periodization", level=levels)
    energies = [float(np.sum(coeffs[0] ** 2))]
    for detail in coeffs[1:]:
        energies += [float(np.sum(c**2)) for c in detail]
    total = sum(energies)
    out = np.zeros(len(energies))
    if total <= 0:
        out[0] = 1.0
        return out
    return np.asarray(energies) / total


@dataclass(frozen=True)
class WaveletSpectrum:
    """Mean (and standard deviation) over images of the energy fraction in each wavelet band."""

    bands: tuple[str, ...]
    fractions: np.ndarray
    std: np.ndarray
    n: int
    wavelet: str
    levels: int

    @classmethod
    def from_fractions(cls, per_image: Sequence[np.ndarray], *, wavelet: str, levels: int) -> WaveletSpectrum:
        if len(per_image) == 0:
            raise ValueError("no images for a wavelet spectrum")
        stack = np.stack([np.asarray(p, dtype=np.float64) for p in per_image])
        return cls(wavelet_band_names(levels), stack.mean(axis=0), stack.std(axis=0), len(stack), wavelet, levels)

    def by_level(self) -> dict[str, float]:
        """Fractions summed over the three orientations of each level (``A{L}``, ``L{L}`` … ``L1``)."""
        out = {self.bands[0]: float(self.fractions[0])}
        for j in range(self.levels, 0, -1):
            idx = [i for i, b in enumerate(self.bands) if b[2:] == str(j) and b[0] != "A"]
            out[f"L{j}"] = float(self.fractions[idx].sum())
        return out

    def total_variation(self, other: WaveletSpectrum) -> float:
        """Half the L1 distance between two spectra: 0 for identical, 1 for disjoint energy bands."""
        if self.bands != other.bands:
            raise ValueError("spectra have different bands")
        return float(0.5 * np.abs(self.fractions - other.fractions).sum())

    def as_dict(self) -> dict[str, Any]:
        return {
            "wavelet": self.wavelet,
            "levels": self.levels,
            "n": self.n,
            "fractions": {b: float(v) for b, v in zip(self.bands, self.fractions, strict=True)},
            "std": {b: float(v) for b, v in zip(self.bands, self.std, strict=True)},
            "by_level": self.by_level(),
        }


def wavelet_energy_spectrum(
    images: Sequence[Image | np.ndarray], wavelet: str = "haar", levels: int = 4
) -> WaveletSpectrum:
    """Average of :func:`image_energy_fractions` over ``images``.

    Images of different sizes put the same band at different absolute frequencies: compare sets
    resized to a common size (as :mod:`spti.evaluate` does).
    """
    return WaveletSpectrum.from_fractions(
        [image_energy_fractions(im, wavelet=wavelet, levels=levels) for im in images], wavelet=wavelet, levels=levels
    )


# --------------------------------------------------------------------------------------------
# Text statistics
# --------------------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words: runs of letters/digits, keeping inner apostrophes (``don't`` is one word)."""
    return _WORD.findall(text.lower())


def text_stats(texts: Sequence[str], *, top_k: int = 10) -> dict[str, Any]:
    """Length (in words), vocabulary and most frequent words of a set of texts, JSON-ready.

    ``type_token_ratio`` is vocabulary size / total words: a rough diversity measure that falls
    as sets grow, so compare it only between sets of similar total length. Top words are ordered
    by count, then alphabetically, so the result is deterministic.
    """
    tokens = [tokenize_words(t) for t in texts]
    lengths = np.array([len(t) for t in tokens], dtype=np.float64)
    counts: Counter[str] = Counter(w for t in tokens for w in t)
    total = int(lengths.sum())
    out: dict[str, Any] = {
        "n_texts": len(texts),
        "total_words": total,
        "vocabulary_size": len(counts),
        "type_token_ratio": len(counts) / total if total else None,
        "top_words": [[w, c] for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:top_k]],
    }
    if len(lengths):
        q = np.quantile(lengths, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        out["words"] = {
            "mean": float(lengths.mean()),
            "std": float(lengths.std()),
            **{name: float(v) for name, v in zip(("min", "p5", "p25", "median", "p75", "p95", "max"), q, strict=True)},
        }
    else:
        out["words"] = None
    return out
