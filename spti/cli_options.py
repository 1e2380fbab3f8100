"""What the ``spti`` commands share: help panels, option types, flag parsing and the cost gate.

The command modules (:mod:`spti.cli`, :mod:`spti.cli_plan`, ...) import from here; nothing here
imports a heavy library at module level.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from spti.errors import SptiError

F = TypeVar("F", bound=Callable[..., Any])

# Help panels of the run commands: each option by its name; options not named here (the run's own:
# --output, --preset, --config, --resume) stay in the first panel, and new ones land in Execution.
PANEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "Privacy": (
        "epsilon",
        "delta",
        "units_bound",
        "max_private",
        "privacy_unit",
        "count_share",
        "seeding",
        "seeding_share",
    ),
    "Population": (
        "num_samples",
        "iterations",
        "voting",
        "population_size",
        "population",
        "target_signal",
        "variation_folds",
        "domain",
        "seed",
        "num_private",
    ),
    "Models": (
        "provider",
        "base_url",
        "caption_model",
        "llm_model",
        "embedding_model",
        "image_model",
        "image_embedder",
        "release_model",
        "upscaler_model",
    ),
    "Rendering": (
        "render_size",
        "voting_size",
        "vote_render_size",
        "vote_seeds",
        "release_render",
        "release_steps",
        "release_guidance",
        "upscaler",
        "upscale",
    ),
}
RUN_OPTIONS = frozenset({"output", "preset", "config", "resume", "captions"})
PANEL_OF = {name: panel for panel, names in PANEL_OPTIONS.items() for name in names}
# defaults that are not a value: what the run does instead
DEFAULT_WORDS = {
    "preset": "quick",
    "delta": "auto: 1/(B·ln B) with --units-bound B, else 1e-6",
    "units_bound": "none",
    "max_private": "every unit",
    "release_model": "the image model",
    "release_steps": "the release model's own",
    "release_guidance": "the release model's own",
    "upscaler_model": "none",
    "base_url": "$OPENAI_BASE_URL, else api.openai.com",
    "ray_address": "a local instance",
    "ray_workers": "one per GPU, else per CPU",
}


def preset_default(name: str) -> str:
    """What an unset flag means: the setting of the default (quick) preset, or of the run itself."""
    from spti.config import FIELD_NAMES, PRESET_VALUES, RunConfig

    if name in DEFAULT_WORDS:
        return DEFAULT_WORDS[name]
    if name not in FIELD_NAMES:
        return "none"
    value = PRESET_VALUES["quick"].get(name, getattr(RunConfig(), name))
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return "none" if value is None else f"quick preset: {value}"


class SptiCommand(TyperCommand):
    """A command whose options sit in help panels, show what an unset flag means, and show booleans
    as plain flags (no ``<bool>`` placeholder)."""

    defaults_from = "preset"  # "run": the command works on an existing run, whose settings it keeps

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name != "option":
                continue
            name = param.name or ""
            if getattr(param, "rich_help_panel", None) is None and name not in RUN_OPTIONS:
                param.rich_help_panel = PANEL_OF.get(name, "Execution")  # type: ignore[attr-defined]
            if getattr(param, "is_flag", False):
                param.metavar = ""  # a flag takes no value
                param.show_default = False
            elif param.default is None and not param.required:
                param.show_default = "the run's setting" if self.defaults_from == "run" else preset_default(name)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class RunSettingsCommand(SptiCommand):
    defaults_from = "run"


class SptiGroup(TyperGroup):
    """The ``spti`` group: its own flags (--version, --verbose, --help) shown without a ``<bool>`` placeholder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_epsilon(value: str) -> float:
    try:
        eps = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number (use 'inf' for no privacy)") from None
    if math.isnan(eps) or eps <= 0:
        raise typer.BadParameter("epsilon must be > 0 (use 'inf' for no privacy)")
    return eps


# Options of the run commands
Opt = typer.Option

