"""The DP count of privacy units: how many units voted, released under the Gaussian mechanism.

Under add/remove-one-unit neighbours the number of units N is itself private: publishing it (or δ
or σ computed from it) is not DP for any δ < 1. PE still needs an idea of N — to check that δ is
small next to 1/N, to size the population, to warn when votes drown in noise — so it releases N
once with Gaussian noise (sensitivity 1), charged to the ledger and composed with the rounds.
Everything computed from the noisy count is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from private_evolution.histogram import NoiseSource, _standard_normal

__all__ = ["COUNT_CONFIDENCE_Z", "NoisyCount", "dp_count"]

# One-sided z of the confidence bounds (99.9%): N lies below lower_bound() or above upper_bound()
# with probability at most 1e-3 each.
COUNT_CONFIDENCE_Z = 3.090232306167813


@dataclass(frozen=True)
class NoisyCount:
    """A DP release of the number of privacy units: N + N(0, σ²), rounded to an integer."""

    value: float
    noise_multiplier: float

    def lower_bound(self, *, z: float = COUNT_CONFIDENCE_Z) -> float:
        """A conservative lower confidence bound of N (never below 0)."""
        return max(0.0, self.value - z * self.noise_multiplier)

    def upper_bound(self, *, z: float = COUNT_CONFIDENCE_Z) -> float:
        """A conservative upper confidence bound of N (at least 1)."""
        return max(1.0, self.value + z * self.noise_multiplier)

    def conventional_delta(self) -> float | None:
        """1/(L·ln L) at the lower bound L — the usual δ for about L units — or None for L < 3."""
        low = self.lower_bound()
        return 1.0 / (low * math.log(low)) if low >= 3 else None

    def check_delta(self, delta: float) -> None:
        """Refuse δ ≥ 1/N (a δ that large permits publishing a unit in the clear), judged by the
        upper confidence bound of N so that a too-large δ is caught with probability ≥ 99.9%."""
        upper = self.upper_bound()
        if delta >= 1.0 / upper:
            raise ValueError(
                f"delta={delta:g} is not small next to 1/N: the DP count of privacy units is {self.value:.0f} "
                f"(at most about {upper:.0f}), and delta must stay below 1/N; pass a smaller delta "
                f"(e.g. {1.0 / (upper * math.log(max(upper, 3.0))):.1g})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoisyCount:
        return cls(value=float(d["value"]), noise_multiplier=float(d["noise_multiplier"]))


def dp_count(num_units: int, *, noise_multiplier: float, _noise: NoiseSource | None = None) -> NoisyCount:
    """Release ``num_units`` with Gaussian noise N(0, σ²) (sensitivity 1), rounded to an integer.

    Charge it to the ledger before calling. σ = 0 (ε = ∞) releases the exact count.
    ``_noise`` replaces the OS-entropy generator for tests only.
    """
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
        raise ValueError(f"num_units must be an integer >= 0, got {num_units!r}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    noisy = float(num_units)
    if noise_multiplier > 0:
        noisy += noise_multiplier * float(_standard_normal(1, _noise)[0])
    # Rounding is post-processing; it also keeps the low bits of a float draw out of the release.
    return NoisyCount(value=float(round(noisy)), noise_multiplier=float(noise_multiplier))
