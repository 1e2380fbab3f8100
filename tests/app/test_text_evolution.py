"""The text PE pieces that need no model: masking, cleaning, prompt sets, conversations, caches."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from spti.errors import SptiError
from spti.prompts import SHIPPED_DOMAINS, load_prompt_set, shipped_prompt_file
from spti.text_evolution import (
    FeatureCache,
    LLMDescriptionGenerator,
    VariationSettings,
    clean_description,
    mask_words,
    render_seed,
)


@pytest.mark.parametrize("domain", SHIPPED_DOMAINS)
def test_shipped_prompt_sets_load(domain: str) -> None:
    ps = load_prompt_set(domain)
    assert ps.name == domain
    assert len(ps.examples) == 2
    for ex in ps.examples:
        filled, masked = ex.filled.split(), ex.masked.split()
        assert 40 <= len(filled) <= 50, (domain, len(filled))  # the SPTI authors' few-shot length
        assert len(masked) == len(filled) and "_" in ex.masked
        for f, m in zip(filled, masked, strict=True):
            assert m == f or re.sub(r"\w+([-'\w]*\w)?", "_", f, count=1) == m or m == "_", (f, m)
    assert len(ps.tones) >= 6 and len(set(ps.tones)) == len(ps.tones)
    assert len(ps.attributes) >= 5 and len(ps.all_attributes()) >= 50  # rich public vocabularies
    assert ps.attributes_per_prompt == 2
    for values in ps.attributes.values():
        assert len(set(values)) == len(values)
    assert "{tone}" in ps.rephrase_template and "{word_count}" in ps.fill_in_template


def test_bedroom_vocabulary_offers_many_wall_colours() -> None:
    walls = " ".join(load_prompt_set("bedrooms").attributes["wall_colour"])
    for colour in ("white", "blue", "green", "grey", "beige", "pink", "yellow", "brick"):
        assert colour in walls


def test_every_shipped_folder_is_registered() -> None:
    """A set added under prompts/ but not to SHIPPED_DOMAINS (or the reverse) fails here."""
    root = shipped_prompt_file("generic").parent.parent
    assert sorted(p.name for p in root.iterdir() if (p / "prompts.toml").is_file()) == sorted(SHIPPED_DOMAINS)


def test_user_folder_loads_like_a_shipped_set(tmp_path) -> None:
    mine = tmp_path / "my_domain"
    mine.mkdir()
    shutil.copy(shipped_prompt_file("pets"), mine / "prompts.toml")
    ps, shipped = load_prompt_set(mine), load_prompt_set("pets")
    assert ps.source == str(mine / "prompts.toml")
    assert {**vars(ps), "source": ""} == {**vars(shipped), "source": ""}
    assert load_prompt_set(mine / "prompts.toml") == ps


def test_older_files_with_tones_under_random_still_load(tmp_path) -> None:
    (tmp_path / "prompts.toml").write_text(
        'subject = "a photo"\n[random]\ntemplate = "Describe {subject} {attribute}, {tone}."\n'
        'tones = ["plainly"]\n[attributes]\nscene = ["outdoors", "indoors"]\n'
        '[variation]\nfill_in_template = "{masked} in {word_count} words"\nrephrase_template = "{text}"\n'
    )
    ps = load_prompt_set(tmp_path)
    assert ps.tones == ("plainly",) and ps.attributes_per_prompt == 1 and ps.examples == ()


def test_user_prompt_set_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(SptiError, match="not found"):
        load_prompt_set(tmp_path / "nope")
    bad = tmp_path / "prompts.toml"

    text = Path(load_prompt_set("generic").source).read_text()
    bad.write_text(text.replace("{masked}", "{maskd}"))
    with pytest.raises(SptiError, match="unknown placeholder") as err:
        load_prompt_set(tmp_path)
    assert str(bad) in str(err.value)


def test_synonyms_are_read_checked_and_used_by_the_seeding_matcher(tmp_path) -> None:
    from spti.seeding import attribute_affinities

    ps = load_prompt_set("bedrooms")
    assert ps.synonyms["nordic"] == "scandinavian"
    pairs = ps.all_attributes()
    row = attribute_affinities(["A Nordic bedroom."], ps)[0]
    assert [pairs[j][1] for j in np.flatnonzero(row)] == ["in a Scandinavian style"]
    text = Path(ps.source).read_text()
    (tmp_path / "prompts.toml").write_text(text.replace('"nordic", "scandi"', '"nordic style"'))
    with pytest.raises(SptiError, match=r"one word .*prompts\.toml|prompts\.toml.*one word"):
        load_prompt_set(tmp_path)


def test_mask_words_probability_and_at_least_one_blank() -> None:
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(2000))
    masked = mask_words(text, 0.5, rng).split()
    assert len(masked) == 2000
    assert 0.45 < masked.count("_") / 2000 < 0.55
    kept = [w for w in masked if w != "_"]
    assert all(w.startswith("w") for w in kept)
    assert mask_words("one", 0.0001, rng) == "_"
    # punctuation around a masked word stays, so the sentence structure survives
    masked = mask_words('a bed, "white" walls. (lamp)', 0.999, rng)
    assert masked == '_ _, "_" _. (_)'


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('Description: "A red car parked."\n\nMore text', "A red car parked."),
        ("\n\n  a   cat\tsleeping ", "a cat sleeping"),
        ("", None),
        (None, None),
        ("   \n  ", None),
    ],
)
def test_clean_description(raw, expected) -> None:
    assert clean_description(raw) == expected


def test_clean_description_has_no_word_cap_unless_asked() -> None:
    long = " ".join(["word"] * 300) + "."
    assert clean_description(long) == long
    assert clean_description("a " * 100, max_words=5) == "a a a a a"


class _Unused:
    def generate(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError


def test_variation_conversation_shape_and_word_count() -> None:
    ps = load_prompt_set("bedrooms")
    gen = LLMDescriptionGenerator(_Unused(), ps, VariationSettings(word_count_std=0.0, min_words=5))
    convs = gen.variation_conversations(["a small bright bedroom with a wooden bed and white walls"], 0.5, seed=1)
    (conv,) = convs
    assert conv[0]["role"] == "system"
    # few-shot pairs, then the request
    assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * len(ps.examples) + ["user"]
    assert "exactly 11 words" in conv[-1]["content"]
    assert "_" in conv[-1]["content"]
    shots = [m["content"] for m in conv[1:-1]]
    assert shots[1] == ps.examples[0].filled and f"exactly {len(ps.examples[0].filled.split())} words" in shots[0]
    again = gen.variation_conversations(["a small bright bedroom with a wooden bed and white walls"], 0.5, seed=1)
    assert again == convs  # public randomness is seeded: a resumed run asks the same questions


def test_authors_defaults_jitter_36_floor_25_no_cap() -> None:
    s = VariationSettings()
    assert (s.word_count_std, s.min_words, s.max_words) == (36.0, 25, None)
    rng = np.random.default_rng(0)
    targets = np.array([s.target_words(200, rng) for _ in range(4000)])
    assert 198 < targets.mean() < 202 and 34 < targets.std() < 38
    assert targets.max() > 300  # no hard cap
    short = np.array([s.target_words(10, rng) for _ in range(4000)])
    assert short.min() == 25 and 0.6 < (short == 25).mean() < 0.75  # P(10 + N(0, 36) <= 25) ≈ 0.66
    capped = VariationSettings(max_words=60)
    assert max(capped.target_words(200, rng) for _ in range(100)) == 60


def test_token_budget_follows_the_target_length() -> None:
    s = VariationSettings()
    assert s.token_budget(25) == 80  # 2 tokens a word + 16 slack, rounded up to 16
    assert s.token_budget(200) == 416
    assert VariationSettings(max_new_tokens_limit=256).token_budget(200) == 256
    gen = LLMDescriptionGenerator(_Unused(), load_prompt_set("generic"))
    long_text = " ".join(["word"] * 150)
    budgets = gen.variation_budgets([long_text] * 50, 0.5, seed=4)
    words = [
        int(re.search(r"exactly (\d+) words", c[-1]["content"]).group(1))
        for c in gen.variation_conversations([long_text] * 50, 0.5, seed=4)
    ]
    assert budgets == [s.token_budget(w) for w in words]
    assert max(budgets) > 300 and len(set(budgets)) > 3


def test_min_words_and_rephrase_with_a_tone() -> None:
    ps = load_prompt_set("generic")
    gen = LLMDescriptionGenerator(_Unused(), ps, VariationSettings(word_count_std=0, min_words=25, rephrase_fraction=1))
    (conv,) = gen.variation_conversations(["a dog"], 0.5, seed=0)
    assert "exactly 25 words" in conv[-1]["content"]
    assert "Rephrase" in conv[-1]["content"]
    convs = gen.variation_conversations(["a dog on a beach"] * 60, 0.5, seed=1)
    used = {t for c in convs for t in ps.tones if t in c[-1]["content"]}
    assert all(any(t in c[-1]["content"] for t in ps.tones) for c in convs)
    assert len(used) >= len(ps.tones) - 2  # drawn uniformly from the set's list


def test_random_conversations_use_public_attributes() -> None:
    ps = load_prompt_set("faces")
    gen = LLMDescriptionGenerator(_Unused(), ps)
    convs, fallbacks = gen.random_conversations(200, seed=3)
    value_key = {v: k for k, v in ps.all_attributes()}
    assert len(convs) == 200
    for conv, fallback in zip(convs, fallbacks, strict=True):
        attribute = fallback.removeprefix(ps.subject + " ")
        assert fallback.startswith(ps.subject) and attribute in conv[-1]["content"]
        keys = [value_key[v] for v in attribute.split(", ")]
        assert len(keys) == 2 and len(set(keys)) == 2  # two values from two different keys
    assert len({f for f in fallbacks}) > 150  # rich vocabularies: prompts rarely repeat


def test_feature_cache_round_trip(tmp_path) -> None:
    cache = FeatureCache(tmp_path / "f.sqlite")
    cache.put_many({"a": np.arange(4, dtype=np.float32), "b": np.ones(4, np.float32)})
    cache.close()
    again = FeatureCache(tmp_path / "f.sqlite")
    got = again.get_many(["a", "b", "c"])
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], np.arange(4))
    assert len(again) == 2


def test_render_seed_depends_on_text_and_seed() -> None:
    assert render_seed("a", 0) == render_seed("a", 0)
    assert render_seed("a", 0) != render_seed("b", 0)
    assert render_seed("a", 0) != render_seed("a", 1)
