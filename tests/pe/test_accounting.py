"""Accounting: golden values, agreement with dp-accounting's PLD accountant, the ledger."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from private_evolution import accounting
from private_evolution.accounting import BudgetExceededError, PrivacyLedger


def pld_epsilon(sigmas: list[float], delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for s in sigmas:
        acc.compose(dp_accounting.GaussianDpEvent(s))
    return acc.get_epsilon(delta)


def test_golden_epsilon() -> None:
    assert accounting.epsilon(noise_multiplier=10, delta=1e-5, rounds=10) == pytest.approx(1.19937, abs=5e-6)


def test_golden_noise_multiplier() -> None:
    assert accounting.noise_multiplier(epsilon=1, delta=1e-5, rounds=10) == pytest.approx(11.7973, abs=5e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0, 40.0])
@pytest.mark.parametrize("rounds", [1, 3, 10])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_matches_pld_accountant(sigma: float, rounds: int, delta: float) -> None:
    ours = accounting.epsilon(noise_multiplier=sigma, delta=delta, rounds=rounds)
    assert ours == pytest.approx(pld_epsilon([sigma] * rounds, delta), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 4.0, 16.0, 100.0, 1000.0])
@pytest.mark.parametrize("rounds", [1, 10, 50])
def test_inverse_round_trip_and_never_overspends(eps: float, rounds: int) -> None:
    sigma = accounting.noise_multiplier(epsilon=eps, delta=1e-5, rounds=rounds)
    assert 0 < sigma < math.inf
    back = accounting.epsilon(noise_multiplier=sigma, delta=1e-5, rounds=rounds)
    assert back <= eps
    assert back == pytest.approx(eps, rel=1e-8)


@pytest.mark.parametrize("sigma", [100.0, 1000.0, 10_000.0])
def test_large_sigma_stays_finite(sigma: float) -> None:
    eps = accounting.epsilon(noise_multiplier=sigma, delta=1e-5, rounds=10)
    assert 0 < eps < 0.1 and math.isfinite(eps)
    assert accounting.noise_multiplier(epsilon=eps, delta=1e-5, rounds=10) == pytest.approx(sigma, rel=1e-6)


def test_infinite_epsilon_means_no_noise() -> None:
    assert accounting.noise_multiplier(epsilon=math.inf, delta=1e-5, rounds=10) == 0.0
    assert accounting.epsilon(noise_multiplier=0.0, delta=1e-5, rounds=10) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0, "delta": 1e-5, "rounds": 10}, "epsilon must be > 0"),
        ({"epsilon": -1.0, "delta": 1e-5, "rounds": 10}, "epsilon must be > 0"),
        ({"epsilon": 1.0, "delta": 0.0, "rounds": 10}, "delta must be in"),
        ({"epsilon": 1.0, "delta": 1.0, "rounds": 10}, "delta must be in"),
        ({"epsilon": 1.0, "delta": 1e-5, "rounds": 0}, "rounds must be"),
        ({"epsilon": 1.0, "delta": 1e-5, "rounds": 2.5}, "rounds must be"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        accounting.noise_multiplier(**kwargs)


def test_heterogeneous_rounds_exact_gdp_matches_pld() -> None:
    sigmas = [5.0, 8.0, 12.0, 20.0]
    ledger = PrivacyLedger(epsilon=10, delta=1e-5)
    for i, s in enumerate(sigmas):
        ledger.charge(f"r{i}", noise_multiplier=s)
    assert ledger.spent_epsilon() == pytest.approx(pld_epsilon(sigmas, 1e-5), abs=1e-6)
    assert accounting.epsilon_pld(sigmas, delta=1e-5) == pytest.approx(ledger.spent_epsilon(), abs=1e-6)


def test_pld_extra_release_costs_privacy() -> None:
    base = accounting.epsilon_pld([10.0] * 5, delta=1e-5)
    with_extra = accounting.epsilon_pld([10.0] * 5, delta=1e-5, extra_events=[dp_accounting.LaplaceDpEvent(2.0)])
    assert with_extra > base


def test_default_delta_and_refusal() -> None:
    assert accounting.default_delta(1000) == pytest.approx(1 / (1000 * math.log(1000)))
    with pytest.raises(ValueError, match="1/N"):
        accounting.check_delta_for_units(0.01, 100)
    accounting.check_delta_for_units(0.001, 100)


def test_ledger_refuses_overspending_and_duplicates(tmp_path) -> None:
    sigma = accounting.noise_multiplier(epsilon=1.0, delta=1e-5, rounds=3)
    ledger = PrivacyLedger(epsilon=1.0, delta=1e-5, path=tmp_path / "ledger.json")
    for t in range(3):
        ledger.charge(f"round_{t}", noise_multiplier=sigma)
    assert ledger.spent_epsilon() <= 1.0
    with pytest.raises(BudgetExceededError):
        ledger.charge("round_3", noise_multiplier=sigma)
    with pytest.raises(ValueError, match="spent twice"):
        ledger.charge("round_0", noise_multiplier=1e9)
    assert len(ledger) == 3
    reloaded = PrivacyLedger.load(tmp_path / "ledger.json")
    assert reloaded.names() == ["round_0", "round_1", "round_2"]
    assert reloaded.spent_epsilon() == pytest.approx(ledger.spent_epsilon())
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert data["num_releases"] == 3 and "dp-accounting" in data["library_versions"]


def test_ledger_check_plan() -> None:
    ledger = PrivacyLedger(epsilon=1.0, delta=1e-5)
    sigma = accounting.noise_multiplier(epsilon=1.0, delta=1e-5, rounds=10)
    assert ledger.check_plan([sigma] * 10) <= 1.0
    with pytest.raises(BudgetExceededError):
        ledger.check_plan([sigma] * 11)


def test_infinite_budget_ledger_round_trips(tmp_path) -> None:
    ledger = PrivacyLedger(epsilon=math.inf, delta=1e-5, path=tmp_path / "l.json")
    ledger.charge("r0", noise_multiplier=0.0)
    assert ledger.spent_epsilon() == math.inf
    assert PrivacyLedger.load(tmp_path / "l.json").epsilon_budget == math.inf
