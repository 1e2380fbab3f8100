"""An empirical privacy audit of the whole PE loop on neighbouring datasets.

The mechanism under test is everything ``PrivateEvolution.run`` releases: the DP count of units
and T rounds of vote histograms, with privacy units of several rows, populations full of
bit-identical candidates (kept samples and a target that every variation fold re-proposes), and
the default search backend. D′ is D plus one *canary unit* whose rows all sit on the target.

The distinguisher is the likelihood-ratio statistic of the claimed mechanism: the count over σ_c²
plus, each round, the noisy vote of the target's first copy over σ² (the adversary reads both
from the released state). For a correct μ-GDP mechanism it is Gaussian with a shift of at most μ
between D and D′, so the audit gives two lower bounds on the privacy loss:
- distribution-free: Clopper–Pearson bounds on threshold tests give ε_lb at δ (must stay below
  the claimed ε at that δ);
- Gaussian DP: a lower confidence bound on the standardised shift of the statistic (must stay
  below the ledger's μ). This is what makes the audit sharp enough to flag a mechanism whose
  noise is only σ/1.5, or one with a classic bug (unit ids dropped, empty bins left noiseless).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from private_evolution import PEConfig, PrivateEvolution, accounting
from private_evolution import histogram as H
from private_evolution.files import load_npz, read_jsonl

from .test_audit import empirical_epsilon_lower_bound

TRIALS = 800
MUTANT_TRIALS = 150
TARGET = [10.0, 10.0]
AUDIT_DELTA = 1e-2
Z_ONE_SIDED = 3.719  # 99.99%: a correct mechanism fails the GDP check once in 10,000 runs

CONFIG = PEConfig(
    iterations=3,
    num_samples=4,
    epsilon=3.0,
    delta=1e-3,
    population_size=4,
    variation_folds=2,
    strength=1.0,
    seed=11,
)


class CanaryGenerator:
    """Random points in [-5, 5]², with the target at the head of every random and variation batch."""

    def random(self, n: int, *, seed: int | None = None) -> list[list[float]]:
        out = np.random.default_rng(seed).uniform(-5, 5, (n, 2)).tolist()
        out[0] = list(TARGET)
        return out

    def vary(self, samples: Sequence[list[float]], strength: float, *, seed: int | None = None) -> list[list[float]]:
        x = np.asarray(samples, dtype=np.float64)
        out = (x + strength * np.random.default_rng(seed).standard_normal(x.shape)).tolist()
        out[0] = list(TARGET)  # a bit-identical duplicate of the target in every fold
        return out


class Identity:
    def embed(self, samples: Sequence[list[float]]) -> np.ndarray:
        return np.asarray(samples, dtype=np.float32).reshape(len(samples), -1)


def neighbouring_datasets() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    background = rng.normal(0.0, 1.5, (24, 2)).astype(np.float32)  # 6 units of 4 rows, far from the target
    units = np.repeat(np.arange(6), 4)
    canary = (np.array(TARGET) + 0.05 * rng.standard_normal((4, 2))).astype(np.float32)
    with_canary = (np.concatenate([background, canary]), np.concatenate([units, np.full(4, 99)]))
    return (background, units), with_canary


def statistic(state: Path, plan: accounting.NoisePlan) -> float:
    """Σ_t (noisy vote of the target's first copy in round t)/σ² + (DP count)/σ_c²."""
    value = json.loads((state / "unit_count.json").read_text())["value"]
    total = value / plan.count_noise_multiplier**2
    for t in range(CONFIG.iterations):
        rows = read_jsonl(state / f"round_{t:03d}" / "population.jsonl")
        first = next(i for i, r in enumerate(rows) if r["sample"] == TARGET)
        total += float(load_npz(state / f"round_{t:03d}" / "histogram.npz")["raw"][first]) / (
            plan.round_noise_multiplier**2
        )
    return total


def run_trials(data: tuple[np.ndarray, np.ndarray], trials: int, noise_scale: float = 1.0) -> np.ndarray:
    private, units = data
    plan = CONFIG.noise_plan()
    source = H.GaussianNoise()

    def noise(size: int) -> np.ndarray:
        return source.standard_normal(size) * noise_scale

    root = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    out = np.empty(trials)
    try:
        for i in range(trials):
            state = root / f"t{i}"
            pe = PrivateEvolution(CanaryGenerator(), Identity(), CONFIG, state, save_embeddings=False, _noise=noise)
            pe.run(private, units=units)
            out[i] = statistic(state, plan)
            shutil.rmtree(state)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def gdp_mu_lower_bound(without: np.ndarray, with_canary: np.ndarray) -> float:
    """One-sided lower confidence bound of the standardised shift (Welch standard error)."""
    shift = with_canary.mean() - without.mean()
    scale = math.sqrt((with_canary.var(ddof=1) + without.var(ddof=1)) / 2)
    se = math.sqrt(with_canary.var(ddof=1) / len(with_canary) + without.var(ddof=1) / len(without))
    return (shift - Z_ONE_SIDED * se) / max(scale, 1e-300)


def audit(trials: int, noise_scale: float = 1.0) -> dict[str, float]:
    d, d_prime = neighbouring_datasets()
    plan = CONFIG.noise_plan()
    # On the claimed scale the statistic has unit variance under both datasets.
    s_d = run_trials(d, trials, noise_scale) / plan.gdp_mu
    s_dp = run_trials(d_prime, trials, noise_scale) / plan.gdp_mu
    return {
        "claimed_mu": plan.gdp_mu,
        "claimed_epsilon": accounting.epsilon_at(gdp_mu=plan.gdp_mu, delta=AUDIT_DELTA),
        "epsilon_lb": empirical_epsilon_lower_bound(s_d, s_dp, AUDIT_DELTA),
        "mu_lb": gdp_mu_lower_bound(s_d, s_dp),
        # A Gaussian mechanism shifts the statistic without changing its spread; a bin left
        # without noise, or noise of the wrong size on one side, changes the spread.
        "equal_spread_p": _equal_variance_p(s_d, s_dp),
        "normality_p": min(stats.normaltest(s_d).pvalue, stats.normaltest(s_dp).pvalue),
    }


def _equal_variance_p(a: np.ndarray, b: np.ndarray) -> float:
    ratio = a.var(ddof=1) / max(b.var(ddof=1), 1e-300)
    tail = stats.f.cdf(ratio, len(a) - 1, len(b) - 1)
    return float(2 * min(tail, 1 - tail))


def flagged(result: dict[str, float]) -> bool:
    return (
        result["epsilon_lb"] > result["claimed_epsilon"]
        or result["mu_lb"] > result["claimed_mu"]
        or result["equal_spread_p"] < 1e-4
    )


def test_the_whole_loop_respects_its_claim() -> None:
    result = audit(TRIALS)
    assert not flagged(result), result
    # The distinguisher is the right one: the statistic is Gaussian and shifts by nearly μ. (A
    # rounding bug or a noiseless bin breaks the first; a weak statistic the second.)
    assert result["normality_p"] > 1e-4, result
    assert result["mu_lb"] > 0.6 * result["claimed_mu"], result


def test_the_audit_flags_noise_of_sigma_over_1_5() -> None:
    result = audit(TRIALS, noise_scale=1 / 1.5)
    assert flagged(result), result


def _drop_unit_ids(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def mutant(indices: np.ndarray, num_candidates: int, units: np.ndarray | None = None) -> np.ndarray:
        return original(indices, num_candidates, None)

    return mutant


def _noiseless_empty_bins(original: Callable[..., H.NoisyHistogram]) -> Callable[..., H.NoisyHistogram]:
    def mutant(clean: np.ndarray, **kwargs: object) -> H.NoisyHistogram:
        noisy = original(clean, **kwargs)
        raw = np.where(np.asarray(clean) == 0, 0.0, noisy.raw)
        return H.NoisyHistogram(values=raw.copy(), raw=raw, noise_multiplier=noisy.noise_multiplier, threshold=0.0)

    return mutant


@pytest.mark.parametrize(
    ("target", "mutation"),
    [("histogram_from_neighbors", _drop_unit_ids), ("privatize", _noiseless_empty_bins)],
    ids=["drop-unit-ids", "noiseless-empty-bins"],
)
def test_the_audit_catches_classic_bugs(monkeypatch: pytest.MonkeyPatch, target: str, mutation) -> None:
    monkeypatch.setattr(H, target, mutation(getattr(H, target)))
    result = audit(MUTANT_TRIALS)
    assert flagged(result), result
