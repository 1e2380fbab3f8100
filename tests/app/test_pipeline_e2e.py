"""End to end: `spti synthesize` with the offline smoke preset and with a loopback OpenAI server.

Both voting modes, interrupt-and-resume at every stage (no stage redone, no request sent twice,
no privacy spent twice), and a private folder full of bad files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from private_evolution import PrivacyLedger
from spti.cli import app
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    return write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=5, images_per_person=3, size=32
    )


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    """Build the smoke preset's tiny models once per session; every run loads them from there."""
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


def synth(private: Path, out: Path, *extra: str) -> object:
    result = runner.invoke(app, ["synthesize", str(private), "--output", str(out), "--quiet", *extra])
    return result


def check_release(run: Path, num_samples: int, epsilon: float) -> dict:
    images = sorted((run / "release" / "images").glob("*.png"))
    assert len(images) == num_samples
    privacy = json.loads((run / "release" / "privacy.json").read_text())
    assert privacy["epsilon"] <= epsilon
    for key in (
        "epsilon",
        "delta",
        "noise_multiplier",
        "iterations",
        "privacy_unit",
        "unit_count",
        "ledger",
        "mechanism",
        "versions",
    ):
        assert key in privacy
    assert "num_units" not in privacy  # the exact number of units is private
    ledger = PrivacyLedger.load(run / "state" / "pe" / "ledger.json")
    # the rounds, the DP unit count and (text voting) the seeding release
    assert len(ledger) == privacy["iterations"] + 1 + int(privacy["seeding"]["used"])
    assert [r["name"] for r in privacy["ledger"]["releases"]] == ledger.names()
    assert (run / "release" / "contact_sheet.png").exists()
    report = (run / "release" / "report.html").read_text()
    assert "Privacy statement" in report
    # nothing private leaks into release/
    private_captions = (
        {json.loads(line)["caption"] for line in (run / "private" / "captions.jsonl").read_text().splitlines()}
        if (run / "private" / "captions.jsonl").exists()
        else set()
    )
    released = "\n".join(p.read_text() for p in (run / "release").glob("*.jsonl"))
    assert not any(c and c in released for c in private_captions if len(c) > 30)
    assert (run / "private" / "README.txt").exists()
    return privacy


