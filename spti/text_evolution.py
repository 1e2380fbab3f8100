"""Private Evolution over text: the LLM random / variation APIs and the two voting spaces.

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

Voting spaces (``private_evolution`` Embedders): ``TextVoteSpace`` embeds descriptions with a
sentence embedder (private captions vote there); ``RenderedVoteSpace`` renders each description and
embeds the picture with an image feature extractor (private images vote there), caching features
by content hash so no description is rendered twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from private_evolution.files import open_private_append, recover_jsonl
from private_evolution.population import derive_seed
from spti.backends.base import ChatMessage, ImageEmbedder, ImageGenerator, TextEmbedder, TextGenerator
from spti.prompts import PromptSet


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


# -- cleaning ------------------------------------------------------------------------------
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}
_LABEL = re.compile(
    r"^\s*(?:the\s+|my\s+)?(?:(?:final|revised|new|filled[- ]in|completed|rephrased|edited|short|image)\s+)?"
    r"(?:description|caption|answer|output|result|response|text|version|paragraph|prompt|filled[- ]in|rephrased)"
    r"(?:\s*\(\s*\d+\s+words?\s*\))?\s*[:：]\s*",
    re.IGNORECASE,
)
# Openers that introduce the answer rather than belong to it ("Sure! Here's the filled-in description: …").
_COURTESY = re.compile(
    r"^\s*(?:sure|certainly|of course|absolutely|okay|ok|great|alright|yes|no problem|happy to help)\b[^\w\n]*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\s*(?:here(?:'s| is| are)|below is|this is (?:the|a|my) (?:\w+[- ])*(?:description|version|text|rewrite)|"
    r"i(?:'ve| have) (?:filled|rephrased|rewritten|written|completed)|the following is|what's left to \w+)\b"
    r"[^\n]*?(?::|\.\.\.|…)\s*",
    re.IGNORECASE,
)
_TITLE_LINE = re.compile(r"^\s*(?:#{1,6}\s+.*|\*\*[^*]{1,80}\*\*:?\s*|[^.!?]{1,100}:\s*)$")
_COMMENTARY = re.compile(
    r"^\s*(?:\(|\[|-{3,}|\*{3,}|notes?\b|word count\b|explanation\b|i hope\b|hope this\b|let me know\b|"
    r"feel free\b|this (?:description|version|text|rewrite|answer)\b|in this (?:description|version)\b|"
    r"alternatively\b|or\s*:|another (?:version|option)\b|i (?:have|'ve|tried|made|kept|used)\b)",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+")
_WORD_COUNT_NOTE = re.compile(
    r"\s*[(\[][^()\[\]]*\b\d+\s*words?\b[^()\[\]]*[)\]]|\s*\bword count\s*[:=]?\s*\d+\.?", re.IGNORECASE
)
_MARKDOWN = [
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # bold
    (re.compile(r"__([A-Za-z0-9](?:[^_]*?[A-Za-z0-9])?)__"), r"\1"),  # bold with underscores (never blanks)
    (re.compile(r"(?<![\w*])\*(?!\s)([^*]+?)(?<!\s)\*(?![\w*])"), r"\1"),  # italics
    (re.compile(r"`+"), ""),
]
_END = re.compile(r"[.!?…][\"'”’)\]]*$")


def _strip_markdown(line: str) -> str:
    line = re.sub(r"^\s*>+\s?", "", line)  # block quote
    line = re.sub(r"^\s*#{1,6}\s+", "", line)
    line = _BULLET.sub("", line)
    for pattern, repl in _MARKDOWN:
        line = pattern.sub(repl, line)
    return line.replace("*", "").strip()


def _strip_openers(text: str) -> str:
    """Courtesy words, preambles and labels at the start of the text, repeatedly ("Sure! Here is: Answer: …")."""
    while True:
        before = text
        text = _COURTESY.sub("", text, count=1)
        text = _PREAMBLE.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1)
        text = text.lstrip(" \t-–—:")
        if text == before:
            return text


def _unquote(text: str) -> str:
    text = text.strip()
    if text and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        end = text.rfind(close, 1)
        # a quoted answer followed by a remark: keep what is quoted; an unclosed quote (cut-off answer): drop it
        text = text[1:end] if end > 0 and end >= len(text) * 0.5 else text[1:]
    if text and text[-1] in _QUOTES.values() and text.count(text[-1]) % 2 == 1 and text[-1] not in "'’":
        text = text[:-1]
    return text.strip()


def _trim_cut_sentence(text: str) -> str:
    """An answer cut by the token limit ends mid-sentence: drop the fragment if most of the text remains."""
    if _END.search(text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?…][\"'”’)\]]*(?=\s)", text)]
    if ends and len(text[: ends[-1]].split()) >= 2 / 3 * len(text.split()):
        return text[: ends[-1]]
    return text


def clean_description(text: str | None, *, max_words: int | None = None) -> str | None:
    """The description inside an LLM answer, or ``None`` when nothing is left.

    Strips courtesy openers and preambles ("Sure! Here is the filled-in description:"), labels
    ("Description:"), markdown (headings, bullets, bold, italics, code), enclosing quotes, word-count notes
    and a sentence cut off by the token limit; keeps the first paragraph of content (later ones are
    remarks or alternatives), collapses whitespace and, with ``max_words``, keeps at most that many words.
    """
    if not text:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("’", "'").replace("\u00a0", " ")
    text = re.sub(r"<\|[^|>]*\|>|</?s>|\[/?INST\]", " ", text)  # leaked chat-template tokens
    kept: list[str] = []
    for raw in text.split("\n"):
        if raw.strip().startswith("```"):
            continue
        if not raw.strip():
            if kept:
                break  # end of the first content paragraph
            continue
        line = _strip_openers(_strip_markdown(raw)) if not kept else _strip_markdown(raw)
        if not line:
            continue
        if not kept and _TITLE_LINE.match(raw.strip()) and not _BULLET.match(raw):
            continue  # a heading or "Here is the description:" on its own line
        if kept and (_COMMENTARY.match(line) or (_TITLE_LINE.match(raw.strip()) and raw.strip().endswith(":"))):
            break
        if kept and _BULLET.match(raw) and not _END.search(kept[-1]):
            kept[-1] += "."
        kept.append(line)
    out = _WORD_COUNT_NOTE.sub("", " ".join(kept))
    out = _unquote(_strip_openers(out))
    out = " ".join(out.split())
    if max_words is not None:
        out = " ".join(out.split()[:max_words])
    out = _trim_cut_sentence(out)
    return out or None


# -- junk ----------------------------------------------------------------------------------
_BLANK = re.compile(r"(?<![A-Za-z0-9])_+(?![A-Za-z0-9])|\[\s*(?:blank|\.\.\.|…|_+)?\s*\]|<\s*blank\s*>", re.I)
_REFUSAL_START = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|i cannot\b|i can'?t\b|i can not\b|i'?m unable|i am unable|"
    r"i'?m not able|i am not able|i won'?t\b|unfortunately,? i\b|i'?m afraid)",
    re.IGNORECASE,
)
_REFUSAL_ANY = re.compile(
    r"\bas an ai\b|\bas a language model\b|\bai language model\b|\bi do(?: not|n'?t) have (?:the ability|access)\b|"
    r"\bcannot (?:view|see) (?:the )?images?\b|\bi can'?t (?:view|see) (?:the )?images?\b",
    re.IGNORECASE,
)
_ECHO_NGRAM = 6


def _ngrams(text: str, n: int = _ECHO_NGRAM) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def instruction_ngrams(*templates: str) -> frozenset[tuple[str, ...]]:
    """Word 6-grams of the fixed text of prompt templates (placeholders split it; their values are not included)."""
    grams: set[tuple[str, ...]] = set()
    for template in templates:
        for part in re.split(r"\{[A-Za-z_]+\}", template):
            grams |= _ngrams(part)
    return frozenset(grams)


def junk_reason(
    text: str | None, *, min_words: int, instructions: frozenset[tuple[str, ...]] = frozenset()
) -> str | None:
    """Why a cleaned answer is unusable, or ``None`` if it is a description.

    Reasons, checked in this order: ``empty``; ``refusal`` ("I'm sorry", "As an AI"); ``echo`` (a 6-word
    run of the instructions repeated); ``blanks`` (a "_" or "[blank]" left); ``non_text`` (mostly symbols
    or digits, or one word repeated); ``too_short`` (fewer than ``min_words`` words).
    """
    if not text or not text.strip():
        return "empty"
    text = text.replace("’", "'")
    if _REFUSAL_START.search(text) or _REFUSAL_ANY.search(text):
        return "refusal"
    if instructions and _ngrams(text) & instructions:
        return "echo"
    if _BLANK.search(text):
        return "blanks"
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    words = re.findall(r"[^\W\d_]{2,}", text)
    if letters < 0.6 * len(visible) or not words:
        return "non_text"
    if len(words) >= 8 and Counter(w.lower() for w in words).most_common(1)[0][1] > 0.4 * len(words):
        return "non_text"
    if len(text.split()) < min_words:
        return "too_short"
    return None


def mask_words(text: str, probability: float, rng: np.random.Generator) -> str:
    """Replace each word by ``_`` with the given probability (at least one blank); punctuation around a word stays."""
    words = text.split()
    if not words:
        return "_"
    mask = rng.random(len(words)) < probability
    if not mask.any():
        mask[rng.integers(len(words))] = True
    out = []
    for word, masked in zip(words, mask, strict=True):
        if not masked:
            out.append(word)
            continue
        m = re.fullmatch(r"(\W*)(.*?)(\W*)", word)
        out.append(f"{m.group(1)}_{m.group(3)}" if m is not None and m.group(2) else "_")
    return " ".join(out)


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
            from spti.seeding import matched_values

            named = sum(matched_values(text, request.attributes, self.prompts))
            if named < share * len(request.attributes):
                why = "ignored_attributes"
        return why

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


class TextVoteSpace:
    """Descriptions → L2-normalised sentence embeddings (text voting)."""

    def __init__(self, embedder: TextEmbedder, *, batch_size: int = 256) -> None:
        self.embedder = embedder
        self.batch_size = batch_size

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        parts = [
            np.asarray(self.embedder.embed(list(samples[i : i + self.batch_size])), dtype=np.float32)
            for i in range(0, len(samples), self.batch_size)
        ]
        emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        return normalize_rows(emb)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class FeatureCache:
    """Content-addressed float32 vectors in SQLite (WAL): renders are never recomputed on resume.

    Keys are hashes of everything that decides a vector (see :meth:`RenderedVoteSpace.key`), so a
    changed setting misses the cache instead of reading a stale feature.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only like everything outside release/ (SQLite gives its -wal/-shm files the same mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(f"SELECT key, data FROM features WHERE key IN ({marks})", chunk):
                    out[key] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (key, data) VALUES (?, ?)",
                [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def render_seed(text: str, seed: int, index: int = 0) -> int:
    """Seed of a description's rendering: same text, same picture (and cache hit) in every round.

    ``index`` numbers the renders of one description when it is rendered several times (``vote_seeds``);
    render 0 has the seed a single render always had.
    """
    spec = f"{seed}\x00{text}" if index == 0 else f"{seed}\x00{index}\x00{text}"
    digest = hashlib.sha256(spec.encode()).digest()
    return int.from_bytes(digest[:4], "little")


# Candidates are shrunk to the feature extractor's input as the SPTI authors shrink SDXL-Turbo's 512²
# renders to 256²: clean-fid's PIL bicubic on float channels, then rounded back to 8 bits.
FEATURE_RESIZE = "clean-bicubic"
VOTE_RENDER_SPEC = "spec.json"


def feature_input(image: Any, size: int | None) -> Any:
    """``image`` at ``size``² for the feature extractor (unchanged when it already is, or ``size`` is None)."""
    from PIL import Image as PILImage

    from spti.backends.local.features import clean_fid_resize

    image = image if image.mode == "RGB" else image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    pixels = clean_fid_resize(np.asarray(image), size)
    return PILImage.fromarray(np.clip(np.around(pixels), 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class VoteRenderSpec:
    """Everything that decides the pixels of a vote render (and so the name of its PNG).

    ``model`` names the generator, ``size`` is the side it drew at, ``steps``/``guidance`` are the
    values it used (resolved: never ``None`` for a diffusers generator), ``seed`` is the run's public
    seed (each render's own seed is :func:`render_seed` of it) and ``num_seeds`` the renders per text.
    """

    model: str
    size: int
    steps: int | None
    guidance: float | None
    seed: int
    num_seeds: int = 1

    def render_key(self, text: str, index: int = 0) -> str:
        """Content address of render ``index`` of ``text``: ``state/vote_renders/<key>.png``."""
        spec = (
            f"render|{self.model}|{self.size}|{self.steps}|{self.guidance}|{render_seed(text, self.seed, index)}|{text}"
        )
        return hashlib.sha256(spec.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": self.size,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "num_seeds": self.num_seeds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VoteRenderSpec:
        return cls(
            model=str(d["model"]),
            size=int(d["size"]),
            steps=None if d.get("steps") is None else int(d["steps"]),
            guidance=None if d.get("guidance") is None else float(d["guidance"]),
            seed=int(d["seed"]),
            num_seeds=int(d.get("num_seeds", 1)),
        )

    @classmethod
    def load(cls, render_dir: str | Path) -> VoteRenderSpec | None:
        """The spec recorded beside a folder of vote renders, or ``None`` when there is none."""
        path = Path(render_dir) / VOTE_RENDER_SPEC
        if not path.exists():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            return None


def native_size(generator: Any, fallback: int) -> int:
    """The generator's native side (diffusers: ``default_sample_size × vae_scale_factor``), else ``fallback``."""
    size = getattr(generator, "native_size", None)
    return int(size) if isinstance(size, int) and size > 0 else fallback


class RenderedVoteSpace:
    """Descriptions → rendered images → image features (image voting), cached by content hash.

    Each description is rendered ``num_seeds`` times (seeds from its text: :func:`render_seed`) at
    ``size`` pixels, ``"native"`` meaning the generator's own size (SDXL-Turbo: 512², as the SPTI authors
    render); each render is resized to ``feature_size``² (:func:`feature_input`; the private images are
    resized to the same side) and embedded, and a description's feature is the mean over its renders.
    Features are cached under :meth:`key`, which covers every setting that changes them.

    With ``render_dir``, the first render of each description is kept there as ``<render_key>.png``
    (public: it is drawn from a public text): the very image the private images voted for, which the
    render stage can release instead of drawing again. A cached feature whose render is missing is
    computed again from a fresh render, so a kept render always is the one its feature came from. After
    each call, renders of descriptions not in that call are removed (``prune``): PE releases descriptions
    of its last population only, and one round's renders are all that need keeping.
    """

    def __init__(
        self,
        generator: ImageGenerator,
        embedder: ImageEmbedder,
        *,
        size: int | str = "native",
        feature_size: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        num_seeds: int = 1,
        batch_size: int = 16,
        cache: FeatureCache | None = None,
        model: str = "",
        tag: str = "",
        render_dir: str | Path | None = None,
        prune: bool = True,
        fallback_size: int = 512,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        if size != "native" and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be 'native' or a positive number of pixels, got {size!r}")
        self.generator = generator
        self.embedder = embedder
        self.size = native_size(generator, fallback_size) if size == "native" else int(size)
        self.feature_size = feature_size
        # the values the generator really uses, so that the keys name them (None would hide a default)
        self.steps = steps if steps is not None else getattr(generator, "steps", None)
        self.guidance = guidance if guidance is not None else getattr(generator, "guidance", None)
        self.seed = seed
        self.num_seeds = num_seeds
        self.batch_size = batch_size
        self.cache = cache
        self.tag = tag
        self.spec = VoteRenderSpec(
            model=model, size=self.size, steps=self.steps, guidance=self.guidance, seed=seed, num_seeds=num_seeds
        )
        self.render_dir = Path(render_dir) if render_dir is not None else None
        self.prune = prune
        self.renders = 0
        self._progress = progress
        if self.render_dir is not None:
            from private_evolution.files import atomic_write_json

            self.render_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.render_dir / VOTE_RENDER_SPEC, self.spec.to_dict())

    def key(self, text: str) -> str:
        """Feature key: the renders (generator, size, steps, guidance, seeds), the resize and the extractor."""
        s = self.spec
        spec = (
            f"{s.model}|{self.tag}|{s.size}|{s.steps}|{s.guidance}|{s.seed}|seeds={s.num_seeds}|"
            f"features={self.feature_size}:{FEATURE_RESIZE}|{text}"
        )
        return hashlib.sha256(spec.encode()).hexdigest()

    def render_path(self, text: str) -> Path | None:
        """Where the first render of ``text`` is kept (``None`` without a render folder)."""
        if self.render_dir is None:
            return None
        return self.render_dir / f"{self.spec.render_key(text)}.png"

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        keys = [self.key(t) for t in samples]
        found = self.cache.get_many(sorted(set(keys))) if self.cache is not None else {}
        if self.render_dir is not None:
            for i, text in enumerate(samples):
                path = self.render_path(text)
                if keys[i] in found and path is not None and not path.exists():
                    del found[keys[i]]
        # unique missing texts only: duplicates in a population are rendered once
        unique: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found:
                unique.setdefault(k, i)
        order = list(unique.values())
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            texts = [samples[i] for i in idx]
            total: np.ndarray | None = None
            for j in range(self.num_seeds):
                images = self.generator.generate(
                    texts,
                    seeds=[render_seed(t, self.seed, j) for t in texts],
                    width=self.size,
                    height=self.size,
                    steps=self.steps,
                    guidance=self.guidance,
                )
                if j == 0 and self.render_dir is not None:
                    self._keep(texts, images)
                feats = np.asarray(
                    self.embedder.embed([feature_input(im, self.feature_size) for im in images]), dtype=np.float64
                )
                total = feats if total is None else total + feats
                self.renders += len(idx)
            assert total is not None
            mean = (total / self.num_seeds).astype(np.float32)
            new = {keys[i]: mean[j] for j, i in enumerate(idx)}
            found.update(new)
            if self.cache is not None:
                self.cache.put_many(new)
            if self._progress is not None:
                self._progress(len(idx))
        if self.render_dir is not None and self.prune:
            self._prune({self.spec.render_key(t) for t in samples})
        return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)

    def _keep(self, texts: Sequence[str], images: Sequence[Any]) -> None:
        import io

        from private_evolution.files import atomic_write_bytes

        for text, image in zip(texts, images, strict=True):
            path = self.render_path(text)
            assert path is not None
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())

    def _prune(self, keep: set[str]) -> None:
        assert self.render_dir is not None
        for path in self.render_dir.glob("*.png"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
