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
from dataclasses import dataclass, replace

import numpy as np

from spti.prompts import PromptSet

_STOP = frozenset(
    {"a", "an", "the", "with", "in", "of", "and", "on", "at", "by", "for", "to", "its", "is", "are", "was"}
    | {"be", "been", "has", "have", "from", "into", "onto", "over", "under", "some", "very"}
)
# Nouns too generic to stand for an attribute on their own ("room" is not "a child's room").
_GENERIC_NOUNS = frozenset({"room", "photo", "image", "picture", "view", "shot", "scene", "space", "area", "thing"})
_CLAUSE = re.compile(r"[,.;:!?()\n]|\b(?:and|with|while|where|which|against|beside|behind|near|opposite|next to)\b")
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


def _words(text: str, synonyms: dict[str, str] | None = None) -> set[str]:
    """Stemmed words of a clause, hyphenated ones also by part ("king-size" → king-size, king, size),
    each synonym also as the word it stands for."""
    out: set[str] = set()
    for w in _WORD.findall(text.lower()):
        forms = [w] + ([part for part in w.split("-") if part] if "-" in w else [])
        for form in forms:
            out.add(_stem(form))
            if synonyms and form in synonyms:
                out.add(_stem(synonyms[form]))
    return out


def _clauses(text: str, synonyms: dict[str, str] | None = None) -> list[set[str]]:
    return [_words(part, synonyms) for part in _CLAUSE.split(text.lower()) if part.strip()]


# Words after which a value names a place, not its topic ("a bench at the foot of the bed").
_LOCATION = frozenset({"on", "above", "behind", "beside", "near", "under", "at", "in", "over", "next"})


def _head_noun(value: str) -> str | None:
    """The noun a value is about: its last content word before a location phrase ("with morning
    sunlight on the bed" → sunlight; "at night with warm lamp light" → light)."""
    tokens = _WORD.findall(value.lower())
    if tokens and (tokens[0] in _LOCATION or tokens[0] in _STOP):
        tokens = tokens[1:]
    for i, tok in enumerate(tokens):
        if tok in _LOCATION:
            tokens = tokens[:i]
            break
    content = [_stem(t) for t in tokens if t not in _STOP]
    return content[-1] if content else None


@dataclass(frozen=True)
class _Value:
    column: int
    words: frozenset[str]
    head: str  # the noun the value is about ("wall", "rug", "style"; see _head_noun)
    modifiers: frozenset[str]  # the other content words ("pale", "blue")


