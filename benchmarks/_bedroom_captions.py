"""bench_quality_text's private set and metric: bedroom captions drawn from a skewed, correlated attribute
distribution and written as varied sentences, and the word-matching detector that reads the same attributes
back from any text (private or released), with the per-attribute total-variation distance."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

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
