"""Privacy accounting for Private Evolution: ε ↔ σ, composition, and the release ledger.

Every noisy histogram PE releases is a Gaussian mechanism with L2 sensitivity 1 (the voting code
guarantees it) and noise N(0, σ²) per bin. Composing Gaussian mechanisms is exact in Gaussian DP:
releases with noise multipliers σ_1..σ_T together are μ-GDP with μ = sqrt(Σ 1/σ_t²), and the
(ε, δ) curve of μ-GDP is that of one Gaussian mechanism with σ = 1/μ. We convert with
``dp_accounting``'s analytical Gaussian functions (log-space, so σ up to 1e4 and ε up to 1e3 stay
finite); releases that are not Gaussian are composed with ``dp_accounting``'s PLD accountant.
No root finding is written here.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from private_evolution.files import atomic_write_text

__all__ = [
    "DEFAULT_COUNT_SHARE",
    "DEFAULT_DELTA",
    "BudgetExceededError",
    "NoisePlan",
    "PrivacyLedger",
    "Release",
    "default_delta",
    "epsilon",
    "epsilon_at",
    "epsilon_pld",
    "gdp_mu",
    "noise_multiplier",
    "plan_noise",
    "public_delta",
]

# Tolerance when comparing a spent ε against its budget. σ is solved to ~1e-12, so a plan that
# spends exactly its budget can land a hair above it in floating point.
_EPSILON_SLACK = 1e-9
# The PLD accountant's discretisation; 1e-4 agrees with the exact Gaussian curve to ~1e-7 in ε.
PLD_DISCRETIZATION = 1e-4


class BudgetExceededError(RuntimeError):
    """A release would spend more privacy than the ledger's budget allows."""


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}; a typical choice is 1/(N·ln N).")


def _check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, int | float) or math.isnan(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (use math.inf for no privacy), got {epsilon!r}.")


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}.")


def _check_sigma(sigma: float) -> None:
    if not isinstance(sigma, int | float) or math.isnan(sigma) or sigma < 0:
        raise ValueError(f"noise_multiplier must be >= 0 (0 means no noise), got {sigma!r}.")


def noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """Noise multiplier σ such that ``rounds`` Gaussian releases at σ are (ε, δ)-DP.

    Exact: T releases at σ are one Gaussian mechanism at σ/√T, so σ = √T · σ₁(ε, δ).
    ``epsilon=math.inf`` returns 0.0 (no noise). The returned σ never spends more than ε.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_rounds(rounds)
    if math.isinf(epsilon):
        return 0.0
    sigma = math.sqrt(rounds) * float(dp_accounting.get_sigma_gaussian(epsilon, delta))
    # brentq's answer may sit on either side of the root: nudge up until ε(σ) ≤ target.
    while _composed_epsilon(sigma, delta, rounds) > epsilon:
        sigma = math.nextafter(sigma, math.inf) * (1 + 1e-12)
    return sigma


def epsilon(*, noise_multiplier: float, delta: float, rounds: int) -> float:
    """ε spent by ``rounds`` Gaussian releases with noise multiplier σ at the given δ.

    ``noise_multiplier=0`` (no noise) returns ``math.inf``.
    """
    _check_sigma(noise_multiplier)
    _check_delta(delta)
    _check_rounds(rounds)
    return _composed_epsilon(noise_multiplier, delta, rounds)


def _composed_epsilon(sigma: float, delta: float, rounds: int) -> float:
    if sigma == 0:
        return math.inf
    return float(dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(rounds), delta))


def gdp_mu(noise_multipliers: float | Sequence[float], rounds: int = 1) -> float:
    """μ of the Gaussian-DP guarantee of Gaussian releases (exact composition).

    Either one σ repeated ``rounds`` times or a sequence of per-release σ's.
    """
    sigmas = (
        [float(noise_multipliers)] * rounds if isinstance(noise_multipliers, int | float) else list(noise_multipliers)
    )
    for s in sigmas:
        _check_sigma(s)
    if any(s == 0 for s in sigmas):
        return math.inf
    return math.sqrt(sum(1.0 / (s * s) for s in sigmas))


@functools.lru_cache(maxsize=4096)
def _epsilon_from_mu(mu: float, delta: float) -> float:
    # Cached: a run asks for the same spent ε several times a round, and each answer is a root search.
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def epsilon_pld(
    noise_multipliers: Sequence[float],
    *,
    delta: float,
    extra_events: Sequence[dp_accounting.DpEvent] = (),
    value_discretization_interval: float = PLD_DISCRETIZATION,
) -> float:
    """ε of Gaussian releases with possibly different σ, composed with any extra DP events.

    Uses ``dp_accounting``'s privacy-loss-distribution accountant (add/remove neighbours), which
    also takes releases that are not Gaussian (e.g. a Laplace count) through ``extra_events``.
    """
    _check_delta(delta)
    for s in noise_multipliers:
        _check_sigma(s)
    if any(s == 0 for s in noise_multipliers):
        return math.inf
    if not noise_multipliers and not extra_events:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=value_discretization_interval)
    for s in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(s))
    for event in extra_events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def default_delta(num_units: int) -> float:
    """The default δ = 1/(N·ln N) for N privacy units that vote (always < 1/N for N ≥ 3)."""
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 3:
        raise ValueError(
            f"the default delta 1/(N·ln N) needs N >= 3 privacy units, got {num_units!r}; "
            "add more private data or pass delta explicitly."
        )
    return 1.0 / (num_units * math.log(num_units))


def check_delta_for_units(delta: float, num_units: int) -> None:
    """Refuse δ ≥ 1/N: at that δ a mechanism may publish one unit's data outright."""
    _check_delta(delta)
    if num_units >= 1 and delta >= 1.0 / num_units:
        raise ValueError(
            f"delta={delta:g} is >= 1/N = {1.0 / num_units:g} for N={num_units} privacy units, which "
            f"permits releasing a record in the clear; use delta <= {default_delta(max(num_units, 3)):.3g} "
            "(1/(N·ln N)) or add private data."
        )


# δ when the user gives neither δ nor a public bound on the number of units. δ must be public: a
# δ computed from the exact N (such as 1/(N·ln N)) would publish N. 1e-6 is below 1/N for any
# folder of fewer than a million units, and the DP count checks that it is.
DEFAULT_DELTA = 1e-6
# Share of the privacy budget (of μ² in Gaussian DP, where composition adds) spent on the DP count
# of units. 2% of μ² raises the rounds' noise by about 1%.
DEFAULT_COUNT_SHARE = 0.02


def public_delta(*, delta: float | None = None, units_bound: int | None = None) -> float:
    """The run's δ from public inputs only: the user's δ, else 1/(B·ln B) for a public upper bound
    B on the number of units, else :data:`DEFAULT_DELTA`. Never from the private data."""
    if delta is not None:
        _check_delta(delta)
        return float(delta)
    if units_bound is not None:
        return default_delta(units_bound)
    return DEFAULT_DELTA


@dataclass(frozen=True)
class NoisePlan:
    """The noise of a PE run, from public inputs only: T rounds at σ, and optionally one DP count
    of units and one seeding release (a DP histogram over public keys before round 0).

    Together they are μ-GDP with ``gdp_mu`` = sqrt(T/σ² + 1/σ_count² + 1/σ_seeding²), which is
    (ε, δ)-DP at the plan's δ and, like every μ-GDP mechanism, at every other point of its curve.
    """

    epsilon: float
    delta: float
    rounds: int
    round_noise_multiplier: float
    count_noise_multiplier: float | None
    gdp_mu: float
    seeding_noise_multiplier: float | None = None


