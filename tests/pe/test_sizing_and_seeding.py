"""The population sized from the DP count, and DP seeding of the first population."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from private_evolution import PEConfig, PrivateEvolution, RunStateError, accounting
from private_evolution.histogram import weight_histogram

from .toy import IdentityEmbedder, PointGenerator, private_points

PRIVATE = private_points(400)


def config(**kw) -> PEConfig:
    base = dict(iterations=3, num_samples=10, epsilon=4.0, population_size="auto", variation_folds=3, seed=2)
    base.update(kw)
    return PEConfig(**base)


def test_auto_population_is_sized_from_the_dp_count(tmp_path: Path) -> None:
    cfg = config(target_signal=1.5, auto_population_bounds=(3, 500))
    seen = []
    result = PrivateEvolution(PointGenerator(), IdentityEmbedder(), cfg, tmp_path).run(
        PRIVATE, on_start=lambda c, n: seen.append((c.population_size, n.value))
    )
    sigma = result.noise_multiplier
    kept = math.floor(result.unit_count.value / (1.5 * sigma * 4))
    assert result.config.population_size == seen[0][0] == min(max(kept, 3), 500)
    # a candidate then expects about target_signal · σ votes a round
    assert result.unit_count.value / (result.config.population_size * 4) >= 1.5 * sigma
    assert json.loads((tmp_path / "config.json").read_text())["config"]["population_size"] == "auto"
    # resume re-reads the count, so the population is sized the same
    again = PrivateEvolution(PointGenerator(), IdentityEmbedder(), cfg, tmp_path).run(PRIVATE, resume=True)
    assert again.config.population_size == result.config.population_size
    assert again.samples == result.samples


def test_auto_population_bounds_and_infinite_epsilon(tmp_path: Path) -> None:
    result = PrivateEvolution(PointGenerator(), IdentityEmbedder(), config(epsilon=math.inf), tmp_path).run(PRIVATE)
    assert result.config.population_size == 2000  # no noise: the upper bound
    tiny = config(epsilon=0.2, auto_population_bounds=(5, 50))
    result = PrivateEvolution(PointGenerator(), IdentityEmbedder(), tiny, tmp_path / "b").run(PRIVATE)
    assert result.config.population_size == 5  # much noise: the lower bound, never below num_samples' need


def test_auto_population_needs_the_count() -> None:
    with pytest.raises(ValueError, match="count_share"):
        config(count_share=0.0)
    with pytest.raises(ValueError, match="sized_for"):
        config().kept(0)


class ConditionedGenerator(PointGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.prior: np.ndarray | None = None

    def condition(self, histogram: np.ndarray) -> None:
        self.prior = np.asarray(histogram)


def _weights() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = np.zeros((len(PRIVATE), 6))
    w[np.arange(len(PRIVATE)), rng.choice(6, len(PRIVATE), p=[0.6, 0.2, 0.1, 0.05, 0.05, 0.0])] = 1.0
    return w


def test_seeding_is_a_charged_release_given_to_the_generator(tmp_path: Path) -> None:
    gen = ConditionedGenerator()
    cfg = config(population_size=10, seeding_share=0.1, epsilon=math.inf)
    result = PrivateEvolution(gen, IdentityEmbedder(), cfg, tmp_path).run(PRIVATE, seeding_weights=_weights())
    assert "seeding" in result.ledger
    np.testing.assert_array_equal(gen.prior, weight_histogram(_weights()))  # ε = ∞: the clean counts
    assert (tmp_path / "seeding.npz").exists()


def test_seeding_shares_the_budget(tmp_path: Path) -> None:
    cfg = config(population_size=10, seeding_share=0.1)
    plan = cfg.noise_plan()
    assert plan.seeding_noise_multiplier == pytest.approx(1 / (plan.gdp_mu * math.sqrt(0.1)), rel=1e-6)
    result = PrivateEvolution(ConditionedGenerator(), IdentityEmbedder(), cfg, tmp_path).run(
        PRIVATE, seeding_weights=_weights()
    )
    assert result.ledger.names()[:2] == ["unit_count", "seeding"]
    assert result.epsilon <= 4.0 * (1 + 1e-9)
    assert accounting.epsilon_at(gdp_mu=plan.gdp_mu, delta=plan.delta) <= 4.0 * (1 + 1e-9)


def test_lost_seeding_release_is_never_redrawn(tmp_path: Path) -> None:
    cfg = config(population_size=10, seeding_share=0.1)
    PrivateEvolution(ConditionedGenerator(), IdentityEmbedder(), cfg, tmp_path).run(PRIVATE, seeding_weights=_weights())
    (tmp_path / "seeding.npz").unlink()
    with pytest.raises(RunStateError, match="seeding"):
        PrivateEvolution(ConditionedGenerator(), IdentityEmbedder(), cfg, tmp_path).run(
            PRIVATE, seeding_weights=_weights(), resume=True
        )


def test_seeding_needs_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seeding_weights"):
        PrivateEvolution(
            ConditionedGenerator(), IdentityEmbedder(), config(population_size=10, seeding_share=0.1), tmp_path
        ).run(PRIVATE)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 30),
    keys=st.integers(1, 8),
    num_units=st.integers(1, 10),
    unit_level=st.booleans(),
)
def test_weight_histogram_sensitivity_is_one(seed: int, n: int, keys: int, num_units: int, unit_level: bool) -> None:
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=(n, keys)) * (rng.random((n, keys)) < 0.5)
    units = rng.integers(0, num_units, n) if unit_level else None
    full = weight_histogram(w, units)
    ids = np.unique(units) if unit_level else np.arange(n)
    for u in ids:
        keep = (units != u) if unit_level else (np.arange(n) != u)
        reduced = weight_histogram(w[keep], units[keep] if unit_level else None)
        assert np.linalg.norm(full - reduced) <= 1 + 1e-9
