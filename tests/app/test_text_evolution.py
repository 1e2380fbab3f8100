"""The text PE pieces that need no model: masking, cleaning, prompt sets, conversations, caches."""

from __future__ import annotations

import numpy as np
import pytest

from spti.errors import SptiError
from spti.prompts import SHIPPED_DOMAINS, load_prompt_set
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
    assert ps.all_attributes()
    assert ps.examples


def test_user_prompt_set_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(SptiError, match="not found"):
        load_prompt_set(tmp_path / "nope")
    bad = tmp_path / "prompts.toml"
    from pathlib import Path

    text = Path(load_prompt_set("generic").source).read_text()
    bad.write_text(text.replace("{masked}", "{maskd}"))
    with pytest.raises(SptiError, match="unknown placeholder") as err:
        load_prompt_set(tmp_path)
    assert str(bad) in str(err.value)


def test_mask_words_probability_and_at_least_one_blank() -> None:
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(2000))
    masked = mask_words(text, 0.5, rng).split()
    assert len(masked) == 2000
    assert 0.45 < masked.count("_") / 2000 < 0.55
    kept = [w for w in masked if w != "_"]
    assert all(w.startswith("w") for w in kept)
    assert mask_words("one", 0.0001, rng) == "_"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('Description: "A red car parked."\nMore text', "A red car parked."),
        ("\n\n  a   cat\tsleeping ", "a cat sleeping"),
        ("", None),
        (None, None),
        ("   \n  ", None),
    ],
)
def test_clean_description(raw, expected) -> None:
    assert clean_description(raw, max_words=60) == expected


def test_clean_description_truncates() -> None:
    assert clean_description("a " * 100, max_words=5) == "a a a a a"


class _Unused:
    def generate(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError


def test_variation_conversation_shape_and_word_count() -> None:
    ps = load_prompt_set("bedrooms")
    gen = LLMDescriptionGenerator(_Unused(), ps, VariationSettings(word_count_std=0.0, min_words=5, max_words=60))
    convs = gen.variation_conversations(["a small bright bedroom with a wooden bed and white walls"], 0.5, seed=1)
    (conv,) = convs
    assert conv[0]["role"] == "system"
    # few-shot pairs, then the request
    assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * len(ps.examples) + ["user"]
    assert "about 11 words" in conv[-1]["content"]
    assert "_" in conv[-1]["content"]
    again = gen.variation_conversations(["a small bright bedroom with a wooden bed and white walls"], 0.5, seed=1)
    assert again == convs  # public randomness is seeded: a resumed run asks the same questions


def test_min_words_and_rephrase() -> None:
    ps = load_prompt_set("generic")
    gen = LLMDescriptionGenerator(_Unused(), ps, VariationSettings(word_count_std=0, min_words=25, rephrase_fraction=1))
    (conv,) = gen.variation_conversations(["a dog"], 0.5, seed=0)
    assert "about 25 words" in conv[-1]["content"]
    assert "Rephrase" in conv[-1]["content"]


def test_random_conversations_use_public_attributes() -> None:
    ps = load_prompt_set("faces")
    gen = LLMDescriptionGenerator(_Unused(), ps)
    convs, fallbacks = gen.random_conversations(50, seed=3)
    values = {v for _, v in ps.all_attributes()}
    assert len(convs) == 50
    assert all(any(v in c[-1]["content"] for v in values) for c in convs)
    assert all(f.startswith(ps.subject) for f in fallbacks)


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
