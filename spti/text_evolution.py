"""Private Evolution over text: the LLM random / variation APIs and the two voting spaces.

``LLMDescriptionGenerator`` is a ``private_evolution`` Generator over descriptions (strings):
- random API: the LLM writes a short description from the domain prompt, one public attribute and
  one tone (SPTI §3);
- variation API: fill-in-the-blanks — each word is masked with probability ``strength`` (0.5 in the
  paper) and the LLM fills the blanks to a target word count (length + N(0, σ_w) jitter, at least
  ``min_words``), with few-shot examples in chat format; a fraction may be rephrased instead.
Both are public computations: they only ever see public prompts and DP-selected descriptions.

Voting spaces (``private_evolution`` Embedders): ``TextVoteSpace`` embeds descriptions with a
sentence embedder (private captions vote there); ``RenderedVoteSpace`` renders each description and
embeds the picture with an image feature extractor (private images vote there), caching features
by content hash so no description is rendered twice.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spti.backends.base import ChatMessage, ImageEmbedder, ImageGenerator, TextEmbedder, TextGenerator
from spti.prompts import PromptSet


@dataclass(frozen=True)
class VariationSettings:
    """Knobs of the LLM APIs (paper defaults: mask p = strength = 0.5, σ_w jitter, ≥ 25 words)."""

    word_count_std: float = 3.0
    min_words: int = 25
    max_words: int = 60
    rephrase_fraction: float = 0.0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 100


@dataclass
class GenerationStats:
    """Counts of LLM calls that failed and fell back to a public default (a copy or a template)."""

    random_requested: int = 0
    random_fallbacks: int = 0
    vary_requested: int = 0
    vary_fallbacks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {
            "random_requested": self.random_requested,
            "random_fallbacks": self.random_fallbacks,
            "vary_requested": self.vary_requested,
            "vary_fallbacks": self.vary_fallbacks,
        }


_LABEL = re.compile(r"^\s*(description|caption|answer|output|result)\s*:\s*", re.IGNORECASE)


def clean_description(text: str | None, *, max_words: int) -> str | None:
    """First non-empty line, labels and quotes stripped, whitespace collapsed, at most ``max_words``."""
    if not text:
        return None
    for line in text.replace("\r", "\n").split("\n"):
        line = _LABEL.sub("", line).strip().strip("\"'`*").strip()
        if line:
            words = line.split()
            return " ".join(words[:max_words])
    return None


def mask_words(text: str, probability: float, rng: np.random.Generator) -> str:
    """Replace each word by ``_`` with the given probability (at least one blank)."""
    words = text.split()
    if not words:
        return "_"
    mask = rng.random(len(words)) < probability
    if not mask.any():
        mask[rng.integers(len(words))] = True
    return " ".join("_" if m else w for w, m in zip(words, mask, strict=True))


class LLMDescriptionGenerator:
    """The random and variation APIs of PE over descriptions, backed by any chat TextGenerator."""

    def __init__(
        self,
        llm: TextGenerator,
        prompts: PromptSet,
        settings: VariationSettings | None = None,
        *,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.llm = llm
        self.prompts = prompts
        self.settings = settings or VariationSettings()
        self.stats = GenerationStats()
        self._progress = progress

    # -- random API ------------------------------------------------------------------------
    def random_conversations(self, n: int, seed: int) -> tuple[list[list[ChatMessage]], list[str]]:
        rng = np.random.default_rng(seed)
        pairs = self.prompts.all_attributes()
        conversations, fallbacks = [], []
        for _ in range(n):
            _, attribute = pairs[int(rng.integers(len(pairs)))]
            tone = self.prompts.tones[int(rng.integers(len(self.prompts.tones)))]
            user = self.prompts.random_template.format(subject=self.prompts.subject, attribute=attribute, tone=tone)
            conversations.append(self._with_system(self.prompts.random_system, [{"role": "user", "content": user}]))
            fallbacks.append(f"{self.prompts.subject} {attribute}")
        return conversations, fallbacks

    def random(self, n: int, *, seed: int | None = None) -> list[str]:
        seed = 0 if seed is None else seed
        conversations, fallbacks = self.random_conversations(n, seed)
        outputs = self._generate(conversations, [f"random/{seed}/{i}" for i in range(n)], seed, "random")
        return self._clean_or_fallback(outputs, fallbacks, "random")

    # -- variation API ---------------------------------------------------------------------
    def variation_conversations(self, samples: Sequence[str], strength: float, seed: int) -> list[list[ChatMessage]]:
        s = self.settings
        rng = np.random.default_rng(seed)
        probability = float(np.clip(strength, 0.05, 0.95))
        conversations = []
        for text in samples:
            n_words = len(text.split())
            jitter = round(rng.normal(0.0, s.word_count_std)) if s.word_count_std > 0 else 0
            word_count = int(min(max(s.min_words, n_words + jitter), s.max_words))
            if rng.random() < s.rephrase_fraction:
                user = self.prompts.rephrase_template.format(
                    subject=self.prompts.subject, word_count=word_count, text=text
                )
                messages = [{"role": "user", "content": user}]
            else:
                messages = self._few_shot()
                masked = mask_words(text, probability, rng)
                user = self.prompts.fill_in_template.format(
                    subject=self.prompts.subject, word_count=word_count, masked=masked
                )
                messages.append({"role": "user", "content": user})
            conversations.append(self._with_system(self.prompts.variation_system, messages))
        return conversations

    def vary(self, samples: Sequence[str], strength: float, *, seed: int | None = None) -> list[str]:
        seed = 0 if seed is None else seed
        conversations = self.variation_conversations(samples, strength, seed)
        outputs = self._generate(conversations, [f"vary/{seed}/{i}" for i in range(len(samples))], seed, "vary")
        return self._clean_or_fallback(outputs, list(samples), "vary")

    # -- helpers ---------------------------------------------------------------------------
    def _clean_or_fallback(self, outputs: list[str | None], fallbacks: list[str], what: str) -> list[str]:
        """Cleaned answers; an unusable one is replaced by its public fallback and counted."""
        cleaned = [clean_description(out, max_words=self.settings.max_words) for out in outputs]
        with self.stats.lock:
            setattr(self.stats, f"{what}_requested", getattr(self.stats, f"{what}_requested") + len(cleaned))
            setattr(self.stats, f"{what}_fallbacks", getattr(self.stats, f"{what}_fallbacks") + cleaned.count(None))
        return [text if text is not None else fb for text, fb in zip(cleaned, fallbacks, strict=True)]

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

    def _generate(
        self, conversations: list[list[ChatMessage]], keys: list[str], seed: int, what: str
    ) -> list[str | None]:
        s = self.settings
        outputs = self.llm.generate(
            conversations,
            temperature=s.temperature,
            top_p=s.top_p,
            max_new_tokens=s.max_new_tokens,
            seed=seed,
            keys=keys,
        )
        if len(outputs) != len(conversations):
            raise RuntimeError(f"text generator returned {len(outputs)} answers for {len(conversations)} prompts")
        if self._progress is not None:
            self._progress(what, len(conversations))
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
    """Content-addressed float32 vectors in SQLite (WAL): renders are never recomputed on resume."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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


