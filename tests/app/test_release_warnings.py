"""The warnings privacy.json gives about what the released texts are (junk, attribute templates)."""

from __future__ import annotations

from spti.config import RunConfig
from spti.prompts import load_prompt_set
from spti.release import inspect_released_texts

PROSE = "A smiling woman with short curly hair stands in front of a brick wall under soft window light."


def _template(*values: str) -> str:
    return f"{load_prompt_set('faces').subject} " + ", ".join(values)


def test_attribute_templates_are_counted_and_named_in_one_warning() -> None:
    texts = [
        _template("who is a teenager", "in their thirties"),
        PROSE,
        _template("who is elderly", "in their sixties"),
    ]
    released = inspect_released_texts(texts, RunConfig(domain="faces"))
    assert released.templates == 2 and released.junk == {}
    (warning,) = released.warnings()
    assert warning.startswith("2 of 3 released descriptions are the attribute template")


def test_prose_that_merely_starts_with_the_subject_is_not_a_template() -> None:
    # a value that is not in the public lists makes it LLM prose, even after the subject phrase
    texts = [_template("who is a teenager", "smiling at a friend off camera"), PROSE]
    released = inspect_released_texts(texts, RunConfig(domain="faces"))
    assert released.templates == 0 and released.warnings() == []


def test_junk_is_counted_by_reason() -> None:
    texts = [PROSE, "Here is a description of a person with _ hair and _ eyes looking at the camera today."]
    released = inspect_released_texts(texts, RunConfig(domain="faces"))
    assert released.junk == {"blanks": 1} and released.templates == 0
    (warning,) = released.warnings()
    assert warning.startswith("1 released descriptions look like junk LLM answers")


def test_an_unknown_domain_counts_no_templates() -> None:
    released = inspect_released_texts([PROSE], RunConfig(domain="generic"))
    assert released.templates == 0
