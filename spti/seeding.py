"""DP semantic seeding: which public attribute values the private captions mention.

PE can only select what its public generator proposes. If the private bedrooms are mostly blue
and the random API never writes "blue walls", no number of rounds finds them. Seeding (the
PrivImage idea, for text) lets the private side vote once over the prompt set's public attribute
values; the noisy histogram of that vote (a charged DP release, see ``private_evolution``'s
``seeding_share``) then weights the random API's draws of attribute values.

This module computes each private caption's affinity to every (key, value) of the prompt set — a
function of that caption alone, so the vote's sensitivity stays 1 after the library's per-row and
per-unit normalisation. Matching works clause by clause on words, so "white bedding, grey walls"
does not match "white walls".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from spti.prompts import PromptSet

_STOP = frozenset(
    {"a", "an", "the", "with", "in", "of", "and", "on", "at", "by", "for", "to", "its", "is", "are", "was"}
    | {"be", "been", "has", "have", "from", "into", "onto", "over", "under", "some", "very"}
)
_CLAUSE = re.compile(r"[,.;:!?()\n]|\band\b|\bwith\b|\bwhile\b|\bwhere\b|\bwhich\b")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def _stem(word: str) -> str:
    """A crude plural fold ("walls" ~ "wall", "curtains" ~ "curtain"): enough for attribute words."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def core_words(phrase: str) -> tuple[str, ...]:
    """The content words of an attribute value ("with pale blue walls" → pale, blue, wall)."""
    return tuple(_stem(w) for w in _WORD.findall(phrase.lower()) if w not in _STOP)


def _clauses(text: str) -> list[set[str]]:
    return [{_stem(w) for w in _WORD.findall(part)} for part in _CLAUSE.split(text.lower()) if part.strip()]


def attribute_affinities(captions: Sequence[str], prompts: PromptSet) -> np.ndarray:
    """(captions × attribute values) 0/1 matrix over ``prompts.all_attributes()``.

    Per key, a caption matches the values whose content words all occur in one of its clauses;
    failing that, those with at least two thirds of them and the last (the head noun) there. Ties
    all match (the library scales the row to norm ≤ 1).
    """
    pairs = prompts.all_attributes()
    words = [core_words(value) for _, value in pairs]
    by_key: dict[str, list[int]] = {}
    for j, (key, _) in enumerate(pairs):
        by_key.setdefault(key, []).append(j)
    out = np.zeros((len(captions), len(pairs)), dtype=np.float64)
    for i, caption in enumerate(captions):
        clauses = _clauses(caption or "")
        for columns in by_key.values():
            full, partial = [], []
            for j in columns:
                need = words[j]
                if not need:
                    continue
                best = (
                    max((sum(w in c for w in need) / len(need), need[-1] in c) for c in clauses) if clauses else (0, 0)
                )
                if best[0] == 1.0:
                    full.append(j)
                elif best[1] and best[0] >= 2 / 3 and len(need) >= 3:
                    partial.append(j)
            for j in full or partial:
                out[i, j] = 1.0
    return out


def value_probabilities(
    histogram: np.ndarray, prompts: PromptSet, *, uniform_mix: float = 0.2
) -> dict[str, np.ndarray]:
    """Per attribute key, draw probabilities of its values from a noisy seeding histogram.

    Post-processing of the DP release: negative noisy counts count as 0, and a ``uniform_mix``
    share stays uniform so that values the private data did not mention can still be proposed
    (and a key no caption mentions falls back to uniform).
    """
    pairs = prompts.all_attributes()
    hist = np.clip(np.asarray(histogram, dtype=np.float64), 0.0, None)
    if hist.shape != (len(pairs),):
        raise ValueError(f"seeding histogram has {hist.shape} values for {len(pairs)} attribute values")
    out: dict[str, np.ndarray] = {}
    start = 0
    for key, values in prompts.attributes.items():
        h = hist[start : start + len(values)]
        start += len(values)
        uniform = np.full(len(values), 1.0 / len(values))
        out[key] = uniform if h.sum() <= 0 else (1 - uniform_mix) * h / h.sum() + uniform_mix * uniform
    return out
