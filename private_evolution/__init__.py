"""Private Evolution: DP synthetic data by evolving a public population under noisy votes.

A general library: it knows nothing of images, captions or models. Bring a :class:`Generator`
(random and variation APIs) and an :class:`Embedder`; :class:`PrivateEvolution` runs the loop,
:mod:`private_evolution.accounting` does the privacy maths.
"""

from private_evolution.accounting import (
    BudgetExceededError,
    NoisePlan,
    PrivacyLedger,
    default_delta,
    epsilon,
    epsilon_pld,
    gdp_mu,
    noise_multiplier,
    plan_noise,
    public_delta,
)
from private_evolution.count import NoisyCount, dp_count
from private_evolution.histogram import (
    GaussianNoise,
    NoisyHistogram,
    clean_vote_histogram,
    dp_histogram,
    nearest_neighbors,
)
from private_evolution.loop import (
    PEConfig,
    PEResult,
    PrivacyPlanError,
    PrivateEvolution,
    RoundResult,
    RunStateError,
)
from private_evolution.population import Population, select
from private_evolution.protocols import ConditionalGenerator, Embedder, Generator

__all__ = [
    "BudgetExceededError",
    "ConditionalGenerator",
    "Embedder",
    "GaussianNoise",
    "Generator",
    "NoisePlan",
    "NoisyCount",
    "NoisyHistogram",
    "PEConfig",
    "PEResult",
    "Population",
    "PrivacyLedger",
    "PrivacyPlanError",
    "PrivateEvolution",
    "RoundResult",
    "RunStateError",
    "clean_vote_histogram",
    "default_delta",
    "dp_count",
    "dp_histogram",
    "epsilon",
    "epsilon_pld",
    "gdp_mu",
    "nearest_neighbors",
    "noise_multiplier",
    "plan_noise",
    "public_delta",
    "select",
]
