"""Run configuration: preset < file < flags, validation messages, the saved config round-trips."""

from __future__ import annotations

import math

import pytest

from spti.config import PRESETS, config_from_saved, resolve_config
from spti.errors import SptiError
from spti.rundir import RunDirectory


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid(preset: str) -> None:
    extra = {"image_embedder": "inception:/w/pt_inception.pth"} if preset == "paper" else {}
    cfg = resolve_config(preset=preset, overrides=extra)
    assert cfg.preset == preset


def test_paper_preset_asks_for_inception_weights() -> None:
    with pytest.raises(SptiError, match="Inception embedder needs its weights"):
        resolve_config(preset="paper")


def test_precedence_preset_file_flags(tmp_path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('preset = "quick"\nnum_samples = 7\n[pe]\niterations = 3\nvariation-folds = 2\n')
    cfg = resolve_config(config_file=f, overrides={"iterations": 9, "seed": None})
    assert cfg.num_samples == 7  # file beats preset
    assert cfg.iterations == 9  # flag beats file
    assert cfg.variation_folds == 2
    assert cfg.seed == 0  # None means "flag not given"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"voting": "smell"}, "voting"),
        ({"upscale": 3}, "upscale"),
        ({"upscaler": "realesrgan"}, "upscaler-model"),
        ({"delta": 2.0}, "delta"),
    ],
)
def test_validation_messages(overrides, match) -> None:
    with pytest.raises(SptiError, match=match):
        resolve_config(preset="quick", overrides=overrides)


def test_unknown_key_in_file(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("epsilonn = 2\n")
    with pytest.raises(SptiError, match="unknown setting"):
        resolve_config(config_file=f)
    f.write_text("epsilon = \n")
    with pytest.raises(SptiError, match="not valid TOML"):
        resolve_config(config_file=f)


def test_saved_config_round_trip_and_resume_rules(tmp_path) -> None:
    cfg = resolve_config(preset="smoke", overrides={"epsilon": math.inf, "strength": [0.5, 0.3]})
    run = RunDirectory(tmp_path / "run")
    run.create(cfg)
    assert config_from_saved(run.config_path) == cfg
    assert (run.private / "README.txt").read_text().startswith("THIS FOLDER HOLDS PRIVATE DATA")
    assert (run.private.stat().st_mode & 0o777) == 0o700
    with pytest.raises(SptiError, match="--resume"):
        run.create(cfg)
    assert run.reopen({"batch_size": 3}).batch_size == 3
    with pytest.raises(SptiError, match="cannot change epsilon"):
        run.reopen({"epsilon": 2.0})
