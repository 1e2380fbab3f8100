"""The vote histogram: exact search on every backend, sensitivity ≤ 1, calibrated noise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from private_evolution import histogram as H

BACKENDS = ["numpy", "torch", "faiss"]


def brute_force(q: np.ndarray, y: np.ndarray, k: int, metric: str) -> np.ndarray:
    q64, y64 = q.astype(np.float64), y.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        y64 = y64 / np.linalg.norm(y64, axis=1, keepdims=True)
        d = 1 - q64 @ y64.T
    else:
        d = ((q64[:, None, :] - y64[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k], np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_exact_knn_matches_brute_force(backend: str, metric: str, k: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((97, 16)).astype(np.float32)
    y = rng.standard_normal((41, 16)).astype(np.float32)
    idx, dist = H.nearest_neighbors(q, y, k=k, metric=metric, backend=backend, chunk_size=10)
    ref_idx, ref_dist = brute_force(q, y, k, metric)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_votes(backend: str) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((500, 8)).astype(np.float32)
    y = rng.standard_normal((60, 8)).astype(np.float32)
    a = H.clean_vote_histogram(q, y, k=2, backend=backend, chunk_size=7)
    b = H.clean_vote_histogram(q, y, k=2, backend=backend, chunk_size=10_000)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == pytest.approx(500 * 2 / np.sqrt(2))


def test_torch_tensor_inputs_use_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.standard_normal((9, 4)).astype(np.float32)
    a, _ = H.nearest_neighbors(torch.from_numpy(q), torch.from_numpy(y))
    b, _ = H.nearest_neighbors(q, y, backend="numpy")
    np.testing.assert_array_equal(a, b)


def test_default_chunk_is_bounded() -> None:
    # 14,000 candidates at the default budget: the score block stays well below 2 GB.
    rows = H._chunk_rows(14_000, 1, None)
    assert rows * 14_000 * 4 <= H.DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize(
    ("q", "y", "k", "match"),
    [
        (np.zeros((3, 4)), np.zeros((5, 3)), 1, "dims"),
        (np.zeros((3, 4)), np.zeros((0, 4)), 1, "no candidates"),
        (np.zeros((3, 4)), np.zeros((5, 4)), 6, "k must be"),
        (np.full((3, 4), np.nan), np.zeros((5, 4)), 1, "NaN"),
    ],
)
def test_bad_inputs(q, y, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        H.nearest_neighbors(q, y, k=k, backend="numpy")


# ---- sensitivity ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 40),
    m=st.integers(1, 12),
    k=st.integers(1, 5),
    num_units=st.integers(1, 8),
    unit_level=st.booleans(),
    metric=st.sampled_from(["l2", "cosine"]),
)
def test_sensitivity_add_remove_one_unit(seed, n, m, k, num_units, unit_level, metric) -> None:
    k = min(k, m)
    rng = np.random.default_rng(seed)
    private = rng.standard_normal((n, 3)).astype(np.float32)
    cands = rng.standard_normal((m, 3)).astype(np.float32)
    units = rng.integers(0, num_units, size=n) if unit_level else None
    full = H.clean_vote_histogram(private, cands, k=k, metric=metric, units=units, backend="numpy")
    victims = np.unique(units) if unit_level else np.arange(n)
    for victim in victims:
        keep = units != victim if unit_level else np.arange(n) != victim
        if not keep.any():
            continue
        neighbour = H.clean_vote_histogram(
            private[keep],
            cands,
            k=k,
            metric=metric,
            units=None if units is None else units[keep],
            backend="numpy",
        )
        assert np.linalg.norm(full - neighbour) <= 1.0 + 1e-9


def test_unit_level_scales_many_votes_to_norm_one() -> None:
    idx = np.array([[0], [0], [0], [1]])
    hist = H.histogram_from_neighbors(idx, 3, units=np.array(["a", "a", "a", "b"]))
    np.testing.assert_allclose(hist, [1.0, 1.0, 0.0])  # unit a's 3 votes collapse to norm 1
    idx = np.array([[0], [1], [2], [2]])
    hist = H.histogram_from_neighbors(idx, 3, units=np.array([7, 7, 7, 9]))
    np.testing.assert_allclose(hist, [1 / np.sqrt(3), 1 / np.sqrt(3), 1 / np.sqrt(3) + 1])


def test_sample_level_equals_singleton_units() -> None:
    rng = np.random.default_rng(3)
    idx = np.stack([rng.permutation(10)[:3] for _ in range(50)])
    np.testing.assert_allclose(
        H.histogram_from_neighbors(idx, 10), H.histogram_from_neighbors(idx, 10, units=np.arange(50))
    )


def test_duplicate_neighbours_rejected() -> None:
    with pytest.raises(ValueError, match="twice"):
        H.histogram_from_neighbors(np.array([[1, 1]]), 3)


# ---- noise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 4.0, 25.0])
def test_noise_std_matches_sigma(sigma: float) -> None:
    clean = np.linspace(0, 30, 2000)
    diffs = np.concatenate(
        [H.privatize(clean, noise_multiplier=sigma, threshold=-np.inf).raw - clean for _ in range(100)]
    )
    # 200,000 draws: the std estimate's relative s.e. is ~0.16%; 2% tolerance never flakes.
    assert np.std(diffs) == pytest.approx(sigma, rel=0.02)
    assert abs(np.mean(diffs)) < 5 * sigma / np.sqrt(diffs.size)


def test_noise_is_fresh_every_time_regardless_of_seeds() -> None:
    clean = np.zeros(64)
    np.random.seed(0)  # noqa: NPY002 - the legacy global seed must not reach the noise
    a = H.privatize(clean, noise_multiplier=1.0).raw
    np.random.seed(0)  # noqa: NPY002 - the legacy global seed must not reach the noise
    b = H.privatize(clean, noise_multiplier=1.0).raw
    assert not np.array_equal(a, b)
    assert not np.array_equal(H.GaussianNoise().standard_normal(8), H.GaussianNoise().standard_normal(8))


def test_dp_histogram_returns_only_noisy_release() -> None:
    rng = np.random.default_rng(4)
    q = rng.standard_normal((200, 4)).astype(np.float32)
    y = rng.standard_normal((20, 4)).astype(np.float32)
    clean = H.clean_vote_histogram(q, y)
    noisy = H.dp_histogram(q, y, noise_multiplier=3.0, threshold=1.0)
    assert isinstance(noisy, H.NoisyHistogram)
    assert not np.allclose(noisy.raw, clean)
    assert noisy.noise_multiplier == 3.0
    assert set(noisy.as_arrays()) == {"values", "raw", "noise_multiplier", "threshold"}  # no voter count
    assert (noisy.values[noisy.raw < 1.0] == 0).all()
    np.testing.assert_array_equal(noisy.values[noisy.raw >= 1.0], noisy.raw[noisy.raw >= 1.0])
    with pytest.raises(ValueError, match="read-only"):
        noisy.values[0] = 5.0  # releases are read-only


def test_zero_noise_is_exact() -> None:
    clean = np.array([0.0, 2.0, 3.0])
    noisy = H.privatize(clean, noise_multiplier=0.0, threshold=0.0)
    np.testing.assert_array_equal(noisy.values, clean)


def test_lookahead_mean() -> None:
    arr = np.arange(24, dtype=float).reshape(2, 3, 4)
    np.testing.assert_allclose(H.lookahead_embeddings(arr), arr.mean(axis=1))


@pytest.mark.slow
def test_histogram_at_scale_peak_memory_under_2gb() -> None:
    """N=200,000 × M=14,000 × d=384 float32 in a fresh process: peak RSS < 2 GB."""
    import subprocess
    import sys

    code = (
        "import numpy as np, resource\n"
        "from private_evolution.histogram import clean_vote_histogram\n"
        "rng=np.random.default_rng(0)\n"
        "q=rng.standard_normal((200_000,384),dtype=np.float32)\n"
        "y=rng.standard_normal((14_000,384),dtype=np.float32)\n"
        "h=clean_vote_histogram(q,y)\n"
        "assert h.sum()==200_000\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    assert peak_kib * 1024 < 2 * 2**30


def test_auto_backend_is_chosen_from_public_facts_only() -> None:
    """No timing of private rows: numpy on the CPU, torch for tensors or a device."""
    torch = pytest.importorskip("torch")
    q = np.zeros((3, 2), np.float32)
    assert H._resolve_backend("auto", q, q, None) == "numpy"
    assert H._resolve_backend("auto", torch.from_numpy(q), q, None) == "torch"
    assert H._resolve_backend("auto", q, q, "cuda:0") == "torch"
    assert not hasattr(H, "_CPU_CHOICE") and not hasattr(H, "_knn_calibrated")


def test_torch_backend_refuses_nan_like_numpy() -> None:
    torch = pytest.importorskip("torch")
    q = np.array([[np.nan, 0.0]], np.float32)
    y = np.zeros((2, 2), np.float32)
    for queries in (q, torch.from_numpy(q)):
        with pytest.raises(ValueError, match="NaN"):
            H.nearest_neighbors(queries, y, backend="torch")
