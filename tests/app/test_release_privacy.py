"""What `spti` releases on neighbouring folders: nothing may depend on the exact number of units.

Under add/remove-one-unit DP the number of units N is private. Two smoke runs with the same seed,
on a folder and on the same folder with one image removed, may differ only through DP releases
(the noisy count, the noisy votes and what is selected with them): every other field of
privacy.json must be equal, and no field may equal or invert to N.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spti.cli import app
from spti.testing.example_images import write_example_folder

runner = CliRunner()

# Fields that are functions of DP releases (or of the clock), and so may differ between neighbours.
DP_DERIVED = {"unit_count", "conventional_delta", "warnings", "captions_sha256", "generation_fallbacks", "created_at"}
# read from the released texts alone (post-processing of the noisy selection)
DP_DERIVED |= {"junk_in_release", "attribute_templates_in_release"}


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    if isinstance(obj, str):
        return [float(m) for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", obj)]
    return []


def _run(folder: Path, out: Path) -> dict[str, Any]:
    result = runner.invoke(app, ["synthesize", str(folder), "--output", str(out), "--quiet", "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "release" / "privacy.json").read_text())


def test_neighbouring_folders_release_nothing_that_depends_on_the_exact_count(tmp_path: Path) -> None:
    folder = write_example_folder(tmp_path / "faces", num_people=4, images_per_person=3, size=32)
    neighbour = tmp_path / "faces_minus_one"
    shutil.copytree(folder, neighbour)
    removed = sorted(neighbour.rglob("*.png"))[0]
    removed.unlink()
    n = len(list(folder.rglob("*.png")))

    a, b = _run(folder, tmp_path / "run_a"), _run(neighbour, tmp_path / "run_b")
    assert "num_units" not in a
    for key in sorted(set(a) | set(b)):
        if key not in DP_DERIVED and key != "versions":
            assert a.get(key) == b.get(key), f"privacy.json field {key!r} differs between neighbouring folders"
    # nothing public equals N or N−1, or inverts to it through δ = 1/(N ln N)
    for release, count in ((a, n), (b, n - 1)):
        public = {k: v for k, v in release.items() if k not in DP_DERIVED}
        numbers = _numbers(public)
        assert float(count) not in numbers
        assert not any(math.isclose(x, 1 / (count * math.log(count)), rel_tol=1e-6) for x in numbers)
        assert release["delta"] == 1e-6
    # the DP count is noisy and says so
    assert a["unit_count"]["noise_multiplier"] > 1.0
    for name in ("run_a", "run_b"):
        report = (tmp_path / name / "release" / "report.html").read_text()
        assert "units voted" not in report
        statement = re.search(r"<p class=\"(?:dp|notdp)\">(.*?)</p>", report, re.S)
        assert statement is not None
        masked = statement.group(1).replace(str(a["unit_count"]["value"]), "X")
        masked = masked.replace(f"{b['unit_count']['value']:.6g}", "X").replace(f"{a['unit_count']['value']:.6g}", "X")
        numbers = re.findall(r"\d+(?:\.\d+)?", masked)
        assert str(n) not in numbers and str(n - 1) not in numbers


# --------------------------------------------------------------------------------------------
# A finished run whose state was damaged: refused, never redrawn into the same release/
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    folder = write_example_folder(root / "faces", num_people=3, images_per_person=3, size=32)
    out = root / "run"
    result = runner.invoke(app, ["synthesize", str(folder), "--output", str(out), "--quiet", "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def _release_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "release").rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("state/pe/round_001/histogram.npz", "never drawn again"),
        ("state/pe/config.json", "must not be started"),
        ("state/pe", "ledger"),
        ("state/pe/ledger.json", "ledger"),
    ],
)
def test_damaged_state_is_refused_and_the_ledger_kept(
    finished_run: Path, tmp_path: Path, damage: str, message: str
) -> None:
    run = _copy_run(finished_run, tmp_path)
    ledger = run / "state" / "pe" / "ledger.json"
    ledger_before = ledger.read_bytes()
    release_before = _release_bytes(run)
    target = run / damage
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = runner.invoke(app, ["evolve", str(run), "--resume", "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    if damage != "state/pe/ledger.json" and damage != "state/pe":
        assert ledger.read_bytes() == ledger_before  # nothing charged, nothing drawn
    # and the whole pipeline never redraws into the existing release either
    folder = finished_run.parent / "faces"
    again = runner.invoke(app, ["synthesize", str(folder), "--output", str(run), "--resume", "--quiet"])
    assert _release_bytes(run) == release_before
    if damage in ("state/pe", "state/pe/ledger.json"):
        assert again.exit_code == 2 and "ledger" in again.output


def test_release_that_no_longer_matches_its_ledger_is_refused(finished_run: Path, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path)
    captions = run / "release" / "captions.jsonl"
    captions.write_text(captions.read_text().replace('"text": "', '"text": "edited ', 1))
    result = runner.invoke(app, ["render", str(run), "--quiet"])
    assert result.exit_code == 2 and "does not match" in result.output
