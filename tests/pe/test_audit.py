"""A statistical privacy audit of one PE round (the real dp_histogram), on neighbouring datasets.

We run the mechanism many times on D and on D′ = D plus one private point, and bound the
privacy loss from below with Clopper–Pearson intervals over threshold tests on the bin the extra
point votes for. The lower bound must stay below the claimed ε; run on a deliberately
under-noised mechanism the same audit must flag it, which shows the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from private_evolution import accounting
from private_evolution.histogram import GaussianNoise, dp_histogram

TRIALS = 20_000
DELTA = 1e-5
CONFIDENCE = 0.95


def _clopper_pearson(successes: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.where(successes > 0, stats.beta.ppf(alpha / 2, successes, n - successes + 1), 0.0)
    hi = np.where(successes < n, stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes), 1.0)
    return lo, hi


def empirical_epsilon_lower_bound(scores_d: np.ndarray, scores_d_prime: np.ndarray, delta: float) -> float:
    """max over threshold tests of ln((TPR_low − δ) / FPR_high), both directions, 95% confidence.

    A test "score > τ" guesses D′; "score < τ" guesses D. Any (ε, δ)-DP mechanism has
    TPR ≤ e^ε · FPR + δ for every test, so each confident (TPR, FPR) pair bounds ε from below.
    """
    n = len(scores_d)
    thresholds = np.quantile(np.concatenate([scores_d, scores_d_prime]), np.linspace(0.0005, 0.9995, 400))
    alpha = (1 - CONFIDENCE) / (2 * len(thresholds))  # Bonferroni over every test we try
    best = 0.0
    for positives, negatives in ((scores_d_prime, scores_d), (-scores_d, -scores_d_prime)):
        cuts = thresholds if positives is scores_d_prime else -thresholds
        tp = (positives[None, :] > cuts[:, None]).sum(1)
        fp = (negatives[None, :] > cuts[:, None]).sum(1)
        tpr_lo, _ = _clopper_pearson(tp, n, alpha)
        _, fpr_hi = _clopper_pearson(fp, n, alpha)
        with np.errstate(divide="ignore"):
            eps = np.log(np.clip(tpr_lo - delta, 1e-300, None) / fpr_hi)
        best = max(best, float(eps.max()))
    return best


def run_mechanism(private: np.ndarray, candidates: np.ndarray, sigma: float, noise: GaussianNoise) -> np.ndarray:
    return np.array(
        [
            dp_histogram(
                private, candidates, noise_multiplier=sigma, threshold=-np.inf, _noise=noise, backend="numpy"
            ).raw[0]
            for _ in range(TRIALS)
        ]
    )


@pytest.fixture(scope="module")
def neighbours() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((10, 3)).astype(np.float32) * 5
    d = rng.standard_normal((30, 3)).astype(np.float32) * 5
    d_prime = np.vstack([d, candidates[:1] + 1e-3])  # the extra point votes for candidate 0
    return d, d_prime, candidates


def test_one_round_respects_claimed_epsilon(neighbours) -> None:
    d, d_prime, candidates = neighbours
    claimed = 1.0
    sigma = accounting.noise_multiplier(epsilon=claimed, delta=DELTA, rounds=1)
    noise = GaussianNoise()
    lb = empirical_epsilon_lower_bound(
        run_mechanism(d, candidates, sigma, noise), run_mechanism(d_prime, candidates, sigma, noise), DELTA
    )
    assert lb <= claimed, f"empirical epsilon lower bound {lb:.3f} exceeds the claimed {claimed}"


def test_audit_flags_an_under_noised_mechanism(neighbours) -> None:
    d, d_prime, candidates = neighbours
    claimed = 1.0
    sigma = accounting.noise_multiplier(epsilon=claimed, delta=DELTA, rounds=1) / 5  # broken calibration
    noise = GaussianNoise()
    lb = empirical_epsilon_lower_bound(
        run_mechanism(d, candidates, sigma, noise), run_mechanism(d_prime, candidates, sigma, noise), DELTA
    )
    assert lb > claimed
