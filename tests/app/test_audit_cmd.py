"""`spti audit`: catches planted copies (images and captions) and a leaky pipeline, stays quiet on a
clean release, and writes only under RUN_DIR/private/ with every output marked NOT DP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from spti.audit import CANARY_PREFIX, AuditSettings, run_audit, run_canary_audit, text_overlap
from spti.cli_audit import register
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    local = typer.Typer()

    @local.callback()
    def _root() -> None:  # a group, so the command is invoked by name as under `spti`
        pass

    register(local)
    return local


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """Share the smoke preset's tiny models across runs (the canary audit reruns the pipeline)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))
        yield


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> str:
    from spti.testing.tiny_vision import build_tiny_clip_vision

    return "clip:" + str(build_tiny_clip_vision(tmp_path_factory.mktemp("models") / "clip"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_env) -> Path:
    """One smoke run (text voting, so private captions exist); tests audit copies of it."""
    from spti.cli import app as spti_app

    private = write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=5, images_per_person=3, size=32
    )
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = runner.invoke(spti_app, ["synthesize", str(private), "--output", str(out), "--preset", "smoke", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(smoke_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def private_root(run: Path) -> Path:
    return Path(json.loads((run / "private" / "manifest.json").read_text())["root"])


def check_outputs(run: Path, release_before: dict) -> dict:
    assert snapshot(run / "release") == release_before, "the audit must not touch release/"
    report = json.loads((run / "private" / "audit.json").read_text())
    assert report["not_dp"] is True
    assert "NOT differentially private" in (run / "private" / "audit.html").read_text()
    assert (run / "private" / "audit_neighbours.jsonl").exists()
    assert not list((run / "release").rglob("audit*"))
    return report


def test_clean_release_is_not_flagged(app, run: Path, clip_spec: str) -> None:
    before = snapshot(run / "release")
    result = runner.invoke(app, ["audit", str(run), "--features", f"wavelet,{clip_spec}", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    report = check_outputs(run, before)
    assert printed["verdict"] == report["verdict"]
    assert report["extractors"] == ["wavelet", clip_spec]
    assert report["verdict"]["memorization_suspected"] is False
    assert report["verdict"]["text_copy_suspected"] is False
    assert report["num_flagged"] == 0
    assert report["pixel"]["num_near_duplicates"] == 0
    assert report["num_released_images"] == 8
    assert report["num_private_images"] == 15
    for f in report["features"].values():
        assert f["folds"]["A"]["threshold"] > 0
    assert "not differentially private" in result.stderr.lower()


def test_planted_exact_and_near_copies_are_flagged(run: Path, clip_spec: str) -> None:
    source = private_root(run)
    exact, near = "person_02/002.png", "person_04/001.png"
    images = run / "release" / "images"
    shutil.copyfile(source / exact, images / "00002.png")
    with Image.open(source / near) as im:
        original = im.convert("RGB")
    shifted = Image.new("RGB", original.size, original.getpixel((0, 0)))
    shifted.paste(original, (1, 1))  # moved by a pixel, brighter, and rendered at 2× like a release
    ImageEnhance.Brightness(shifted).enhance(1.12).resize((64, 64), Image.Resampling.LANCZOS).save(images / "00005.png")
    before = snapshot(run / "release")

    run_audit(run, settings=AuditSettings(features=("wavelet", clip_spec)))
    report = check_outputs(run, before)
    flagged = {item["released"]: item for item in report["flagged"]}
    assert {"images/00002.png", "images/00005.png"} <= set(flagged)
    assert flagged["images/00002.png"]["pixel"] == {"private": exact, "ncc": pytest.approx(1.0)}
    assert flagged["images/00005.png"]["pixel"]["private"] == near
    for item in (flagged["images/00002.png"], flagged["images/00005.png"]):
        assert "pixel_near_duplicate" in item["reasons"]
    # the exact copy is also at distance 0 in both feature spaces, below every threshold
    for spec in ("wavelet", clip_spec):
        assert flagged["images/00002.png"][spec]["private"] == exact
        assert flagged["images/00002.png"][spec]["distance"] == pytest.approx(0.0, abs=1e-4)
        assert f"closer_than_fresh:{spec}" in flagged["images/00002.png"]["reasons"]
    assert report["pixel"]["num_near_duplicates"] == 2
    assert report["verdict"]["memorization_suspected"] is True
    assert "2 released image(s)" in report["verdict"]["summary"]
    html = (run / "private" / "audit.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # histogram + both pairs side by side


def test_verbatim_caption_in_release_is_flagged(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "private" / "captions.jsonl").read_text().splitlines()]
    secret = rows[4]["caption"]
    unrelated = [
        "a wooden rowing boat pulled up on a pebble beach under a grey sky",
        "three oranges and a knife on a blue kitchen table",
        "a cyclist in a yellow jacket waiting at a red traffic light",
    ]
    released = [{"index": i, "id": f"x{i}", "text": t, "votes": 1.0} for i, t in enumerate(unrelated)]
    released.insert(1, {"index": 9, "id": "leak", "text": secret, "votes": 1.0})
    (run / "release" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in released))
    before = snapshot(run / "release")

    run_audit(run, settings=AuditSettings(features=("wavelet",)))
    report = check_outputs(run, before)
    text = report["text"]
    assert text["num_verbatim"] == 1
    assert text["num_near_verbatim"] == 0
    assert [(f["index"], f["kind"], f["private"]) for f in text["flagged"]] == [(9, "verbatim", rows[4]["relpath"])]
    assert report["verdict"]["text_copy_suspected"] is True
    assert "reference" in text
    assert secret in (run / "private" / "audit.html").read_text()


def test_text_overlap_near_verbatim_and_unrelated() -> None:
    private = [
        "a smiling woman with curly red hair wearing round glasses in front of a green wall",
        "an old man with a grey beard and a dark blue cap looking to the left",
        "a young boy with short brown hair and a striped shirt laughing",
    ]
    released = [
        "portrait: an old man with a grey beard and a dark blue cap, studio light",  # a 12-word run
        "a red bicycle leaning on a fence beside a field of sunflowers at dusk",
        "A smiling woman with curly red hair wearing round glasses in front of a green wall.",  # case/punct only
    ]
    out = text_overlap(released, private)
    rows = out["items"]
    assert rows[0]["near_verbatim"] and not rows[0]["verbatim"]
    assert rows[0]["lcs_words"] == 12
    assert rows[0]["shared"].startswith("an old man")
    assert not rows[1]["near_verbatim"] and not rows[1]["verbatim"]
    assert rows[1]["overlap"]["8"] == 0.0
    assert rows[2]["verbatim"]
    assert out["num_verbatim"] == 1 and out["num_near_verbatim"] == 1


def test_text_only_release_needs_no_private_folder(run: Path) -> None:
    """A release of descriptions only (evolve without render) is audited from the captions alone."""
    shutil.rmtree(run / "release" / "images")
    (run / "private" / "manifest.json").unlink()
    report = run_audit(run, settings=AuditSettings(features=("wavelet",)))
    assert report["private_dir"] is None
    assert report["num_released_images"] == 0
    assert report["text"]["num_private"] == 15
    assert "no image check" in report["verdict"]["summary"]


def test_release_level_tests_separate_copies_from_fresh_samples() -> None:
    """Many released copies make the release suspect; fresh draws of the same distribution do not."""
    import numpy as np

    from spti.audit import _feature_audit, _ImageSet, split_units

    rng = np.random.default_rng(7)
    private = _ImageSet([f"p{i}" for i in range(400)], [], [f"u{i}" for i in range(400)])
    private.features["g"] = rng.normal(size=(400, 8)).astype(np.float32)
    in_a = split_units(private.units, 0)
    settings = AuditSettings(features=("g",))

    fresh = _ImageSet([f"r{i}" for i in range(100)], [], [])
    fresh.features["g"] = rng.normal(size=(100, 8)).astype(np.float32)
    clean = _feature_audit("g", fresh, private, in_a, settings)
    assert not clean["suspected"] and not clean["closer_than_fresh"]
    assert clean["fraction_flagged"] <= 3 * clean["expected_fraction_at_most"]

    leaky = _ImageSet(fresh.names, [], [])
    leaky.features["g"] = fresh.features["g"].copy()
    leaky.features["g"][:20] = private.features["g"][rng.choice(400, 20, replace=False)]
    audit = _feature_audit("g", leaky, private, in_a, settings)
    assert audit["suspected"]
    assert audit["excess_p"] < 1e-6
    assert audit["closer_than_fresh_p"] < clean["closer_than_fresh_p"]
    assert audit["_below"][:20].all()


def test_canary_audit_catches_a_leaky_pipeline(run: Path, clip_spec: str, tiny_env) -> None:
    """A pipeline that copies its private canaries into the release is caught; unplanted ones are not."""
    from spti.pipeline import synthesize

    def leaky(cfg, private_dir, target, reporter):
        summary = synthesize(cfg, private_dir, target, reporter)
        canaries = sorted(private_dir.glob(f"{CANARY_PREFIX}*/canary.png"))
        for src, dst in zip(canaries, sorted((target.release / "images").glob("*.png")), strict=False):
            with Image.open(src) as im:
                im.convert("RGB").resize((64, 64)).save(dst)
        return summary

    source = private_root(run)
    before_private = snapshot(source)
    before = snapshot(run / "release")
    out = run_canary_audit(run, None, 3, settings=AuditSettings(features=("wavelet", clip_spec)), pipeline=leaky)
    assert snapshot(run / "release") == before
    assert snapshot(source) == before_private, "the user's private folder must not change"
    assert out["not_dp"] is True
    assert out["counts"] == {
        "planted_matched": 3,
        "held_out_matched": 0,
        "control_matched": 0,
        "planted": 3,
        "held_out": 3,
    }
    assert out["ratio"] is None and out["ratio_note"] == "no control matched: unbounded"
    assert "K ≥ 5" in out["statement"]  # too few canaries to bound ε: said, not hidden
    work = run / "private" / "canary_audit"
    assert json.loads((work / "canary_audit.json").read_text())["counts"]["planted_matched"] == 3
    assert not (work / "private_copy").exists()
    for name in ("run_control", "run_canaries"):
        assert len(list((work / name / "audit_outputs" / "images").glob("*.png"))) == 8
    canary_privacy = json.loads((work / "run_canaries" / "audit_outputs" / "privacy.json").read_text())
    assert "num_units" not in canary_privacy and canary_privacy["unit_count"] is not None
    check_private_tree(run)


def check_private_tree(run: Path) -> None:
    """The canary runs are more uses of the private data: nothing of them is named or moded as a release."""
    work = run / "private" / "canary_audit"
    assert not [p for p in work.rglob("*") if p.name == "release"], "a canary run's outputs are not a release"
    for p in (run / "private").rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p} has mode {oct(mode)}"


def test_cli_canary_audit_end_to_end(app, run: Path, tiny_env) -> None:
    before = snapshot(run / "release")
    from spti.rundir import RunDirectory

    eps = RunDirectory(run).load_config().epsilon
    result = runner.invoke(app, ["audit", str(run), "--features", "wavelet", "--canaries", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "canaries: planted matched" in result.stdout
    # the privacy cost is said first, in one line, before any work
    first = result.stderr.splitlines()[0]
    assert first.startswith("audit --canaries: reruns the pipeline twice on the same private data"), first
    assert f"twice the run's ε again (2×{eps:g} = {2 * eps:g} more" in first
    check_private_tree(run)
    report = check_outputs(run, before)
    canary = report["canary"]
    assert set(canary["counts"]) == {"planted_matched", "held_out_matched", "control_matched", "planted", "held_out"}
    assert canary["counts"]["planted"] == 2
    assert canary["not_dp"] is True
    assert len(canary["planted"]) == len(canary["held_out"]) == 2
    assert "Canary audit" in (run / "private" / "audit.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--features", " , "], "--features"),
        (["--features", "wavelet,wavelet"], "twice"),
        (["--features", "wavelet,sift"], "unknown image embedder"),
        (["--percentile", "70"], "--percentile"),
        (["--private", "/nonexistent/folder"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(app, smoke_run: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["audit", str(smoke_run), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_not_a_run(app, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2
    assert "not an spti run directory" in result.output
