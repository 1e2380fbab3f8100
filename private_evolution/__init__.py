"""Private Evolution: DP synthetic data by evolving a public population under noisy votes.

A general library: it knows nothing of images, captions or models. Bring a :class:`Generator`
(random and variation APIs) and an :class:`Embedder`; :class:`PrivateEvolution` runs the loop,
:mod:`private_evolution.accounting` does the privacy maths.
"""

from private_evolution.accounting import (
    BudgetExceededError,
    PrivacyLedger,
    default_delta,
    epsilon,
    epsilon_pld,
    gdp_mu,
    noise_multiplier,
)
from private_evolution.histogram import (
    GaussianNoise,
    NoisyHistogram,
    clean_vote_histogram,
    dp_histogram,
    nearest_neighbors,
)
from private_evolution.loop import PEConfig, PEResult, PrivateEvolution, RoundResult, RunStateError
from private_evolution.population import Population, select
from private_evolution.protocols import Embedder, Generator

__all__ = [
    "BudgetExceededError",
    "Embedder",
    "GaussianNoise",
    "Generator",
    "NoisyHistogram",
    "PEConfig",
    "PEResult",
    "Population",
    "PrivacyLedger",
    "PrivateEvolution",
    "RoundResult",
    "RunStateError",
    "clean_vote_histogram",
    "default_delta",
    "dp_histogram",
    "epsilon",
    "epsilon_pld",
    "gdp_mu",
    "nearest_neighbors",
    "noise_multiplier",
    "select",
]