class AttributeMatcher:
    """Which public attribute values a caption mentions, clause by clause; one caption at a time.

    Captions paraphrase ("dusty blue walls", "a fluffy white comforter", "a rustic bedroom"), so a
    value counts as mentioned in a clause when, in order of preference:

    1. all its content words are there;
    2. one of its modifiers (describing words, never a noun some value is about) is there together
       with a noun of this key (a head noun that this key's values are about more often than any
       other key's, or the subject's noun): "white sheets" → "with crisp white linen", "a rustic
       bedroom" → "in a rustic farmhouse style";
    3. its own head noun is there and belongs to this key: "a thick carpet" → the carpets.

    Per key, the values with the largest share of their content words present win (ties share the
    key's weight of 1; the library scales each row to norm ≤ 1). "white bedding, grey walls" never matches "white
    walls": the colour and the noun are in different clauses.
    """

    def __init__(self, prompts: PromptSet) -> None:
        self.prompts = prompts
        self.pairs = prompts.all_attributes()
        self._column = {pair: j for j, pair in enumerate(self.pairs)}
        subject = core_words(prompts.subject)
        subject_noun = {subject[-1]} if subject else set()
        self._keys: dict[str, list[_Value]] = {}
        for j, (key, value) in enumerate(self.pairs):
            words = core_words(value)
            if not words:
                continue
            parts = _words(value) - _STOP
            head = _head_noun(value) or words[-1]
            v = _Value(j, frozenset(parts), head, frozenset(parts - {head}))
            self._keys.setdefault(key, []).append(v)
        # a noun belongs to the key whose values are most often about it ("bed" to the beds, not
        # to "with morning sunlight on the bed"); ties belong to no key
        head_counts: dict[str, dict[str, int]] = {}
        for key, values in self._keys.items():
            for v in values:
                head_counts.setdefault(v.head, {}).setdefault(key, 0)
                head_counts[v.head][key] += 1
        owner: dict[str, str] = {}
        for head, counts in head_counts.items():
            ranked = sorted(counts.values(), reverse=True)
            if len(ranked) == 1 or ranked[0] > ranked[1]:
                owner[head] = max(counts, key=counts.__getitem__)
        heads_by_key = {key: {h for h, k in owner.items() if k == key} for key in self._keys}
        all_heads = set(head_counts) | subject_noun | _GENERIC_NOUNS
        # a modifier is a describing word: never a noun that some value is about ("wall" in "a large
        # wall mirror" must not make every caption with walls mention a mirror)
        self._keys = {
            key: [replace(v, modifiers=v.modifiers - all_heads) for v in values] for key, values in self._keys.items()
        }
        self._nouns = {key: (heads | subject_noun) - _GENERIC_NOUNS for key, heads in heads_by_key.items()}
        self._owner = {h: k for h, k in owner.items() if h not in _GENERIC_NOUNS}

    def _score(self, v: _Value, key: str, clause: set[str]) -> float:
        share = len(v.words & clause) / len(v.words)
        if share == 1.0:
            return 2.0 + share
        if v.modifiers & clause and self._nouns[key] & clause:
            return 1.0 + share
        if v.head in clause and self._owner.get(v.head) == key:
            return 0.0  # the noun alone: every value about it ties
        return -1.0

    def mentions(self, text: str, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (key, value) of ``pairs``, whether ``text`` mentions it."""
        if not pairs:
            return []
        row = self.row(text)
        return [bool(row[self._column[pair]]) for pair in pairs]

    def row(self, caption: str) -> np.ndarray:
        """The row of ``caption`` over ``prompts.all_attributes()``: per mentioned key, 1 shared
        equally by its winning values."""
        out = np.zeros(len(self.pairs), dtype=np.float64)
        clauses = _clauses(caption or "", self.prompts.synonyms)
        if not clauses:
            return out
        for key, values in self._keys.items():
            scores = [max(self._score(v, key, c) for c in clauses) for v in values]
            best = max(scores)
            if best < 0:
                continue
            ties = [v.column for v, score in zip(values, scores, strict=True) if score == best]
            # a key weighs the same however many values tie, so the histogram's mass per key
            # tracks how many captions mention the key (what the random API's mention rates use)
            out[ties] = 1.0 / len(ties)
        return out


def attribute_affinities(captions: Sequence[str], prompts: PromptSet) -> np.ndarray:
    """(captions × attribute values) affinities over ``prompts.all_attributes()``; see
    :class:`AttributeMatcher`. Each row is a function of its caption alone."""
    matcher = AttributeMatcher(prompts)
    out = np.zeros((len(captions), len(matcher.pairs)), dtype=np.float64)
    for i, caption in enumerate(captions):
        out[i] = matcher.row(caption)
    return out


def value_probabilities(
    histogram: np.ndarray, prompts: PromptSet, *, uniform_mix: float = 0.2
) -> dict[str, np.ndarray]:
    """Per attribute key, draw probabilities of its values from a noisy seeding histogram.

    Post-processing of the DP release: negative noisy counts count as 0, and a ``uniform_mix``
    share stays uniform so that values the private data did not mention can still be proposed
    (and a key no caption mentions falls back to uniform).
    """
    out: dict[str, np.ndarray] = {}
    for key, h in _per_key(histogram, prompts).items():
        uniform = np.full(len(h), 1.0 / len(h))
        out[key] = uniform if h.sum() <= 0 else (1 - uniform_mix) * h / h.sum() + uniform_mix * uniform
    return out


def _per_key(histogram: np.ndarray, prompts: PromptSet) -> dict[str, np.ndarray]:
    """The noisy histogram cut into one slice per key (negative noisy counts as 0)."""
    pairs = prompts.all_attributes()
    hist = np.clip(np.asarray(histogram, dtype=np.float64), 0.0, None)
    if hist.shape != (len(pairs),):
        raise ValueError(f"seeding histogram has {hist.shape} values for {len(pairs)} attribute values")
    out: dict[str, np.ndarray] = {}
    start = 0
    for key, values in prompts.attributes.items():
        out[key] = hist[start : start + len(values)]
        start += len(values)
    return out


@dataclass(frozen=True)
class SeedingDraws:
    """How a conditioned random API draws its prompts: post-processing of one noisy histogram.

    ``values[key]`` are the draw probabilities of the key's values; ``mention[key]`` the probability
    that one prompt names the key at all — the key's share of the histogram's mass relative to the
    most mentioned key, so keys the private captions rarely talk about are rarely asked for, and the
    ones every caption mentions are in every prompt. (Each caption's row has norm 1, so a key named
    mostly by captions that name many keys reads somewhat low.)
    """

    values: dict[str, np.ndarray]
    mention: dict[str, float]


def seeding_draws(histogram: np.ndarray, prompts: PromptSet, *, uniform_mix: float = 0.2) -> SeedingDraws:
    """Value and key-mention probabilities for the random API from a noisy seeding histogram."""
    values = value_probabilities(histogram, prompts, uniform_mix=uniform_mix)
    mass = {key: float(h.sum()) for key, h in _per_key(histogram, prompts).items()}
    top = max(mass.values(), default=0.0)
    mention = {key: (m / top if top > 0 else 1.0) for key, m in mass.items()}
    return SeedingDraws(values=values, mention=mention)
