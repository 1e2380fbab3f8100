"""`spti --version`, help grouped into panels with defaults and help text, `spti presets`."""

from __future__ import annotations

import tomllib

import pytest
import typer
from typer.testing import CliRunner

from spti.cli import app
from spti.config import PRESET_VALUES, PRESETS

runner = CliRunner()
WIDE = {"COLUMNS": "220", "TERMINAL_WIDTH": "220"}
OWN_COMMANDS = ("synthesize", "caption", "evolve", "render", "budget", "plan", "presets")
PANELS = ("Privacy", "Population", "Models", "Rendering", "Execution")


def command(name: str):  # type: ignore[no-untyped-def]
    """The click command of ``spti NAME`` (typer ships its own copy of click)."""
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def options(name: str) -> list:
    return [p for p in command(name).params if p.param_type_name == "option"]


def test_version() -> None:
    from spti import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"spti {__version__}"


@pytest.mark.parametrize("name", OWN_COMMANDS)
def test_every_option_has_help_text(name: str) -> None:
    for param in options(name):
        assert (param.help or "").strip(), f"spti {name} {param.opts[0]} has no help text"


def test_synthesize_options_are_grouped_into_panels() -> None:
    result = runner.invoke(app, ["synthesize", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for panel in PANELS:
        assert f"─ {panel} " in result.output, panel
    panels = {p.rich_help_panel for p in options("synthesize")}
    assert set(PANELS) <= panels


@pytest.mark.parametrize("name", ["synthesize", "caption", "evolve", "render"])
def test_defaults_are_shown_and_flags_have_no_placeholder(name: str) -> None:
    for param in options(name):
        if param.required:
            continue
        if param.is_flag:
            assert param.metavar == "", f"{name} {param.opts[0]} shows a <bool> placeholder"
        elif param.default is None:  # an unset flag: say what the run does instead
            assert isinstance(param.show_default, str), f"spti {name} {param.opts[0]} shows no default"
        else:
            assert param.show_default, f"spti {name} {param.opts[0]} shows no default"
    text = runner.invoke(app, [name, "--help"], env=WIDE).output
    assert "<bool>" not in text
    assert "default:" in text


def test_synthesize_help_shows_the_preset_default_of_epsilon() -> None:
    text = runner.invoke(app, ["synthesize", "--help"], env=WIDE).output
    line = next(line for line in text.splitlines() if "--epsilon" in line)
    assert "default:" in line and "1.0" in line, line


def test_presets_lists_every_preset() -> None:
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output


@pytest.mark.parametrize("name", PRESETS)
def test_one_preset_prints_its_resolved_values_as_toml(name: str) -> None:
    result = runner.invoke(app, ["presets", name])
    assert result.exit_code == 0, result.output
    values = tomllib.loads(result.output)
    assert values["preset"] == name
    assert values["num_samples"] == PRESET_VALUES[name]["num_samples"]
    assert "models" in values  # each role resolved


def test_unknown_preset_is_one_line() -> None:
    result = runner.invoke(app, ["presets", "fast"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "unknown preset 'fast'" in result.output and "smoke" in result.output


@pytest.mark.parametrize("name", ["synthesize", "caption", "evolve", "render", "plan"])
def test_every_parameter_is_a_setting_or_a_command_parameter(name: str) -> None:
    # settings_from passes a flag to the config by its name: a flag named unlike its setting would be dropped
    from spti.cli_options import COMMAND_PARAMETERS
    from spti.config import FIELD_NAMES

    for param in command(name).params:
        assert param.name in FIELD_NAMES | COMMAND_PARAMETERS, f"spti {name}: {param.name} reaches no setting"


def test_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import spti.cli_plan

    seen = {}

    def capture(cfg, private, **kwargs):  # type: ignore[no-untyped-def]
        seen["cfg"] = cfg

    monkeypatch.setattr(spti.cli_plan, "cost_gate", capture)
    flags = ["--num-private", "50", "--epsilon", "inf", "--variation-folds", "3", "--vote-seeds", "2"]
    result = runner.invoke(app, ["plan", *flags, "--iterations", "4", "--preset", "smoke", "--domain", "faces"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.epsilon, cfg.variation_folds, cfg.vote_seeds, cfg.iterations) == (float("inf"), 3, 2, 4)
    assert (cfg.preset, cfg.domain) == ("smoke", "faces")


def test_the_root_flags_have_no_placeholder() -> None:
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0 and "--verbose" in result.output
    assert "<bool>" not in result.output