def render_seed(text: str, seed: int) -> int:
    """Seed of a description's rendering: same text, same picture (and cache hit) in every round."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RenderedVoteSpace:
    """Descriptions → rendered images → image features (image voting), cached by content hash."""

    def __init__(
        self,
        generator: ImageGenerator,
        embedder: ImageEmbedder,
        *,
        size: int = 256,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int = 16,
        cache: FeatureCache | None = None,
        tag: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.generator = generator
        self.embedder = embedder
        self.size = size
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.batch_size = batch_size
        self.cache = cache
        self.tag = tag
        self.renders = 0
        self._progress = progress

    def key(self, text: str) -> str:
        spec = f"{self.tag}|{self.size}|{self.steps}|{self.guidance}|{self.seed}|{text}"
        return hashlib.sha256(spec.encode()).hexdigest()

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        keys = [self.key(t) for t in samples]
        found = self.cache.get_many(sorted(set(keys))) if self.cache is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in found]
        # unique missing texts only: duplicates in a population are rendered once
        unique: dict[str, int] = {}
        for i in todo:
            unique.setdefault(keys[i], i)
        order = list(unique.values())
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            texts = [samples[i] for i in idx]
            images = self.generator.generate(
                texts,
                seeds=[render_seed(t, self.seed) for t in texts],
                width=self.size,
                height=self.size,
                steps=self.steps,
                guidance=self.guidance,
            )
            feats = np.asarray(self.embedder.embed(images), dtype=np.float32)
            new = {keys[i]: feats[j] for j, i in enumerate(idx)}
            found.update(new)
            if self.cache is not None:
                self.cache.put_many(new)
            self.renders += len(idx)
            if self._progress is not None:
                self._progress(len(idx))
        return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