def plan_noise(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    count_share: float = DEFAULT_COUNT_SHARE,
    seeding_share: float = 0.0,
) -> NoisePlan:
    """σ of the rounds, the DP unit count and the seeding release so that together they spend
    exactly ε at δ. ``count_share`` and ``seeding_share`` are shares of μ² (0: no such release).
    ε = ∞ gives σ = 0 everywhere.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_rounds(rounds)
    for name, share in (("count_share", count_share), ("seeding_share", seeding_share)):
        if not (isinstance(share, int | float) and 0.0 <= share < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {share!r}")
    if count_share + seeding_share >= 1.0:
        raise ValueError("count_share + seeding_share must leave a share of the budget for the rounds")
    if math.isinf(epsilon):
        return NoisePlan(
            epsilon,
            delta,
            rounds,
            0.0,
            0.0 if count_share > 0 else None,
            math.inf,
            0.0 if seeding_share > 0 else None,
        )
    mu = 1.0 / float(dp_accounting.get_sigma_gaussian(epsilon, delta))
    round_share = 1.0 - count_share - seeding_share
    sigma_rounds = math.sqrt(rounds) / (mu * math.sqrt(round_share))
    sigma_count = 1.0 / (mu * math.sqrt(count_share)) if count_share > 0 else None
    sigma_seeding = 1.0 / (mu * math.sqrt(seeding_share)) if seeding_share > 0 else None

    def total_mu(scale: float) -> float:
        extra = [s * scale for s in (sigma_count, sigma_seeding) if s]
        return gdp_mu([sigma_rounds * scale] * rounds + extra)

    # brentq's σ may sit on either side of the root: scale all up until ε(plan) ≤ target.
    scale = 1.0
    while _epsilon_from_mu(total_mu(scale), delta) > epsilon:
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    return NoisePlan(
        epsilon=epsilon,
        delta=delta,
        rounds=rounds,
        round_noise_multiplier=sigma_rounds * scale,
        count_noise_multiplier=sigma_count * scale if sigma_count else None,
        gdp_mu=total_mu(scale),
        seeding_noise_multiplier=sigma_seeding * scale if sigma_seeding else None,
    )


def epsilon_at(*, gdp_mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at δ (a point of its privacy curve)."""
    _check_delta(delta)
    return _epsilon_from_mu(gdp_mu, delta)


@dataclass(frozen=True)
class Release:
    """One noisy release as the ledger records it."""

    name: str
    noise_multiplier: float
    sensitivity: float = 1.0
    mechanism: str = "gaussian"
    timestamp: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_sigma(self) -> float:
        """σ of the equivalent sensitivity-1 Gaussian mechanism."""
        return self.noise_multiplier / self.sensitivity if self.sensitivity > 0 else math.inf


