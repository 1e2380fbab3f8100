"""Private Evolution over text: the LLM random / variation APIs.

``LLMDescriptionGenerator`` is a ``private_evolution`` Generator over descriptions (strings):
- random API: the LLM writes a short description from the domain prompt, public attribute values and
  one tone (SPTI §3);
- variation API: fill-in-the-blanks — each word is masked with probability ``strength`` (0.5 in the
  paper) and the LLM fills the blanks to a target word count (length + N(0, σ_w) jitter, at least
  ``min_words``; the answer's token limit follows the target), with few-shot examples in chat format;
  a fraction may be rephrased in one of the prompt set's tones instead.
Answers are cleaned of preambles, labels, quotes and markdown; junk (blanks left, too short, echoed
instructions, refusals, non-text) is regenerated once with a derived seed and otherwise replaced by its
public fallback, and every call's counts are kept (optionally on disk, so they add up over resumes).
Both APIs are public computations: they only ever see public prompts and DP-selected descriptions.

Cleaning and junk detection live in :mod:`spti.llm_answers`, the voting spaces in
:mod:`spti.vote_spaces`; both are re-exported here for older imports.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from private_evolution.files import open_private_append, recover_jsonl
from private_evolution.population import derive_seed
from spti.backends.base import ChatMessage, TextGenerator
from spti.llm_answers import clean_description, instruction_ngrams, junk_reason, mask_words
from spti.prompts import PromptSet

# Re-exported: the voting spaces lived here before this module was split along its seams.
from spti.vote_spaces import (
    FEATURE_RESIZE,
    VOTE_RENDER_SPEC,
    FeatureCache,
    RenderedVoteSpace,
    TextVoteSpace,
    VoteRenderSpec,
    feature_input,
    native_size,
    normalize_rows,
    render_seed,
)

if TYPE_CHECKING:
    from spti.seeding import AttributeMatcher

__all__ = [
    "FEATURE_RESIZE",
    "VOTE_RENDER_SPEC",
    "FeatureCache",
    "GenerationStats",
    "LLMDescriptionGenerator",
    "RenderedVoteSpace",
    "TextVoteSpace",
    "VariationSettings",
    "VoteRenderSpec",
    "clean_description",
    "feature_input",
    "instruction_ngrams",
    "is_attribute_template",
    "junk_reason",
    "mask_words",
    "native_size",
    "normalize_rows",
    "render_seed",
]


@dataclass(frozen=True)
class VariationSettings:
    """Knobs of the LLM APIs. Defaults are the SPTI authors' (σ_w = 36, at least 25 words, mask p = 0.5).

    There is no hard word cap: the target is ``len(text) + int(N(0, word_count_std))``, at least
    ``min_words`` (and at most ``max_words`` when one is given), and each answer may use
    ``ceil(target · tokens_per_word) + token_slack`` new tokens (at most ``max_new_tokens_limit``).
    ``min_answer_words`` is the junk bar: a shorter answer did not follow the instruction (``None``: half
    of ``min_words``, since small models often land somewhat under a target and the authors keep those).
    """

    word_count_std: float = 36.0
    min_words: int = 25
    max_words: int | None = None
    rephrase_fraction: float = 0.0
    temperature: float = 1.0
    top_p: float = 0.95
    tokens_per_word: float = 2.0
    token_slack: int = 16
    max_new_tokens_limit: int | None = None
    random_max_new_tokens: int = 100
    min_answer_words: int | None = None
    regenerate_junk: bool = True
    # A random answer that names fewer than this share of the attribute values its prompt asked for
    # did not follow it (small LLMs often drift to their own favourites): junk, regenerated once, then
    # the attribute template. 0 turns the check off.
    min_attribute_share: float = 0.5
    # With a DP seeding histogram, the share of each key's draws that stays uniform over its values,
    # so values the private data did not mention can still be proposed.
    seeding_uniform_mix: float = 0.05

    def __post_init__(self) -> None:
        if self.word_count_std < 0:
            raise ValueError(f"word_count_std must be >= 0, got {self.word_count_std}")
        if self.min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {self.min_words}")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be >= min_words ({self.min_words})")
        if not 0 <= self.rephrase_fraction <= 1:
            raise ValueError(f"rephrase_fraction must be in [0, 1], got {self.rephrase_fraction}")
        if self.tokens_per_word <= 0 or self.token_slack < 0:
            raise ValueError("tokens_per_word must be > 0 and token_slack >= 0")
        if self.random_max_new_tokens < 1 or (self.max_new_tokens_limit is not None and self.max_new_tokens_limit < 1):
            raise ValueError("token limits must be >= 1")
        if not 0 <= self.min_attribute_share <= 1 or not 0 <= self.seeding_uniform_mix <= 1:
            raise ValueError("min_attribute_share and seeding_uniform_mix must be in [0, 1]")

    def target_words(self, n_words: int, rng: np.random.Generator) -> int:
        """The word count asked of one variation (truncated Gaussian jitter, as Aug-PE's ``int(normal)``)."""
        jitter = int(rng.normal(0.0, self.word_count_std)) if self.word_count_std > 0 else 0
        target = max(self.min_words, n_words + jitter)
        return min(target, self.max_words) if self.max_words is not None else target

    def token_budget(self, word_count: int) -> int:
        """New tokens allowed for an answer of ``word_count`` words, rounded up to a multiple of 16.

        Rounding groups requests into a few budgets (one ``generate`` call each) and keeps them stable.
        """
        budget = math.ceil(word_count * self.tokens_per_word) + self.token_slack
        budget = 16 * math.ceil(budget / 16)
        return min(budget, self.max_new_tokens_limit) if self.max_new_tokens_limit is not None else budget

    @property
    def junk_min_words(self) -> int:
        return self.min_answer_words if self.min_answer_words is not None else max(1, self.min_words // 2)


_STAT_KEYS = ("requested", "junk", "regenerated", "fallbacks")


@dataclass
class GenerationStats:
    """Counts of LLM answers: requested, junk on the first try, regenerated, and replaced by a fallback.

    One record per (api, seed) call; calling again with the same seed (a resumed round) replaces its
    record instead of adding to it. With ``path``, records are appended to a JSONL file and re-read on
    construction, so totals add up over processes and resumes (the last record of a key wins).
    """

    random_requested: int = 0
    random_junk: int = 0
    random_fallbacks: int = 0
    vary_requested: int = 0
    vary_junk: int = 0
    vary_fallbacks: int = 0
    regenerated: int = 0
    junk_reasons: dict[str, int] = field(default_factory=dict)
    path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.path is None:
            return
        self.path = Path(self.path)
        if self.path.exists():
            for row in recover_jsonl(self.path, repair=True).rows:
                if row.get("api") in ("random", "vary") and isinstance(row.get("seed"), int):
                    self._calls[(row["api"], row["seed"])] = row
            self._recount()

    def record(self, api: str, seed: int, *, reasons: Sequence[str], **counts: int) -> dict[str, Any]:
        """Store one call's counts (``requested``, ``junk``, ``regenerated``, ``fallbacks``) and its junk reasons."""
        if api not in ("random", "vary"):
            raise ValueError(f"api must be 'random' or 'vary', got {api!r}")
        row: dict[str, Any] = {"api": api, "seed": int(seed)}
        row.update({k: int(counts.get(k, 0)) for k in _STAT_KEYS})
        row["reasons"] = dict(sorted(Counter(reasons).items()))
        with self.lock:
            self._calls[(api, int(seed))] = row
            self._recount()
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open_private_append(self.path) as fh:
                    fh.write(json.dumps(row, sort_keys=True) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        return row

    def _recount(self) -> None:
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for (api, _), row in self._calls.items():
            for key in _STAT_KEYS:
                totals[f"{api}_{key}"] += int(row.get(key, 0))
            reasons.update({str(k): int(v) for k, v in row.get("reasons", {}).items()})
        for api in ("random", "vary"):
            for key in ("requested", "junk", "fallbacks"):
                setattr(self, f"{api}_{key}", totals[f"{api}_{key}"])
        self.regenerated = totals["random_regenerated"] + totals["vary_regenerated"]
        self.junk_reasons = dict(sorted(reasons.items()))

    def as_dict(self) -> dict[str, int]:
        return {
            "random_requested": self.random_requested,
            "random_junk": self.random_junk,
            "random_fallbacks": self.random_fallbacks,
            "vary_requested": self.vary_requested,
            "vary_junk": self.vary_junk,
            "vary_fallbacks": self.vary_fallbacks,
            "regenerated": self.regenerated,
        }


def is_attribute_template(text: str, prompts: PromptSet) -> bool:
    """Whether ``text`` is the random API's public fallback: the subject and attribute values, joined."""
    prefix = f"{prompts.subject} "
    if not text.startswith(prefix):
        return False
    values = {value for _, value in prompts.all_attributes()}
    return all(part in values for part in text[len(prefix) :].split(", "))


@dataclass
class _Request:
    """One planned LLM answer: its conversation, token budget, public fallback and what junk looks like."""

    conversation: list[ChatMessage]
    max_new_tokens: int
    fallback: str
    instructions: frozenset[tuple[str, ...]]
    attributes: tuple[tuple[str, str], ...] = ()  # the (key, value) pairs a random prompt asked for


class LLMDescriptionGenerator:
    """The random and variation APIs of PE over descriptions, backed by any chat TextGenerator.

    ``stats_path`` (e.g. ``RUN/state/llm_stats.jsonl``) keeps per-call counts on disk; see
    :class:`GenerationStats`.
    """

    def __init__(
        self,
        llm: TextGenerator,
        prompts: PromptSet,
        settings: VariationSettings | None = None,
        *,
        progress: Callable[[str, int], None] | None = None,
        stats_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.llm = llm
        self.prompts = prompts
        self.settings = settings or VariationSettings()
        self.stats = GenerationStats(path=Path(stats_path) if stats_path is not None else None)
        self._progress = progress
        p = prompts
        self._random_instructions = instruction_ngrams(p.random_system, p.random_template)
        self._fill_instructions = instruction_ngrams(p.variation_system, p.fill_in_template)
        self._rephrase_instructions = instruction_ngrams(p.variation_system, p.rephrase_template)

    # -- random API ------------------------------------------------------------------------
    def _random_requests(self, n: int, seed: int) -> list[_Request]:
        rng = np.random.default_rng(seed)
        ps = self.prompts
        requests = []
        for _ in range(n):
            chosen = [(key, ps.attributes[key][self._draw_value(key, rng)]) for key in self._draw_keys(rng)]
            attribute = ", ".join(value for _, value in chosen)
            tone = ps.tones[int(rng.integers(len(ps.tones)))]
            user = ps.random_template.format(subject=ps.subject, attribute=attribute, tone=tone)
            requests.append(
                _Request(
                    self._with_system(ps.random_system, [{"role": "user", "content": user}]),
                    self.settings.random_max_new_tokens,
                    f"{ps.subject} {attribute}",
                    self._random_instructions,
                    tuple(chosen),
                )
            )
        return requests

    def condition(self, histogram: np.ndarray) -> None:
        """Weight the random API's draws by a DP seeding histogram (one value per
        ``prompts.all_attributes()`` pair); see :mod:`spti.seeding`. Post-processing only.

        A conditioned prompt names each key with the key's estimated mention rate (so a prompt asks
        for as many attributes as a private caption typically has), each value drawn from the
        key's noisy histogram.
        """
        from spti.seeding import seeding_draws

        self._seeding = seeding_draws(histogram, self.prompts, uniform_mix=self.settings.seeding_uniform_mix)

    def _draw_keys(self, rng: np.random.Generator) -> list[str]:
        keys = list(self.prompts.attributes)
        seeding = getattr(self, "_seeding", None)
        if seeding is None:
            chosen = sorted(rng.choice(len(keys), size=self.prompts.attributes_per_prompt, replace=False))
            return [keys[k] for k in chosen]
        named = [key for key in keys if rng.random() < seeding.mention[key]]
        return named or [max(keys, key=lambda k: seeding.mention[k])]

    def _draw_value(self, key: str, rng: np.random.Generator) -> int:
        seeding = getattr(self, "_seeding", None)
        n = len(self.prompts.attributes[key])
        if seeding is None:
            return int(rng.integers(n))
        return int(rng.choice(n, p=seeding.values[key]))

    def random_conversations(self, n: int, seed: int) -> tuple[list[list[ChatMessage]], list[str]]:
        """The random API's prompts and their public fallbacks (a template from the attributes)."""
        requests = self._random_requests(n, seed)
        return [r.conversation for r in requests], [r.fallback for r in requests]

    def random(self, n: int, *, seed: int | None = None) -> list[str]:
        seed = 0 if seed is None else seed
        return self._run("random", self._random_requests(n, seed), seed)

    # -- variation API ---------------------------------------------------------------------
    def _variation_requests(self, samples: Sequence[str], strength: float, seed: int) -> list[_Request]:
        s, ps = self.settings, self.prompts
        rng = np.random.default_rng(seed)
        probability = float(np.clip(strength, 0.05, 0.95))
        requests = []
        for text in samples:
            word_count = s.target_words(len(text.split()), rng)
            if rng.random() < s.rephrase_fraction:
                tone = ps.tones[int(rng.integers(len(ps.tones)))]
                user = ps.rephrase_template.format(subject=ps.subject, word_count=word_count, text=text, tone=tone)
                messages: list[ChatMessage] = [{"role": "user", "content": user}]
                instructions = self._rephrase_instructions
            else:
                messages = self._few_shot()
                masked = mask_words(text, probability, rng)
                user = ps.fill_in_template.format(subject=ps.subject, word_count=word_count, masked=masked)
                messages.append({"role": "user", "content": user})
                instructions = self._fill_instructions
            requests.append(
                _Request(
                    self._with_system(ps.variation_system, messages), s.token_budget(word_count), text, instructions
                )
            )
        return requests

    def variation_conversations(self, samples: Sequence[str], strength: float, seed: int) -> list[list[ChatMessage]]:
        return [r.conversation for r in self._variation_requests(samples, strength, seed)]

    def variation_budgets(self, samples: Sequence[str], strength: float, seed: int) -> list[int]:
        """The ``max_new_tokens`` each variation answer gets (it follows the target word count)."""
        return [r.max_new_tokens for r in self._variation_requests(samples, strength, seed)]

    def vary(self, samples: Sequence[str], strength: float, *, seed: int | None = None) -> list[str]:
        seed = 0 if seed is None else seed
        return self._run("vary", self._variation_requests(samples, strength, seed), seed)

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, api: str, requests: list[_Request], seed: int) -> list[str]:
        """Generate, clean, regenerate junk once (a derived seed), fall back, and record the counts."""
        keys = [f"{api}/{seed}/{i}" for i in range(len(requests))]
        answers = self._generate(requests, keys, seed, api)
        cleaned = [clean_description(a) for a in answers]
        reasons = [self._junk(c, r) for c, r in zip(cleaned, requests, strict=True)]
        junk = [i for i, why in enumerate(reasons) if why is not None]
        retried: list[int] = []
        if junk and self.settings.regenerate_junk:
            retried = junk
            again = self._generate(
                [requests[i] for i in junk],
                [f"{keys[i]}/retry" for i in junk],
                derive_seed(seed, api, "retry"),
                None,
            )
            for i, answer in zip(junk, again, strict=True):
                text = clean_description(answer)
                if self._junk(text, requests[i]) is None:
                    cleaned[i] = text
                else:
                    cleaned[i] = None
        else:
            for i in junk:
                cleaned[i] = None
        out = [text if text is not None else r.fallback for text, r in zip(cleaned, requests, strict=True)]
        self.stats.record(
            api,
            seed,
            requested=len(requests),
            junk=len(junk),
            regenerated=len(retried),
            fallbacks=sum(text is None for text in cleaned),
            reasons=[why for why in reasons if why is not None],
        )
        return out

    def _junk(self, text: str | None, request: _Request) -> str | None:
        """:func:`junk_reason`, plus ``ignored_attributes`` for a random answer that names too few
        of the attribute values its prompt asked for."""
        why = junk_reason(text, min_words=self.settings.junk_min_words, instructions=request.instructions)
        share = self.settings.min_attribute_share
        if why is None and text and request.attributes and share > 0:
            named = sum(self._matcher.mentions(text, request.attributes))
            if named < share * len(request.attributes):
                why = "ignored_attributes"
        return why

    @functools.cached_property
    def _matcher(self) -> AttributeMatcher:
        """The seeding vote's matcher, built once per generator (the attribute check reads every random answer)."""
        from spti.seeding import AttributeMatcher

        return AttributeMatcher(self.prompts)

    def _few_shot(self) -> list[ChatMessage]:
        messages: list[ChatMessage] = []
        for ex in self.prompts.examples:
            user = self.prompts.fill_in_template.format(
                subject=self.prompts.subject, word_count=len(ex.filled.split()), masked=ex.masked
            )
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": ex.filled}]
        return messages

    @staticmethod
    def _with_system(system: str, messages: list[ChatMessage]) -> list[ChatMessage]:
        return ([{"role": "system", "content": system}] if system else []) + messages

    def _generate(self, requests: list[_Request], keys: list[str], seed: int, what: str | None) -> list[str | None]:
        """One ``generate`` call per token budget (seeded per budget), answers in request order."""
        s = self.settings
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.max_new_tokens, []).append(i)
        for budget, idx in sorted(groups.items()):
            answers = self.llm.generate(
                [requests[i].conversation for i in idx],
                temperature=s.temperature,
                top_p=s.top_p,
                max_new_tokens=budget,
                seed=derive_seed(seed, "tokens", budget),
                keys=[keys[i] for i in idx],
            )
            if len(answers) != len(idx):
                raise RuntimeError(f"text generator returned {len(answers)} answers for {len(idx)} prompts")
            for i, answer in zip(idx, answers, strict=True):
                outputs[i] = answer
            if self._progress is not None and what is not None:
                self._progress(what, len(idx))
        return outputs
