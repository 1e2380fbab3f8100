"""The interfaces the PE loop calls. Nothing here knows about images, captions or models.

A sample can be anything JSON-serialisable (a string, a list of numbers, a dict): checkpoints
store populations as JSON lines, never with pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

S = TypeVar("S")


@runtime_checkable
class Embedder(Protocol[S]):
    """Maps samples to vectors in the space where private data vote (shape: len(samples) × d)."""

    def embed(self, samples: Sequence[S]) -> np.ndarray: ...


@runtime_checkable
class Generator(Protocol[S]):
    """The public generative model behind PE's two APIs.

    ``seed`` carries the loop's *public* randomness (derived from the user's seed, the round and
    the purpose), so that a resumed run re-creates the variations it had made. Implementations
    that cannot be seeded may ignore it; resume then stays correct but not bit-identical.
    """

    def random(self, n: int, *, seed: int | None = None) -> list[S]:
        """``n`` fresh samples from the public prior (the random API)."""
        ...

    def vary(self, samples: Sequence[S], strength: float, *, seed: int | None = None) -> list[S]:
        """One variation of each sample (the variation API); larger ``strength`` moves further."""
        ...


@runtime_checkable
class ConditionalGenerator(Protocol):
    """A generator whose random API can take a DP prior over public keys (seeding).

    ``condition`` receives the noisy (thresholded) histogram of the seeding release, one value per
    public key, before the first population is drawn. It is post-processing of a DP release.
    """

    def condition(self, histogram: np.ndarray) -> None: ...