def test_smoke_text_voting(private_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(private_folder, out, "--preset", "smoke")
    assert result.exit_code == 0, result.output
    privacy = check_release(out, 8, 1.0)
    assert abs(privacy["unit_count"]["value"] - 15) <= 6 * privacy["unit_count"]["noise_multiplier"]
    assert privacy["voting"] == "text"
    with Image.open(next((out / "release" / "images").glob("*.png"))) as im:
        assert im.size == (64, 64)  # 32² rendered, ×2 Lanczos
    # a finished run is not overwritten without --resume
    again = synth(private_folder, out, "--preset", "smoke")
    assert again.exit_code == 2
    assert "--resume" in again.output


def test_smoke_image_voting_folder_units(private_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(
        private_folder, out, "--preset", "smoke", "--voting", "image", "--privacy-unit", "folder", "--epsilon", "4"
    )
    assert result.exit_code == 0, result.output
    privacy = check_release(out, 8, 4.0)
    assert abs(privacy["unit_count"]["value"] - 5) <= 6 * privacy["unit_count"]["noise_multiplier"]
    assert privacy["privacy_unit"] == "folder"
    assert not (out / "private" / "captions.jsonl").exists()  # image voting needs no captions
    assert (out / "private" / "image_features.npy").exists()


class _Kill(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("stage", ["caption", "evolve", "render"])
def test_interrupt_and_resume_each_stage(private_folder: Path, tmp_path: Path, monkeypatch, stage: str) -> None:
    """Kill in the middle of a stage (second model call); --resume finishes without redoing work."""
    from spti.backends.local.images import DiffusersImageGenerator
    from spti.backends.local.text import HFCaptioner, HFTextGenerator

    cls, method = {
        "caption": (HFCaptioner, "caption"),
        "evolve": (HFTextGenerator, "generate"),
        "render": (DiffusersImageGenerator, "generate"),
    }[stage]
    original = getattr(cls, method)
    calls = {"before": 0, "after": 0, "phase": "before"}

    def counting(self, items, *args, **kwargs):
        calls[calls["phase"]] += len(items)
        if calls["phase"] == "before" and calls["before"] > len(items):  # die on the second call
            raise _Kill
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(cls, method, counting)
    out = tmp_path / "run"
    result = synth(private_folder, out, "--preset", "smoke", "--num-samples", "6", "--batch-size", "4")
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output
    calls["phase"] = "after"
    resumed = synth(private_folder, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    check_release(out, 6, 1.0)
    if stage == "caption":  # the first batch of 4 was kept: only the other 11 images are captioned again
        assert calls["after"] == 15 - 4
    if stage == "render":  # the first batch of 4 images was kept
        assert calls["after"] == 6 - 4


def test_kill_mid_evolve_never_spends_twice(private_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Die after the first noisy release; the resumed run re-reads it and ends with exactly T releases."""
    from private_evolution import loop

    out = tmp_path / "run"
    original = loop.PrivateEvolution._release
    seen: list[int] = []

    def release_then_die(self, t, *args, **kwargs):
        noisy, reused = original(self, t, *args, **kwargs)
        seen.append(t)
        if t == 1 and not reused:
            raise _Kill
        return noisy, reused

    monkeypatch.setattr(loop.PrivateEvolution, "_release", release_then_die)
    result = synth(private_folder, out, "--preset", "smoke", "--iterations", "3")
    assert result.exit_code == 130
    first = np.load(out / "state" / "pe" / "round_001" / "histogram.npz")["values"].copy()
    assert len(PrivacyLedger.load(out / "state" / "pe" / "ledger.json")) == 4  # count, seeding, rounds 0 and 1
    monkeypatch.setattr(loop.PrivateEvolution, "_release", original)
    resumed = synth(private_folder, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(np.load(out / "state" / "pe" / "round_001" / "histogram.npz")["values"], first)
    assert len(PrivacyLedger.load(out / "state" / "pe" / "ledger.json")) == 5
    check_release(out, 8, 1.0)


def test_bad_input_folder(tmp_path: Path) -> None:
    private = write_example_folder(tmp_path / "private", num_people=3, images_per_person=2, size=32)
    (private / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (private / "empty.jpg").write_bytes(b"")
    (private / "notes.txt").write_text("hello")
    (private / ".hidden.png").write_bytes(b"")
    out = tmp_path / "run"
    result = synth(private, out, "--preset", "smoke", "--num-samples", "4")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "private" / "manifest.json").read_text())
    skipped = {s["relpath"] for s in manifest["skipped"]}
    assert {"broken.png", "empty.jpg", "notes.txt"} <= skipped
    check_release(out, 4, 1.0)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("no_images", "no valid image"),
        ("inside", "inside"),
        ("few_units", "delta must stay below 1/n"),
    ],
)
def test_fatal_input_errors_are_one_line(tmp_path: Path, setup: str, message: str) -> None:
    private = tmp_path / "private"
    out = tmp_path / "run"
    args: list[str] = []
    if setup == "no_images":
        private.mkdir()
        (private / "a.txt").write_text("x")
    elif setup == "inside":
        write_example_folder(private, num_people=2, images_per_person=2, size=32)
        out = private / "run"
    elif setup == "few_units":
        write_example_folder(private, num_people=2, images_per_person=2, size=32)
        args = ["--privacy-unit", "folder", "--delta", "0.6"]
    result = synth(private, out, "--preset", "smoke", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output.lower()
    assert "Traceback" not in result.output


def test_openai_provider_end_to_end_with_faults_and_resume(private_folder: Path, tmp_path: Path, monkeypatch) -> None:
    from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    config = FaultConfig(latency=0.005, rate_429=0.05, retry_after=0.01, rate_500=0.05, rate_refusal=0.02)
    out = tmp_path / "run"
    with LoopbackOpenAIServer(config) as server:
        args = [
            "--preset",
            "openai",
            "--base-url",
            server.base_url,
            "--image-model",
            "tiny",
            "--num-samples",
            "6",
            "--iterations",
            "2",
            "--population-size",
            "6",
            "--variation-folds",
            "2",
            "--render-size",
            "32",
        ]
        result = synth(private_folder, out, *args)
        assert result.exit_code == 0, result.output
        assert "sent to" in result.output
        privacy = check_release(out, 6, 2.0)
        assert privacy["private_data_sent_to"]["caption"]["caption"].startswith("http://127.0.0.1")
        assert privacy["private_data_sent_to"]["evolve"]["text_embedding"].startswith("http://127.0.0.1")
        before = server.stats.snapshot()
        assert before["by_status"].get("429", 0) > 0  # the faults were really injected
        # a resumed finished run sends nothing new
        resumed = synth(private_folder, out, "--resume")
        assert resumed.exit_code == 0, resumed.output
        assert server.stats.snapshot()["requests"] == before["requests"]
    assert b"sk-test-not-a-real-key" not in (out / "private" / "requests.sqlite").read_bytes()