OutputOpt = Annotated[Path, Opt("--output", "-o", help="Run directory to create (or continue with --resume).")]
PresetOpt = Annotated[str | None, Opt(help="smoke | quick | paper | openai | hybrid (default quick).")]
ConfigOpt = Annotated[Path | None, Opt("--config", help="TOML file with settings; flags win over it.")]
ResumeOpt = Annotated[bool, Opt("--resume", help="Continue an interrupted run in --output.")]
EpsOpt = Annotated[str | None, Opt("--epsilon", "-e", help="Privacy budget ε ('inf' for no privacy).")]
DeltaOpt = Annotated[str | None, Opt("--delta", help="δ, or 'auto' (from --units-bound B, else 1e-6; never from N).")]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="No progress bars.")]
ReleaseRenderOpt = Annotated[
    str | None,
    Opt(help="Image voting: voted (release the render the private images voted for) | rerender (draw again)."),
]
ReleaseModelOpt = Annotated[
    str | None,
    Opt(
        help=r"\[provider:]model\[@URL] of the released images, e.g. SDXL-base while SDXL-Turbo votes (default: same)."
    ),
]
# every model flag takes a role spec: [provider:]model[@base_url]; a bare name uses --provider / --base-url
SPEC = r"\[provider:]model\[@URL], e.g. openai:gpt-4o-mini or openai:MODEL@http://gpu1:8000/v1; bare: --provider"
ReleaseStepsOpt = Annotated[int | None, Opt(help="Denoising steps of the release model.", min=1)]
ReleaseGuidanceOpt = Annotated[float | None, Opt(help="Guidance scale of the release model.")]
# settings `spti render` may change besides RunDirectory.RENDER_CHANGES: they only decide the release's pixels
RELEASE_CHANGES = frozenset({"release_render", "release_model", "release_steps", "release_guidance"})
# where the models run, not what they compute: any resume may change them
EXECUTOR_CHANGES = frozenset({"executor", "ray_address", "ray_workers"})
ExecutorOpt = Annotated[
    str | None, Opt(help=r"local (models in this process) | ray (on Ray actors, one per GPU; the \[ray] extra).")
]
RayAddressOpt = Annotated[
    str | None, Opt(help="--executor ray: address of an existing cluster (default: start a local instance).")
]
RayWorkersOpt = Annotated[
    int | None, Opt(help="--executor ray: number of actors (default: one per GPU, else one per CPU).", min=1)
]


# Flags that several commands take, with one help text
BaseUrlOpt = Annotated[str | None, Opt(help="OpenAI-compatible endpoint (for openai models without @URL).")]
BatchSizeOpt = Annotated[int | None, Opt(help="Batch size of local models.", min=1)]
DeviceOpt = Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps.")]
DomainOpt = Annotated[str | None, Opt(help="Prompt set: generic | faces | bedrooms | PATH.")]
EmbeddingModelOpt = Annotated[str | None, Opt(help=f"Text embedding model: {SPEC}.")]
ImageModelOpt = Annotated[str | None, Opt(help=f"Text-to-image model: {SPEC}.")]
IterationsOpt = Annotated[int | None, Opt(help="PE rounds (noisy releases).", min=1)]
LlmModelOpt = Annotated[str | None, Opt(help=f"Chat model: {SPEC}.")]
NumSamplesOpt = Annotated[int | None, Opt(help="Synthetic images to release.", min=1)]
PrivacyUnitOpt = Annotated[str | None, Opt(help="image | folder.")]
ProviderOpt = Annotated[str | None, Opt(help="local | openai (for models named bare).")]
SeedOpt = Annotated[int | None, Opt(help="Seed of the public randomness (never of the DP noise).")]
UpscaleOpt = Annotated[int | None, Opt(help="Upscaling factor: 1, 2 or 4.")]
UpscalerModelOpt = Annotated[str | None, Opt(help="Real-ESRGAN weights file, or x4 upscaler model id.")]
UpscalerOpt = Annotated[str | None, Opt(help="none | lanczos | realesrgan | sd-x4.")]
VariationFoldsOpt = Annotated[int | None, Opt(help="Variations per kept description.", min=1)]