class PrivacyLedger:
    """Records every noisy release, refuses one that would exceed the budget, persists as JSON.

    The ledger is charged *before* noise is drawn (``charge``): a crash after charging and before
    the release is written wastes budget but never spends it twice. With ``path`` set, every change
    is written atomically (temp file + rename) before ``charge`` returns.
    """

    FORMAT = "spti.privacy_ledger/1"

    def __init__(self, *, epsilon: float, delta: float, path: str | os.PathLike[str] | None = None) -> None:
        _check_epsilon(epsilon)
        _check_delta(delta)
        self.epsilon_budget = float(epsilon)
        self.delta = float(delta)
        self.path = Path(path) if path is not None else None
        self._releases: list[Release] = []

    # -- queries ---------------------------------------------------------------------------
    @property
    def releases(self) -> tuple[Release, ...]:
        return tuple(self._releases)

    def names(self) -> list[str]:
        return [r.name for r in self._releases]

    def __len__(self) -> int:
        return len(self._releases)

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self._releases)

    def spent_epsilon(self, extra: Sequence[float] = ()) -> float:
        """ε spent so far (plus, optionally, hypothetical extra Gaussian releases at σ's ``extra``)."""
        sigmas = [r.effective_sigma for r in self._releases] + list(extra)
        if not sigmas:
            return 0.0
        if any(r.mechanism != "gaussian" for r in self._releases):
            raise NotImplementedError("only Gaussian releases are recorded by this ledger")
        return _epsilon_from_mu(gdp_mu(sigmas), self.delta)

    def mu(self) -> float:
        if not self._releases:
            return 0.0
        return gdp_mu([r.effective_sigma for r in self._releases])

    def can_release(self, noise_multiplier: float, sensitivity: float = 1.0, count: int = 1) -> bool:
        _check_sigma(noise_multiplier)
        if math.isinf(self.epsilon_budget):
            return True
        sigma = noise_multiplier / sensitivity
        return self.spent_epsilon(extra=[sigma] * count) <= self.epsilon_budget * (1 + _EPSILON_SLACK)

    def check_plan(self, noise_multipliers: Sequence[float]) -> float:
        """ε of the recorded releases plus a planned sequence; raise if over budget. Returns it."""
        total = self.spent_epsilon(extra=list(noise_multipliers))
        if not math.isinf(self.epsilon_budget) and total > self.epsilon_budget * (1 + _EPSILON_SLACK):
            raise BudgetExceededError(
                f"planned releases would spend epsilon={total:.6g} > budget {self.epsilon_budget:.6g} "
                f"(delta={self.delta:g}, {len(self._releases)} already recorded); raise the noise or "
                "lower the number of rounds."
            )
        return total

    # -- updates ---------------------------------------------------------------------------
    def charge(
        self,
        name: str,
        *,
        noise_multiplier: float,
        sensitivity: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> Release:
        """Record a Gaussian release named ``name`` (unique); raise if it would exceed the budget."""
        _check_sigma(noise_multiplier)
        if not (sensitivity > 0):
            raise ValueError(f"sensitivity must be > 0, got {sensitivity!r}")
        if name in self:
            raise ValueError(f"release {name!r} is already in the ledger: it must not be spent twice")
        if not self.can_release(noise_multiplier, sensitivity):
            spent = self.spent_epsilon(extra=[noise_multiplier / sensitivity])
            raise BudgetExceededError(
                f"release {name!r} at noise_multiplier={noise_multiplier:g} would bring epsilon to "
                f"{spent:.6g} > budget {self.epsilon_budget:.6g} (delta={self.delta:g})"
            )
        release = Release(
            name=name,
            noise_multiplier=float(noise_multiplier),
            sensitivity=float(sensitivity),
            meta=dict(meta or {}),
        )
        self._releases.append(release)
        if self.path is not None:
            self.save()
        return release

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        spent = self.spent_epsilon()
        return {
            "format": self.FORMAT,
            "budget": {"epsilon": _json_float(self.epsilon_budget), "delta": self.delta},
            "spent": {"epsilon": _json_float(spent), "delta": self.delta, "gdp_mu": _json_float(self.mu())},
            "num_releases": len(self._releases),
            "releases": [asdict(r) | {"noise_multiplier": _json_float(r.noise_multiplier)} for r in self._releases],
            "library_versions": library_versions(),
        }

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path given for the ledger")
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read privacy ledger {path}: {exc}") from exc
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a privacy ledger of format {cls.FORMAT}")
        ledger = cls(epsilon=_from_json_float(data["budget"]["epsilon"]), delta=data["budget"]["delta"], path=path)
        for r in data["releases"]:
            r = dict(r)
            r["noise_multiplier"] = _from_json_float(r["noise_multiplier"])
            ledger._releases.append(Release(**r))
        return ledger


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _from_json_float(x: float | str) -> float:
    return math.inf if x == "inf" else float(x)


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out: list[tuple[str, str]] = []
    for name in ("spti", "dp-accounting", "numpy"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "unknown"))
    return tuple(out)


def library_versions() -> dict[str, str]:
    """Versions of the packages the ledger's numbers depend on (read once per process)."""
    return dict(_library_versions())
