"""The PE loop: checkpoints, resume without double spending, schedules, convergence on a toy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from private_evolution import PEConfig, PrivacyLedger, PrivateEvolution, RunStateError
from private_evolution.histogram import GaussianNoise
from private_evolution.population import select

from .toy import IdentityEmbedder, PointGenerator, mmd_rbf, private_points


class RecordingNoise:
    """The real OS-entropy noise, with every draw recorded so a second run can replay it."""

    def __init__(self, replay: list[np.ndarray] | None = None) -> None:
        self.draws: list[np.ndarray] = []
        self._replay = list(replay) if replay is not None else None
        self._source = GaussianNoise()

    def __call__(self, size: int) -> np.ndarray:
        z = self._replay.pop(0) if self._replay is not None else self._source.standard_normal(size)
        assert z.shape == (size,)
        self.draws.append(z)
        return z


class SimulatedKillError(Exception):
    pass


def config(**kw) -> PEConfig:
    base = dict(iterations=5, num_samples=20, epsilon=4.0, population_size=20, variation_folds=3, strength=0.7, seed=3)
    base.update(kw)
    return PEConfig(**base)


def make(tmp: Path, cfg: PEConfig, noise=None, generator=None) -> PrivateEvolution:
    return PrivateEvolution(generator or PointGenerator(), IdentityEmbedder(), cfg, tmp, _noise=noise, backend="numpy")


PRIVATE = private_points(300)


def test_run_writes_checkpoints_and_ledger(tmp_path: Path) -> None:
    cfg = config()
    rounds_seen: list[int] = []
    result = make(tmp_path, cfg).run(PRIVATE, callbacks=[lambda r: rounds_seen.append(r.round_index)])
    assert rounds_seen == [0, 1, 2, 3, 4]
    assert len(result.samples) == 20
    assert len(result.ledger) == 6 and result.epsilon <= 4.0  # the DP unit count and 5 rounds
    assert result.delta == 1e-6  # public: never 1/(N·ln N) of the private N
    for t in range(5):
        rdir = tmp_path / f"round_{t:03d}"
        assert {p.name for p in rdir.iterdir()} >= {
            "population.jsonl",
            "embeddings.npy",
            "histogram.npz",
            "selected.json",
            "complete.json",
        }
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.tmp"))
    with np.load(tmp_path / "round_000" / "histogram.npz", allow_pickle=False) as z:
        assert z["values"].shape == (20 * 4,)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert ledger.names() == ["unit_count"] + [f"round_{t:03d}" for t in range(5)]


def test_refuses_existing_run_without_resume(tmp_path: Path) -> None:
    make(tmp_path, config(iterations=2)).run(PRIVATE)
    with pytest.raises(RunStateError, match="resume"):
        make(tmp_path, config(iterations=2)).run(PRIVATE)


def test_resume_refuses_changed_settings_or_data(tmp_path: Path) -> None:
    make(tmp_path, config(iterations=2)).run(PRIVATE)
    with pytest.raises(RunStateError, match="config"):
        make(tmp_path, config(iterations=2, strength=0.1)).run(PRIVATE, resume=True)
    with pytest.raises(RunStateError, match="private data"):
        make(tmp_path, config(iterations=2)).run(PRIVATE[:-1].copy() + 0, resume=True)


@pytest.mark.parametrize("stop_after", [0, 2, 3])
def test_resume_after_kill_equals_uninterrupted_and_spends_once(tmp_path: Path, stop_after: int) -> None:
    cfg = config()

    def killer(r):
        if r.round_index == stop_after:
            raise SimulatedKillError

    noise_a = RecordingNoise()
    with pytest.raises(SimulatedKillError):
        make(tmp_path / "a", cfg, noise=noise_a).run(PRIVATE, callbacks=[killer])
    assert len(noise_a.draws) == stop_after + 2  # the DP unit count, then the rounds
    assert len(PrivacyLedger.load(tmp_path / "a" / "ledger.json")) == stop_after + 2

    noise_b = RecordingNoise()
    resumed = make(tmp_path / "a", cfg, noise=noise_b).run(PRIVATE, resume=True)
    assert len(noise_b.draws) == cfg.iterations - stop_after - 1  # no fresh noise for released rounds
    assert len(resumed.ledger) == cfg.iterations + 1
    assert resumed.epsilon <= cfg.epsilon

    replay = RecordingNoise(replay=noise_a.draws + noise_b.draws)
    straight = make(tmp_path / "b", cfg, noise=replay).run(PRIVATE)
    assert straight.samples == resumed.samples
    assert straight.ids == resumed.ids


def test_crash_after_release_before_selection_reuses_release(tmp_path: Path) -> None:
    """A crash between writing round t's histogram and using it must not draw round t again."""
    cfg = config()

    class FailingGenerator(PointGenerator):
        def vary(self, samples, strength, *, seed=None):
            raise SimulatedKillError

    noise_a = RecordingNoise()
    with pytest.raises(SimulatedKillError):
        make(tmp_path, cfg, noise=noise_a, generator=FailingGenerator()).run(PRIVATE)
    assert len(noise_a.draws) == 2 and (tmp_path / "round_000" / "histogram.npz").exists()
    noise_b = RecordingNoise()
    result = make(tmp_path, cfg, noise=noise_b).run(PRIVATE, resume=True)
    assert len(noise_b.draws) == cfg.iterations - 1
    assert len(result.ledger) == cfg.iterations + 1
    assert result.rounds_resumed == [0]


class Boom:
    def __call__(self, size):
        raise SimulatedKillError