# cost: `spti plan`, and the gate before a run's first paid request
DryRunOpt = Annotated[bool, Opt("--dry-run", help="Print the cost plan (requests, tokens, images, cost) and stop.")]
MaxCostOpt = Annotated[
    float | None, Opt("--max-cost", help="Refuse to start when the estimated cost (USD) is above this.", min=0.0)
]
YesOpt = Annotated[bool, Opt("--yes", "-y", help="Do not ask before the first paid request.")]
PricesOpt = Annotated[Path | None, Opt("--prices", help="TOML price table over the shipped one (spti/prices.toml).")]


def cost_gate(  # type: ignore[no-untyped-def]
    cfg, private: Path | None, *, max_cost, yes, dry_run, prices, num_private=None, as_json=False
) -> None:
    """The plan of a run: printed (--dry-run: then stop), checked against --max-cost, and on a
    terminal confirmed before the first paid request (--yes skips)."""
    from spti.plan_cost import check_cost, count_private, plan_run
    from spti.plan_cost import prices as price_table

    if private is not None:
        images, units = count_private(private, cfg)
    elif num_private is not None:
        images, units = num_private, num_private
    else:
        raise SptiError("give a private folder, or --num-private N")
    plan = plan_run(cfg, num_images=images, num_units=units, table=price_table(prices))
    if dry_run:
        typer.echo(json.dumps(plan.to_dict()) if as_json else "\n".join(plan.lines()))
    check_cost(
        plan,
        max_cost=max_cost,
        yes=yes or dry_run,
        interactive=sys.stdin.isatty(),
        echo=(lambda line: None) if dry_run else (lambda line: typer.echo(line, err=True)),
        confirm=lambda text: typer.confirm(text, default=False, err=True),
    )
    if dry_run:
        raise typer.Exit(0)


def one_line_errors(interrupted: str) -> Callable[[F], F]:
    """A decorator for command bodies: a user error (SptiError) becomes one ``error:`` line and its exit
    code, never a traceback; Ctrl-C prints ``interrupted`` (what the user can do now) and exits 130."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except SptiError as exc:
                raise fail(str(exc), exc.exit_code) from None
            except KeyboardInterrupt:
                raise fail(interrupted, 130) from None

        return wrapper  # type: ignore[return-value]

    return decorate


# the run commands: an interrupted run continues where it stopped
user_errors = one_line_errors("interrupted; run the same command with --resume to continue")


# Parameters of the run commands that are not RunConfig settings (where to run, how to print, what to
# read); every other parameter is named like the setting it overrides and reaches it by that name.
COMMAND_PARAMETERS = frozenset(
    {"private_dir", "run_dir", "output", "config", "resume", "quiet", "dry_run", "max_cost", "yes", "prices"}
    | {"captions", "num_private", "as_json"}
)


def settings_from(params: dict[str, Any]) -> dict[str, object]:
    """The config overrides among a command's parameters (its ``locals()``, taken first): every flag
    named like a RunConfig setting and set on the command line (None: not given), with ε, δ and the
    strength list parsed from their text. One mapping for every command, so a new flag cannot be
    forgotten in one of them (tests/app/test_cli_help.py checks the names)."""
    from spti.config import FIELD_NAMES

    # --preset is resolved as the base of the settings, not as an override of them
    out = {k: v for k, v in params.items() if k in FIELD_NAMES and k != "preset" and v is not None}
    if "epsilon" in out:
        out["epsilon"] = parse_epsilon(str(out["epsilon"]))
    if out.get("delta") in ("auto", "default"):
        del out["delta"]
    elif "delta" in out:
        out["delta"] = parse_delta(str(out["delta"]))
    if "strength" in out:
        out["strength"] = [float(x) for x in str(out["strength"]).split(",")]
    return out


def parse_delta(value: str) -> float:
    try:
        delta = float(value)
    except ValueError:
        raise SptiError(f"--delta {value!r} is not a number: give one in (0, 1) such as 1e-6, or 'auto'") from None
    if not 0 < delta < 1:
        raise SptiError(f"--delta {value}: must be in (0, 1), such as 1e-6, or 'auto'")
    return delta


def check_private_dir(private_dir: Path) -> Path:
    if not private_dir.exists():
        raise SptiError(f"private folder {private_dir} does not exist")
    if not private_dir.is_dir():
        raise SptiError(f"{private_dir} is not a folder; point spti at a folder of images")
    return private_dir.resolve()
