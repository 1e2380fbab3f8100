"""release/report.html as a reviewer sees it, in headless Chromium (Debian's chromium package)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from spti.cli import app
from spti.testing.browser import find_browser, inspect_page
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    folder = write_example_folder(root / "faces", num_people=4, images_per_person=3, size=32)
    out = {}
    for name, extra in (("dp", []), ("inf", ["--epsilon", "inf"])):
        run = root / name
        result = runner.invoke(
            app, ["synthesize", str(folder), "--output", str(run), "--preset", "smoke", "--quiet", *extra]
        )
        assert result.exit_code == 0, result.output
        out[name] = run
    return out


PAGE_CHECKS = {
    "images": "document.images.length",
    "broken": "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length",
    "statement_on_first_screen": (
        "(() => { const r = document.getElementById('privacy-statement').getBoundingClientRect();"
        " return r.top >= 0 && r.bottom <= window.innerHeight; })()"
    ),
    "first_heading": "document.querySelector('h2').textContent",
    "text": "document.body.innerText",
}


@pytest.mark.skipif(find_browser() is None, reason="needs Chromium (apt-get install chromium)")
def test_report_in_a_browser(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["dp"]
    check = inspect_page(run / "release" / "report.html", PAGE_CHECKS)
    shot = tmp_path / "report.png"
    shot.write_bytes(check.screenshot)
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
    values = check.values
    assert values["images"] == 8 and values["broken"] == 0
    assert values["statement_on_first_screen"] is True
    assert values["first_heading"] == "Privacy statement"
    text = values["text"]
    assert "differentially private" in text and "DP count" in text
    # no Python reprs in front of a reviewer
    assert not re.search(r"\bNone\b|\[[0-9.]+\]|\{'|': ", text), text


@pytest.mark.skipif(find_browser() is None, reason="needs Chromium (apt-get install chromium)")
def test_infinite_epsilon_report_says_not_private(runs: dict[str, Path]) -> None:
    run = runs["inf"]
    privacy = json.loads((run / "release" / "privacy.json").read_text())
    assert privacy["differentially_private"] is False
    assert privacy["warnings"][0].startswith("epsilon is infinite")
    check = inspect_page(run / "release" / "report.html", PAGE_CHECKS)
    assert "NOT DIFFERENTIALLY PRIVATE" in check.values["text"]
    assert check.values["statement_on_first_screen"] is True


def test_contact_sheet_is_labelled(runs: dict[str, Path]) -> None:
    from spti.report import write_contact_sheet

    images = sorted((runs["dp"] / "release" / "images").glob("*.png"))
    out = runs["dp"] / "sheet_test.png"
    write_contact_sheet(images, out, max_images=5)
    with Image.open(out) as im:
        w, h = im.size
        # 5 thumbnails of 128 px in one row, a title line and an index line under each tile
        assert w == 5 * 132 + 4 and h > 128 + 20
        title = im.crop((0, 0, w, 18)).convert("L")
        assert title.getextrema()[0] < 128  # the "5 of 8 released images" line is drawn
