"""The stage commands on their own: caption, evolve (also with bring-your-own captions), render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.cli import app
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


def invoke(*args: str):
    return runner.invoke(app, [*args, "--quiet"])


def test_caption_then_evolve_then_render(tmp_path: Path) -> None:
    private = write_example_folder(tmp_path / "private", num_people=3, images_per_person=3, size=32)
    run = tmp_path / "run"
    r = invoke("caption", str(private), "--output", str(run), "--preset", "smoke")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "private" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    assert not (run / "release" / "captions.jsonl").exists()

    r = invoke("evolve", str(run))
    assert r.exit_code == 0, r.output
    released = [json.loads(x) for x in (run / "release" / "captions.jsonl").read_text().splitlines()]
    assert len(released) == 8
    assert json.loads((run / "release" / "privacy.json").read_text())["epsilon"] <= 1.0
    assert not (run / "release" / "images").exists()
    again = invoke("evolve", str(run))
    assert again.exit_code == 2
    assert "already released" in again.output

    r = invoke("render", str(run), "--upscale", "1")
    assert r.exit_code == 0, r.output
    assert len(list((run / "release" / "images").glob("*.png"))) == 8


def test_evolve_with_own_captions(tmp_path: Path) -> None:
    captions = tmp_path / "mine.jsonl"
    captions.write_text(
        "\n".join(
            json.dumps({"id": f"img{i}", "caption": f"a photo of a red bicycle number {i} near a wall", "unit": i // 2})
            for i in range(20)
        )
    )
    run = tmp_path / "run"
    r = invoke("evolve", "--captions", str(captions), "--output", str(run), "--preset", "smoke", "--epsilon", "2")
    assert r.exit_code == 0, r.output
    privacy = json.loads((run / "release" / "privacy.json").read_text())
    assert privacy["unit_source"] == "captions file 'unit' field"
    assert abs(privacy["unit_count"]["value"] - 10) <= 6 * privacy["unit_count"]["noise_multiplier"]
    assert privacy["epsilon"] <= 2.0


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json\n", "not valid JSON"), ('{"id": 1}\n', "no 'caption'"), ("", "holds no captions")],
)
def test_evolve_rejects_bad_caption_files(tmp_path: Path, content: str, message: str) -> None:
    captions = tmp_path / "bad.jsonl"
    captions.write_text(content)
    r = invoke("evolve", "--captions", str(captions), "--output", str(tmp_path / "run"), "--preset", "smoke")
    assert r.exit_code == 2
    assert message in r.output


def test_render_needs_released_descriptions(tmp_path: Path) -> None:
    private = write_example_folder(tmp_path / "private", num_people=2, images_per_person=2, size=32)
    run = tmp_path / "run"
    assert invoke("caption", str(private), "--output", str(run), "--preset", "smoke").exit_code == 0
    r = invoke("render", str(run))
    assert r.exit_code == 2
    assert "spti evolve" in r.output
