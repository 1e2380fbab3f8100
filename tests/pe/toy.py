"""A 2-D toy world for PE tests: Gaussian-mixture private data, a generator that perturbs points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CENTERS = np.array([[-4.0, -4.0], [4.0, -2.0], [0.0, 5.0]])


def private_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.integers(0, len(CENTERS), size=n)
    return (CENTERS[comp] + 0.6 * rng.standard_normal((n, 2))).astype(np.float32)


class PointGenerator:
    """random: uniform on [-10, 10]²; vary: Gaussian step of std ``strength``. Deterministic per seed."""

    def __init__(self) -> None:
        self.random_calls = 0
        self.vary_calls = 0

    def random(self, n: int, *, seed: int | None = None) -> list[list[float]]:
        self.random_calls += 1
        rng = np.random.default_rng(seed)
        return rng.uniform(-10, 10, size=(n, 2)).tolist()

    def vary(self, samples: Sequence[list[float]], strength: float, *, seed: int | None = None) -> list[list[float]]:
        self.vary_calls += 1
        rng = np.random.default_rng(seed)
        x = np.asarray(samples, dtype=np.float64)
        return (x + strength * rng.standard_normal(x.shape)).tolist()


class IdentityEmbedder:
    def embed(self, samples: Sequence[list[float]]) -> np.ndarray:
        return np.asarray(samples, dtype=np.float32).reshape(len(samples), -1)


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float = 1.0) -> float:
    """Biased squared MMD with an RBF kernel."""

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * bandwidth**2))

    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