def test_crash_after_charge_before_write_is_charged_again(tmp_path: Path) -> None:
    """A draw lost in a crash is still a draw: drawing again is a new release, which a spent budget refuses."""
    from private_evolution import BudgetExceededError

    cfg = config(iterations=3)
    with pytest.raises(SimulatedKillError):
        make(tmp_path, cfg, noise=Boom()).run(PRIVATE)
    assert PrivacyLedger.load(tmp_path / "ledger.json").names() == ["unit_count"]
    with pytest.raises(BudgetExceededError):
        make(tmp_path, cfg).run(PRIVATE, resume=True)
    assert PrivacyLedger.load(tmp_path / "ledger.json").names() == ["unit_count"]


def test_crash_after_charge_redraw_is_recorded_when_the_budget_allows(tmp_path: Path) -> None:
    cfg = config(iterations=3, noise_multiplier=50.0)  # rounds far below the budget leave room
    with pytest.raises(SimulatedKillError):
        make(tmp_path, cfg, noise=Boom()).run(PRIVATE)
    result = make(tmp_path, cfg).run(PRIVATE, resume=True)
    assert result.ledger.names() == ["unit_count", "unit_count#2", "round_000", "round_001", "round_002"]
    assert result.redrawn == ["unit_count#2"]


def test_budget_plan_refused_before_any_release(tmp_path: Path) -> None:
    from private_evolution import BudgetExceededError

    cfg = config(noise_multiplier=0.5, epsilon=1.0)
    with pytest.raises(BudgetExceededError):
        make(tmp_path, cfg).run(PRIVATE)
    assert not (tmp_path / "round_000" / "histogram.npz").exists()


def test_schedules_and_unit_level(tmp_path: Path) -> None:
    cfg = config(iterations=3, population_size=(10, 15), strength=(1.0, 0.5), num_samples=12)
    sizes: list[int] = []
    units = np.arange(len(PRIVATE)) // 3  # three rows per unit
    result = make(tmp_path, cfg).run(PRIVATE, units=units, callbacks=[lambda r: sizes.append(len(r.population))])
    assert sizes == [40, 40, 60]
    count = result.unit_count
    assert len(result.samples) == 12 and count is not None and count.noise_multiplier > 0
    assert abs(count.value - 100) < 6 * count.noise_multiplier  # 100 units, counted under DP
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["delta"] == 1e-6 and "num_units" not in meta


def test_lookahead_and_sample_selection(tmp_path: Path) -> None:
    cfg = config(iterations=2, lookahead=2, selection="sample", k=2, metric="cosine")
    result = make(tmp_path, cfg).run(PRIVATE)
    assert len(result.samples) == 20


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="iterations"):
        config(iterations=0)
    with pytest.raises(ValueError, match="raise the population"):
        config(num_samples=1000)
    with pytest.raises(ValueError, match="schedule"):
        config(population_size=(10,))


def test_selection_all_zero_and_rank_ties() -> None:
    rng = np.random.default_rng(0)
    picked = select(np.zeros(5), 1000, method="sample", rng=rng)
    assert set(np.unique(picked)) == set(range(5))
    np.testing.assert_array_equal(select(np.array([1.0, 3.0, 3.0, 0.0]), 2), [1, 2])
    counts = np.bincount(select(np.array([0.0, -2.0, 3.0, 1.0]), 4000, method="sample", rng=rng), minlength=4)
    assert counts[0] == counts[1] == 0 and counts[2] > 2 * counts[3] > 0


@pytest.mark.parametrize(("epsilon", "factor"), [(math.inf, 50.0), (4.0, 20.0)])
def test_toy_convergence(tmp_path: Path, epsilon: float, factor: float) -> None:
    """PE moves a uniform population onto a 3-component mixture: MMD² falls by ≥ ``factor``."""
    private = private_points(3000, seed=1)
    cfg = PEConfig(
        iterations=10,
        num_samples=300,
        epsilon=epsilon,
        population_size=150,
        variation_folds=4,
        initial_population=750,
        strength=tuple(np.geomspace(1.5, 0.3, 9)),
        seed=0,
    )
    initial = np.asarray(PointGenerator().random(300, seed=123))
    result = make(tmp_path, cfg).run(private)
    final = np.asarray(result.samples)
    reference = private[:600]
    before, after = mmd_rbf(initial, reference), mmd_rbf(final, reference)
    assert after * factor < before, (before, after)


def test_final_release_prefers_distinct_samples(tmp_path: Path) -> None:
    """Identical candidates (copy fallbacks, kept samples) are released once while distinct ones remain."""

    class CopyingGenerator(PointGenerator):
        def vary(self, samples, strength, *, seed=None):
            return [list(s) for s in samples]  # every variation falls back to a copy of its parent

    cfg = config(iterations=2, num_samples=6, population_size=6, variation_folds=2)
    result = make(tmp_path / "a", cfg, generator=CopyingGenerator()).run(PRIVATE)
    assert len({tuple(s) for s in result.samples}) == 6  # 18 candidates, 6 distinct: all six released once


def test_rank_distinct_skips_copies_until_it_must_use_them() -> None:
    from private_evolution.loop import _rank_distinct

    votes = np.array([5.0, 4.0, 3.0, 2.0])
    assert _rank_distinct(votes, ["a", "a", "b", "c"], 3).tolist() == [0, 2, 3]
    assert _rank_distinct(votes, ["a", "a", "a", "b"], 3).tolist() == [0, 3, 1]  # copies only to fill up
    assert select(votes, 3).tolist() == [0, 1, 2]  # plain rank selection would release "a" twice
