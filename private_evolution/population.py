"""Populations and the selection / variation steps of PE. All of it is post-processing of DP votes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from private_evolution.protocols import Generator

S = TypeVar("S")
Selection = Literal["rank", "sample"]

__all__ = ["Population", "Selection", "derive_seed", "next_generation", "select"]


@dataclass
class Population(Generic[S]):
    """Candidates of one round: samples with stable ids and the id of the sample each came from."""

    samples: list[S]
    ids: list[str]
    parents: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parents:
            self.parents = [None] * len(self.samples)
        if not (len(self.samples) == len(self.ids) == len(self.parents)):
            raise ValueError("samples, ids and parents must have the same length")

    def __len__(self) -> int:
        return len(self.samples)

    def take(self, indices: Sequence[int] | np.ndarray) -> Population[S]:
        idx = [int(i) for i in indices]
        return Population([self.samples[i] for i in idx], [self.ids[i] for i in idx], [self.parents[i] for i in idx])

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {"id": i, "parent": p, "sample": s} for i, p, s in zip(self.ids, self.parents, self.samples, strict=True)
        ]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Population[Any]:
        return cls([r["sample"] for r in rows], [r["id"] for r in rows], [r["parent"] for r in rows])


def derive_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed for public randomness, derived from the user's seed and a purpose path."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for part in path:
        if isinstance(part, str):
            words.extend(part.encode("utf-8"))
        else:
            words.append(int(part) & 0xFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def select(
    votes: np.ndarray, n: int, *, method: Selection = "rank", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices of ``n`` candidates chosen from noisy ``votes``.

    ``rank``: the n highest (ties broken by lower index; needs n ≤ len(votes)).
    ``sample``: n draws with replacement ∝ max(votes, 0); an all-zero histogram falls back to
    uniform draws, so there is never a NaN probability.
    """
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 1 or votes.size == 0:
        raise ValueError("votes must be a non-empty 1-D array")
    if not np.isfinite(votes).all():
        raise ValueError("votes contain NaN or infinite values")
    if n < 0:
        raise ValueError(f"cannot select {n} samples")
    if method == "rank":
        if n > votes.size:
            raise ValueError(f"rank selection of {n} from {votes.size} candidates: raise the population size")
        return np.argsort(-votes, kind="stable")[:n].astype(np.int64)
    if method == "sample":
        if rng is None:
            raise ValueError("sample selection needs a random generator (public randomness)")
        weights = np.clip(votes, 0.0, None)
        total = weights.sum()
        probs = np.full(votes.size, 1.0 / votes.size) if total <= 0 else weights / total
        return rng.choice(votes.size, size=n, replace=True, p=probs).astype(np.int64)
    raise ValueError(f"selection must be 'rank' or 'sample', got {method!r}")


def next_generation(
    selected: Population[S],
    generator: Generator[S],
    *,
    variation_folds: int,
    strength: float,
    keep_selected: bool,
    round_index: int,
    seed: int,
) -> Population[S]:
    """The next population: the selected samples (if kept) then ``variation_folds`` variations of each.

    Variations of fold f are generated in one batched ``vary`` call with their own derived seed.
    """
    if variation_folds < 0:
        raise ValueError("variation_folds must be >= 0")
    samples: list[S] = list(selected.samples) if keep_selected else []
    ids: list[str] = [f"r{round_index + 1}-k{j}" for j in range(len(selected))] if keep_selected else []
    parents: list[str | None] = list(selected.ids) if keep_selected else []
    for fold in range(variation_folds):
        varied = generator.vary(selected.samples, strength, seed=derive_seed(seed, round_index, "vary", fold))
        if len(varied) != len(selected):
            raise RuntimeError(f"generator.vary returned {len(varied)} samples for {len(selected)} inputs")
        samples.extend(varied)
        ids.extend(f"r{round_index + 1}-v{fold}-{j}" for j in range(len(selected)))
        parents.extend(selected.ids)
    return Population(samples, ids, parents)
