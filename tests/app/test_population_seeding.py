"""spti's use of the DP count and DP seeding: --population auto, --seeding, --max-private, per-round metrics."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from private_evolution import PrivacyLedger
from spti.cli import app
from spti.prompts import load_prompt_set
from spti.seeding import attribute_affinities, core_words, value_probabilities
from spti.testing.example_images import write_example_folder
from spti.text_evolution import LLMDescriptionGenerator

runner = CliRunner()


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_example_folder(tmp_path_factory.mktemp("p") / "faces", num_people=5, images_per_person=3, size=32)


def synth(folder: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["synthesize", str(folder), "--output", str(out), "--preset", "smoke", *extra])


# --------------------------------------------------------------------------------------------
# matching captions to public attribute values (a function of one caption: sensitivity stays 1)
# --------------------------------------------------------------------------------------------
def test_attribute_matching_works_clause_by_clause() -> None:
    ps = load_prompt_set("bedrooms")
    pairs = ps.all_attributes()
    caps = [
        "A cozy bedroom with pale blue walls and crisp white linen on a king-size bed.",
        "white linen, charcoal grey walls",
        "A kitchen with nothing relevant.",
    ]
    matched = [{pairs[j][1] for j in np.flatnonzero(row)} for row in attribute_affinities(caps, ps)]
    assert {"with pale blue walls", "with crisp white linen", "with a king-size bed"} <= matched[0]
    assert "with white walls" not in matched[1] and "with charcoal grey walls" in matched[1]
    assert matched[2] == set()
    assert core_words("with pale blue walls") == ("pale", "blue", "wall")


def _matched(caption: str) -> dict[str, set[str]]:
    ps = load_prompt_set("bedrooms")
    pairs = ps.all_attributes()
    out: dict[str, set[str]] = {}
    for j in np.flatnonzero(attribute_affinities([caption], ps)[0]):
        out.setdefault(pairs[j][0], set()).add(pairs[j][1])
    return out


def test_paraphrased_captions_match_the_values_they_mean() -> None:
    m = _matched("A rustic bedroom with walls painted dusty blue. A queen bed is made up with white sheets.")
    assert m["style"] == {"in a rustic farmhouse style"}  # a modifier and the subject's noun
    assert m["bedding"] == {"with crisp white linen"}  # "white" + a bedding noun
    assert m["wall_colour"] == {"with pale blue walls", "with sky blue walls", "with navy blue walls"}
    assert m["bed"] == {"with a queen-size bed"}  # "queen-size" is also "queen"
    assert _matched("There is a thick carpet.")["floor"] == {"with beige carpet", "with grey carpet"}
    # nouns that other values only locate things by do not match them
    walls = _matched("Walls painted navy blue surround the room.")
    assert "decor" not in walls and "style" not in walls  # no "wall mirror", no "child's room"
    assert "window_light" not in _matched("A large king bed stands in the middle.")  # not "...on the bed"


def test_a_key_weighs_one_however_many_values_tie() -> None:
    ps = load_prompt_set("bedrooms")
    row = attribute_affinities(["Walls painted dusty blue, with a thick carpet."], ps)[0]
    keys = [k for k, _ in ps.all_attributes()]
    per_key = {k: row[[i for i, kk in enumerate(keys) if kk == k]].sum() for k in ps.attributes}
    assert per_key["wall_colour"] == pytest.approx(1.0) and per_key["floor"] == pytest.approx(1.0)
    assert (row > 0).sum() == 5 and per_key["bed"] == 0


def test_seeding_draws_estimate_how_often_each_key_is_mentioned() -> None:
    ps = load_prompt_set("bedrooms")
    captions = ["A bedroom with sage green walls and a double bed."] * 50 + ["A bedroom with white walls."] * 50
    from private_evolution.histogram import weight_histogram
    from spti.seeding import seeding_draws

    draws = seeding_draws(weight_histogram(attribute_affinities(captions, ps)), ps, uniform_mix=0.0)
    assert draws.mention["wall_colour"] == pytest.approx(1.0)
    # half the captions name a bed; each of their two keys weighs 1/sqrt(2) after the L2 scaling,
    # so the estimate reads (50/sqrt(2)) / (50 + 50/sqrt(2)) = 0.41: rates are right when captions
    # mention about as many keys each, and low for keys named mostly by long captions
    assert draws.mention["bed"] == pytest.approx(0.414, abs=0.01) and draws.mention["camera"] == 0.0
    walls = dict(zip(ps.attributes["wall_colour"], draws.values["wall_colour"], strict=True))
    assert walls["with sage green walls"] == pytest.approx(0.414, abs=0.01)  # the same 1/sqrt(2) weight


def test_conditioned_random_api_draws_the_seeded_values() -> None:
    ps = load_prompt_set("bedrooms")
    pairs = ps.all_attributes()
    histogram = np.zeros(len(pairs))
    blue = pairs.index(("wall_colour", "with navy blue walls"))
    histogram[blue] = 50.0
    probabilities = value_probabilities(histogram, ps)
    assert probabilities["wall_colour"].max() == pytest.approx(0.8 + 0.2 / len(ps.attributes["wall_colour"]))
    np.testing.assert_allclose(probabilities["bed"], 1 / len(ps.attributes["bed"]))  # unmentioned: uniform

    generator = LLMDescriptionGenerator(llm=None, prompts=ps)  # type: ignore[arg-type]
    before, _ = generator.random_conversations(400, seed=1)
    generator.condition(histogram)
    after, _ = generator.random_conversations(400, seed=1)

    def share(conversations: list) -> float:  # type: ignore[type-arg]
        walls = ps.attributes["wall_colour"]
        wall = [c for c in conversations if any(v in c[-1]["content"] for v in walls)]
        return sum("navy blue walls" in c[-1]["content"] for c in wall) / max(len(wall), 1)

    assert share(before) < 0.15 and share(after) > 0.7


# --------------------------------------------------------------------------------------------
# end to end on the smoke preset
# --------------------------------------------------------------------------------------------
def test_seeding_population_auto_and_round_metrics(faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(faces, out, "--population", "auto", "--epsilon", "8")
    assert result.exit_code == 0, result.output
    assert "population auto:" in result.output and "DP count of privacy units" in result.output
    privacy = json.loads((out / "release" / "privacy.json").read_text())
    assert privacy["seeding"]["used"] and privacy["population"]["mode"] == "auto"
    generation = privacy["generation_fallbacks"]
    reasons = {k: v for k, v in generation.items() if k.startswith("junk_")}
    # the tiny random LLM writes junk: each reason is counted, and they add up to the junk counts
    assert sum(reasons.values()) == generation["random_junk"] + generation["vary_junk"] > 0
    # released attribute templates are counted in a warning (a reviewer sees how much is not LLM prose)
    from spti.prompts import load_prompt_set
    from spti.text_evolution import is_attribute_template

    released = [json.loads(line)["text"] for line in (out / "release" / "captions.jsonl").read_text().splitlines()]
    import tomllib

    domain = tomllib.loads((out / "config.toml").read_text()).get("domain", "generic")
    templates = sum(is_attribute_template(t, load_prompt_set(domain)) for t in released)
    said = [w for w in privacy["warnings"] if "attribute template" in w]
    # How many there are depends on the noisy selection: the random API's fallbacks are templates, but
    # the tiny LLM's variations of them that pass the junk checks are not, and at this size the votes
    # are mostly noise (CI once released none). The warning must match the release either way;
    # tests/app/test_release_warnings.py pins the counting on fixed texts.
    assert privacy["attribute_templates_in_release"] == templates
    if templates:
        assert len(said) == 1 and said[0].startswith(f"{templates} of {len(released)} released descriptions")
    else:
        assert said == []
    ledger = PrivacyLedger.load(out / "state" / "pe" / "ledger.json")
    assert ledger.names()[:2] == ["unit_count", "seeding"]
    assert (out / "state" / "pe" / "seeding.npz").exists()
    metrics = out / "private" / "metrics_by_round.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(privacy["iterations"]))
    assert all(r["fd_voting_space"] is None or r["fd_voting_space"] >= 0 for r in rows)
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o600


def test_seeding_none_releases_no_seeding(faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(faces, out, "--seeding", "none")
    assert result.exit_code == 0, result.output
    privacy = json.loads((out / "release" / "privacy.json").read_text())
    assert not privacy["seeding"]["used"]
    assert "seeding" not in PrivacyLedger.load(out / "state" / "pe" / "ledger.json")


def test_max_private_votes_with_a_random_subset_kept_across_resume(faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(faces, out, "--max-private", "6")
    assert result.exit_code == 0, result.output
    subset = json.loads((out / "private" / "subset.json").read_text())
    manifest = json.loads((out / "private" / "manifest.json").read_text())
    assert len(subset) == 6 and {im["unit"] for im in manifest["images"]} == set(subset)
    again = runner.invoke(app, ["synthesize", str(faces), "--output", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "private" / "subset.json").read_text()) == subset
    # two draws of the subset differ (OS entropy, not --seed)
    other = tmp_path / "other"
    assert synth(faces, other, "--max-private", "6").exit_code == 0
    draws = {tuple(subset), tuple(json.loads((other / "private" / "subset.json").read_text()))}
    assert len(draws) in (1, 2)  # may coincide by chance (1 in C(15, 6) = 5005)
