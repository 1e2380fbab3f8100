"""The ``spti`` command line. Thin: parse, validate, call the library, print.

Heavy modules (dp-accounting/scipy, torch, transformers, diffusers, openai) are imported inside
the commands that need them, so ``spti --help`` starts quickly.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from spti.errors import SptiError

app = typer.Typer(
    name="spti",
    help=(
        "Differentially private synthetic images from a private image folder, via private textual "
        "intermediaries (caption → Private Evolution over text → render)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


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


def _preset_default(name: str) -> str:
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
                param.show_default = "the run's setting" if self.defaults_from == "run" else _preset_default(name)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class RunSettingsCommand(SptiCommand):
    defaults_from = "run"


def _print_version(value: bool) -> None:
    """``spti --version``: eager, so it works without a command (a group needs one otherwise)."""
    if value:
        from spti import __version__

        typer.echo(f"spti {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the model libraries' own logs and loading bars (hidden by default).")
    ] = False,
) -> None:
    del version  # handled by its eager callback
    if verbose:
        import os

        from spti.backends.local._common import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _parse_epsilon(value: str) -> float:
    try:
        eps = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number (use 'inf' for no privacy)") from None
    if math.isnan(eps) or eps <= 0:
        raise typer.BadParameter("epsilon must be > 0 (use 'inf' for no privacy)")
    return eps


@app.command(
    cls=SptiCommand,
    epilog=(
        "Examples:\n\n"
        "  spti budget --epsilon 1 --delta 1e-5 --iterations 10\n\n"
        "  spti budget --epsilon 4 --iterations 10 --num-private 30000 --population 14000 --json"
    ),
)
def budget(
    epsilon: Annotated[str, typer.Option("--epsilon", "-e", help="Target ε ('inf' for no privacy).")] = "1.0",
    delta: Annotated[
        float | None,
        typer.Option(help="Target δ. Default with --num-private: 1/(N·ln N)."),
    ] = None,
    iterations: Annotated[int, typer.Option("--iterations", "-T", help="PE rounds (noisy releases).", min=1)] = 10,
    num_private: Annotated[
        int | None, typer.Option("--num-private", "-N", help="Number of privacy units that vote.", min=1)
    ] = None,
    population: Annotated[
        int | None, typer.Option("--population", "-M", help="Candidates voted on per round.", min=1)
    ] = None,
    count_share: Annotated[
        float,
        typer.Option(help="Share of the budget (of μ²) for the run's DP count of units; 0 for none.", min=0.0),
    ] = 0.02,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Noise per round for a privacy budget, and whether the votes will rise above it.

    N here is a number you give (public); a run never uses its exact N: it releases a DP count.
    """
    from private_evolution import accounting

    eps = _parse_epsilon(epsilon)
    try:
        if delta is None:
            if num_private is None:
                raise _fail("pass --delta, or --num-private N to use the default delta 1/(N·ln N)")
            delta = accounting.default_delta(num_private)
        if num_private is not None:
            accounting.check_delta_for_units(delta, num_private)
        plan = accounting.plan_noise(epsilon=eps, delta=delta, rounds=iterations, count_share=count_share)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    sigma, sigma_count, mu = plan.round_noise_multiplier, plan.count_noise_multiplier, plan.gdp_mu
    achieved = accounting.epsilon_at(gdp_mu=mu, delta=delta) if sigma > 0 else eps
    report: dict[str, object] = {
        "epsilon": eps if math.isfinite(eps) else "inf",
        "delta": delta,
        "iterations": iterations,
        "noise_multiplier": sigma,
        "count_noise_multiplier": sigma_count,
        "count_share": count_share,
        "achieved_epsilon": achieved if math.isfinite(achieved) else "inf",
        "gdp_mu": mu if math.isfinite(mu) else "inf",
    }
    warning = None
    if num_private is not None and population is not None:
        votes = num_private / population
        snr = votes / sigma if sigma > 0 else math.inf
        report.update(
            num_private=num_private,
            population=population,
            expected_votes_per_candidate=votes,
            signal_to_noise=snr if math.isfinite(snr) else "inf",
        )
        if sigma > 0 and votes < sigma:
            warning = (
                f"signal below noise: a candidate expects {votes:.3g} votes per round (N/M) but the "
                f"noise std is {sigma:.3g}; use fewer candidates (--population), fewer iterations, "
                "more private data or a larger epsilon"
            )
    report["warning"] = warning
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Privacy budget (Gaussian mechanism, L2 sensitivity 1 per round)", show_header=False)
    table.add_row("target ε, δ", f"{epsilon}, {delta:.3g}")
    table.add_row("iterations T", str(iterations))
    table.add_row("noise multiplier σ (per round)", f"{sigma:.4f}")
    if sigma_count is not None:
        table.add_row(f"DP unit count σ ({count_share:.0%} of μ²)", f"{sigma_count:.4f}")
    table.add_row("Gaussian DP μ (rounds and count)", f"{mu:.4f}")
    table.add_row("achieved ε", f"{achieved:.6g}")
    if "expected_votes_per_candidate" in report:
        table.add_row("expected votes / candidate (N/M)", f"{report['expected_votes_per_candidate']:.4g}")
        table.add_row("signal / noise (N/M ÷ σ)", f"{report['signal_to_noise']:.3g}")
    console.print(table)
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")


# --------------------------------------------------------------------------------------------
# synthesize / caption / evolve / render
# --------------------------------------------------------------------------------------------
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


# cost: `spti plan`, and the gate before a run's first paid request
DryRunOpt = Annotated[bool, Opt("--dry-run", help="Print the cost plan (requests, tokens, images, cost) and stop.")]
MaxCostOpt = Annotated[
    float | None, Opt("--max-cost", help="Refuse to start when the estimated cost (USD) is above this.", min=0.0)
]
YesOpt = Annotated[bool, Opt("--yes", "-y", help="Do not ask before the first paid request.")]
PricesOpt = Annotated[Path | None, Opt("--prices", help="TOML price table over the shipped one (spti/prices.toml).")]


def _cost_gate(  # type: ignore[no-untyped-def]
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


def _user_errors(fn):  # type: ignore[no-untyped-def]
    """Run a command body; user errors become one line and exit code 2, Ctrl-C exit code 130."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except SptiError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; run the same command with --resume to continue", 130) from None

    return wrapper


def _overrides(**flags: object) -> dict[str, object]:
    out = {k: v for k, v in flags.items() if v is not None}
    if "epsilon" in out:
        out["epsilon"] = _parse_epsilon(str(out["epsilon"]))
    if "delta" in out:
        out["delta"] = None if out["delta"] in ("auto", "default") else _parse_delta(str(out["delta"]))
        if out["delta"] is None:
            del out["delta"]
    if "strength" in out:
        out["strength"] = [float(x) for x in str(out["strength"]).split(",")]
    return out


def _parse_delta(value: str) -> float:
    try:
        delta = float(value)
    except ValueError:
        raise SptiError(f"--delta {value!r} is not a number: give one in (0, 1) such as 1e-6, or 'auto'") from None
    if not 0 < delta < 1:
        raise SptiError(f"--delta {value}: must be in (0, 1), such as 1e-6, or 'auto'")
    return delta


@contextmanager
def _open_run(  # type: ignore[no-untyped-def]
    output: Path,
    preset: str | None,
    config_file: Path | None,
    overrides: dict,
    resume: bool,
    *,
    private: Path | None = None,
    stages: tuple[str, ...] = ("caption", "evolve", "render"),
):
    """The run directory and its config, held exclusively (:meth:`RunDirectory.lock`) until the block ends.

    A new run directory is created by the lock holder only: the whole plan (settings, sizes, budget,
    the output folder, devices, keys: :func:`spti.plan_check.check_plan`) is checked first, writing
    nothing, then the empty folder is made, locked, and the run created in it.
    """
    from spti.config import resolve_config
    from spti.plan_check import check_plan
    from spti.rundir import RunDirectory

    run = RunDirectory(output)
    if resume:
        if not run.exists():
            raise SptiError(f"--resume: {run.root} holds no run to continue; drop --resume to start one")
        with run.lock():
            cfg = run.reopen(overrides, also_allowed=EXECUTOR_CHANGES)
            check_plan(cfg, private, run.root, new_run=False, stages=stages)
            yield run, cfg
        return
    cfg = resolve_config(preset=preset, config_file=config_file, overrides=overrides)
    check_plan(cfg, private, run.root, stages=stages)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SptiError(f"cannot create {run.root} ({exc.strerror or exc}); choose another --output") from None
    with run.lock():
        try:
            cfg = run.create(cfg)
        except OSError as exc:
            raise SptiError(f"cannot write the run in {run.root} ({exc.strerror or exc})") from None
        yield run, cfg


@contextmanager
def _existing_run(run_dir: Path):  # type: ignore[no-untyped-def]
    """An existing run directory, held exclusively until the block ends (nothing is created in a foreign folder)."""
    from spti.rundir import RunDirectory

    run = RunDirectory(run_dir)
    if not run.exists():
        raise SptiError(f"{run.root} is not an spti run directory (no config.toml)")
    with run.lock():
        yield run


def _check_private_dir(private_dir: Path) -> Path:
    if not private_dir.exists():
        raise SptiError(f"private folder {private_dir} does not exist")
    if not private_dir.is_dir():
        raise SptiError(f"{private_dir} is not a folder; point spti at a folder of images")
    return private_dir.resolve()


PRESET_PURPOSE = {
    "smoke": "tiny random models built on the fly: proves the installation offline in minutes (the images are noise)",
    "quick": "small local models (SmolVLM-256M, SmolLM2-360M, MiniLM, sd-turbo): low-compute trials, text voting",
    "paper": "the published settings: Qwen2.5-VL-7B, Llama-3-8B, SDXL-Turbo votes, SDXL-base release, image voting",
    "openai": "hosted models (gpt-4o-mini, text-embedding-3-small, gpt-image-1): no GPU; needs OPENAI_API_KEY",
    "hybrid": "the SPTI authors' setup: hosted captions, Llama-3-8B on localhost:8000, local SDXL-Turbo and embedder",
}


@app.command(cls=SptiCommand, epilog="Examples:\n\n  spti presets\n\n  spti presets smoke > my_run.toml")
@_user_errors
def presets(
    name: Annotated[str | None, typer.Argument(help="A preset to show; leave out for the list.")] = None,
) -> None:
    """The presets, or one preset's resolved settings as TOML (a --config file to start from)."""
    from spti.config import PRESET_VALUES, PRESETS, RunConfig, resolve_config

    if name is None:
        for preset in PRESETS:
            typer.echo(f"{preset:<7} {PRESET_PURPOSE.get(preset, '')}")
        typer.echo("\n`spti presets NAME` prints one preset's settings as TOML (default: quick).")
        return
    if name not in PRESETS:
        raise SptiError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    note = ""
    try:
        cfg = resolve_config(preset=name)
    except SptiError as exc:  # a preset that needs one more setting (paper: the Inception weights file)
        cfg = RunConfig(preset=name, **PRESET_VALUES[name])
        note = f"# before a run: {exc}\n"
    typer.echo(note + cfg.to_toml(), nl=False)


@app.command(
    cls=SptiCommand,
    epilog=(
        "Examples:\n\n"
        "  spti synthesize examples/private_faces --output /tmp/run --preset smoke\n\n"
        "  spti synthesize photos/ -o runs/r1 --epsilon 4 --num-samples 500 --domain faces --privacy-unit folder\n\n"
        "  OPENAI_API_KEY=... spti synthesize photos/ -o runs/r2 --preset openai --base-url http://localhost:8000/v1\n\n"
        "  spti synthesize photos/ -o runs/r3 --preset hybrid --caption-model openai:gpt-4o-mini "
        "--llm-model openai:meta-llama/Meta-Llama-3-8B-Instruct@http://gpu1:8000/v1 "
        "--image-model local:stabilityai/sdxl-turbo\n\n"
        "  spti synthesize photos/ -o runs/r1 --resume"
    ),
)
@_user_errors
def synthesize(
    private_dir: Annotated[Path, typer.Argument(help="Folder of private images (searched recursively).")],
    output: OutputOpt,
    epsilon: EpsOpt = None,
    delta: DeltaOpt = None,
    num_samples: Annotated[int | None, Opt(help="Synthetic images to release.", min=1)] = None,
    iterations: Annotated[int | None, Opt(help="PE rounds (noisy releases).", min=1)] = None,
    preset: PresetOpt = None,
    voting: Annotated[str | None, Opt(help="text (captions vote) | image (images vote on renders).")] = None,
    provider: Annotated[
        str | None, Opt(help="local (Hugging Face) | openai (any compatible API): for models named bare.")
    ] = None,
    base_url: Annotated[
        str | None, Opt(help="OpenAI-compatible endpoint of openai models without @URL, e.g. http://localhost:8000/v1.")
    ] = None,
    caption_model: Annotated[
        str | None, Opt(help=f"Vision-language model for captions (sees private images): {SPEC}.")
    ] = None,
    llm_model: Annotated[
        str | None, Opt(help=f"Chat model for the random / variation APIs (public text): {SPEC}.")
    ] = None,
    embedding_model: Annotated[
        str | None, Opt(help=f"Text embedding model (text voting; sees private captions): {SPEC}.")
    ] = None,
    image_model: Annotated[str | None, Opt(help=f"Text-to-image model (public text): {SPEC}.")] = None,
    image_embedder: Annotated[str | None, Opt(help="wavelet | clip[:ID] | dinov2[:ID] | inception:PATH.")] = None,
    upscaler: Annotated[str | None, Opt(help="none | lanczos | realesrgan | sd-x4.")] = None,
    upscale: Annotated[int | None, Opt(help="Upscaling factor: 1, 2 or 4.")] = None,
    upscaler_model: Annotated[str | None, Opt(help="Real-ESRGAN weights file, or x4 upscaler model id.")] = None,
    domain: Annotated[str | None, Opt(help="Prompt set: generic | faces | bedrooms | PATH.")] = None,
    privacy_unit: Annotated[str | None, Opt(help="image | folder (one sub-folder = one person).")] = None,
    population_size: Annotated[
        int | None, Opt(help="Descriptions kept per round (with --population auto: the most).", min=1)
    ] = None,
    population: Annotated[str | None, Opt(help="fixed | auto: size the population from the DP count of units.")] = None,
    target_signal: Annotated[
        float | None, Opt(help="--population auto: expected votes per candidate, in units of the noise σ.")
    ] = None,
    seeding: Annotated[
        str | None, Opt(help="attributes (DP histogram of the captions' public attributes) | none.")
    ] = None,
    seeding_share: Annotated[
        float | None, Opt(help="Share of the budget (of μ²) for the seeding release.", min=0.0, max=0.9)
    ] = None,
    count_share: Annotated[
        float | None, Opt(help="Share of the budget (of μ²) for the DP count of units.", min=0.0, max=0.9)
    ] = None,
    max_private: Annotated[
        int | None, Opt(help="Vote with a uniformly random subset of at most this many privacy units.", min=3)
    ] = None,
    units_bound: Annotated[
        int | None, Opt(help="A public upper bound B on the number of privacy units: δ = 1/(B·ln B).", min=3)
    ] = None,
    variation_folds: Annotated[int | None, Opt(help="Variations per kept description.", min=1)] = None,
    render_size: Annotated[
        int | None, Opt("--render-size", "--release-size", help="Side of released images before upscaling.", min=8)
    ] = None,
    voting_size: Annotated[int | None, Opt(help="Image voting: input side of the feature extractor.", min=8)] = None,
    vote_render_size: Annotated[
        str | None, Opt(help="Image voting: side candidates are drawn at; native (the generator's own) or pixels.")
    ] = None,
    vote_seeds: Annotated[
        int | None, Opt(help="Image voting: renders per candidate (feature = their mean).", min=1)
    ] = None,
    release_render: ReleaseRenderOpt = None,
    release_model: ReleaseModelOpt = None,
    release_steps: ReleaseStepsOpt = None,
    release_guidance: ReleaseGuidanceOpt = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps.")] = None,
    batch_size: Annotated[int | None, Opt(help="Batch size of local models.", min=1)] = None,
    concurrency: Annotated[int | None, Opt(help="Hosted API requests in flight.", min=1)] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    seed: Annotated[int | None, Opt(help="Seed of the public randomness (never of the DP noise).")] = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
    max_cost: MaxCostOpt = None,
    yes: YesOpt = False,
    prices: PricesOpt = None,
) -> None:
    """Private folder → DP descriptions → images: caption, evolve and render in one run directory."""
    from spti.config import resolve_config
    from spti.pipeline import Reporter
    from spti.pipeline import synthesize as run_pipeline

    private = _check_private_dir(private_dir)
    overrides = _overrides(
        epsilon=epsilon,
        delta=delta,
        num_samples=num_samples,
        iterations=iterations,
        voting=voting,
        provider=provider,
        base_url=base_url,
        caption_model=caption_model,
        llm_model=llm_model,
        embedding_model=embedding_model,
        image_model=image_model,
        image_embedder=image_embedder,
        upscaler=upscaler,
        upscale=upscale,
        upscaler_model=upscaler_model,
        domain=domain,
        privacy_unit=privacy_unit,
        population_size=population_size,
        population=population,
        target_signal=target_signal,
        seeding=seeding,
        seeding_share=seeding_share,
        count_share=count_share,
        max_private=max_private,
        units_bound=units_bound,
        variation_folds=variation_folds,
        render_size=render_size,
        voting_size=voting_size,
        vote_render_size=vote_render_size,
        vote_seeds=vote_seeds,
        release_render=release_render,
        release_model=release_model,
        release_steps=release_steps,
        release_guidance=release_guidance,
        device=device,
        batch_size=batch_size,
        concurrency=concurrency,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
        seed=seed,
    )
    gate = {"max_cost": max_cost, "yes": yes, "dry_run": dry_run, "prices": prices}
    if not resume:  # before anything is written: the settings exactly as the run resolves them
        from spti.plan_check import check_plan

        planned = resolve_config(preset=preset, config_file=config, overrides=overrides)
        check_plan(planned, private, output)  # sizes, budget, output folder, devices, keys: before the cost plan
        _cost_gate(planned, private, **gate)
    elif dry_run:
        raise SptiError("--dry-run plans a new run; for a resumed one run `spti plan` with its settings")
    with _open_run(output, preset, config, overrides, resume, private=private) as (run, cfg):
        if resume:
            _cost_gate(cfg, private, **gate)
        released_before = run.stage_done("evolve")
        summary = run_pipeline(cfg, private, run, Reporter(quiet=quiet))
    eps, dlt = summary.privacy.get("epsilon"), summary.privacy.get("delta")
    if released_before:  # the evolve stage printed them when it ran; say them again for this release
        for warning in summary.privacy.get("warnings", []):
            typer.echo(f"warning: {warning}", err=True)
    line = f"released {len(summary.images)} images to {run.release} (epsilon={eps}, delta={dlt:.3g})"
    if summary.privacy.get("differentially_private") is False or eps == "inf":
        line += ": NOT differentially private (no noise); do not share it as private data"
    typer.echo(line)


@app.command(cls=SptiCommand)
@_user_errors
def caption(
    private_dir: Annotated[Path, typer.Argument(help="Folder of private images.")],
    output: OutputOpt,
    preset: PresetOpt = None,
    provider: Annotated[str | None, Opt(help="local | openai (for models named bare).")] = None,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint (for openai models without @URL).")] = None,
    caption_model: Annotated[str | None, Opt(help=f"Vision-language model: {SPEC}.")] = None,
    privacy_unit: Annotated[str | None, Opt(help="image | folder.")] = None,
    domain: Annotated[str | None, Opt(help="Prompt set (its caption prompt is used).")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda.")] = None,
    batch_size: Annotated[int | None, Opt(help="Batch size of local models.", min=1)] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stage 1 only: caption each private image on its own into RUN_DIR/private/ (not DP)."""
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, caption_stage

    private = _check_private_dir(private_dir)
    overrides = _overrides(
        provider=provider,
        base_url=base_url,
        caption_model=caption_model,
        privacy_unit=privacy_unit,
        domain=domain,
        device=device,
        batch_size=batch_size,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
    )
    with _open_run(output, preset, config, overrides, resume, private=private, stages=("caption",)) as (run, cfg):
        models = Models(cfg, run)
        try:
            caption_stage(cfg, run, models, private, Reporter(quiet=quiet))
        finally:
            models.close()
    typer.echo(f"captions written to {run.private / 'captions.jsonl'} (private: never share)")


@app.command(cls=SptiCommand)
@_user_errors
def evolve(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory with captions (from `spti caption`).")] = None,
    captions: Annotated[Path | None, Opt(help="Bring your own private captions (JSONL: caption, unit).")] = None,
    output: Annotated[Path | None, Opt("--output", "-o", help="New run directory (with --captions).")] = None,
    epsilon: EpsOpt = None,
    delta: DeltaOpt = None,
    num_samples: Annotated[int | None, Opt(help="Descriptions to release.", min=1)] = None,
    iterations: Annotated[int | None, Opt(help="PE rounds (noisy releases).", min=1)] = None,
    preset: PresetOpt = None,
    provider: Annotated[str | None, Opt(help="local | openai (for models named bare).")] = None,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint (for openai models without @URL).")] = None,
    llm_model: Annotated[str | None, Opt(help=f"Chat model: {SPEC}.")] = None,
    embedding_model: Annotated[str | None, Opt(help=f"Text embedding model: {SPEC}.")] = None,
    domain: Annotated[str | None, Opt(help="Prompt set: generic | faces | bedrooms | PATH.")] = None,
    population_size: Annotated[int | None, Opt(help="Descriptions kept per round (auto: the most).", min=1)] = None,
    population: Annotated[str | None, Opt(help="fixed | auto (sized from the DP count of units).")] = None,
    target_signal: Annotated[float | None, Opt(help="--population auto: votes per candidate ÷ σ.")] = None,
    seeding: Annotated[str | None, Opt(help="attributes | none.")] = None,
    seeding_share: Annotated[float | None, Opt(help="Budget share (of μ²) for seeding.", min=0.0, max=0.9)] = None,
    count_share: Annotated[float | None, Opt(help="Budget share (of μ²) for the DP count.", min=0.0, max=0.9)] = None,
    max_private: Annotated[int | None, Opt(help="Vote with a random subset of at most N units.", min=3)] = None,
    units_bound: Annotated[int | None, Opt(help="Public upper bound B on the units: δ = 1/(B·ln B).", min=3)] = None,
    variation_folds: Annotated[int | None, Opt(help="Variations per kept description.", min=1)] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    seed: Annotated[int | None, Opt(help="Seed of the public randomness (never of the DP noise).")] = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stage 2 only: Private Evolution with text voting; releases RUN_DIR/release/captions.jsonl."""
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, evolve_stage

    overrides = _overrides(
        epsilon=epsilon,
        delta=delta,
        num_samples=num_samples,
        iterations=iterations,
        provider=provider,
        base_url=base_url,
        llm_model=llm_model,
        embedding_model=embedding_model,
        domain=domain,
        population_size=population_size,
        population=population,
        target_signal=target_signal,
        seeding=seeding,
        seeding_share=seeding_share,
        count_share=count_share,
        max_private=max_private,
        units_bound=units_bound,
        variation_folds=variation_folds,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
        seed=seed,
    )
    if captions is not None:
        if output is None:
            raise SptiError("--captions needs --output RUN_DIR for the new run")
        if not captions.exists():
            raise SptiError(f"captions file {captions} does not exist")
        overrides["voting"] = "text"
        session = _open_run(output, preset, config, overrides, resume, stages=("evolve", "render"))
    else:
        if run_dir is None:
            raise SptiError("give a RUN_DIR from `spti caption`, or --captions FILE --output RUN_DIR")
        session = _existing_run_config(run_dir, overrides, stages=("evolve",))
    with session as (run, cfg):
        if captions is not None:
            _import_captions(captions, run)
        elif run.stage_done("evolve") and not resume:
            raise SptiError(f"{run.root} has already released its descriptions; use a new run directory")
        models = Models(cfg, run)
        try:
            evolve_stage(cfg, run, models, Reporter(quiet=quiet))
        finally:
            models.close()
    typer.echo(f"released descriptions: {run.release / 'captions.jsonl'}")


@contextmanager
def _existing_run_config(  # type: ignore[no-untyped-def]
    run_dir: Path, overrides: dict, also_allowed: frozenset[str] = frozenset(), *, stages: tuple[str, ...]
):
    """An existing run, its config with ``overrides``, and the plan of ``stages`` checked (devices, keys)."""
    from spti.plan_check import check_plan

    with _existing_run(run_dir) as run:
        cfg = run.reopen(overrides, also_allowed=also_allowed | EXECUTOR_CHANGES)
        check_plan(cfg, None, run.root, new_run=False, stages=stages)
        yield run, cfg


def _import_captions(path: Path, run) -> None:  # type: ignore[no-untyped-def]
    """Copy user-provided private captions into private/ in the run's format (caption + unit)."""
    from private_evolution.files import atomic_write_json, atomic_write_jsonl

    rows = []
    all_have_units = True
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SptiError(f"{path}:{lineno} is not valid JSON; expected one object per line") from None
            text = row.get("caption") or row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise SptiError(f"{path}:{lineno} has no 'caption' (or 'text') string")
            all_have_units = all_have_units and row.get("unit") is not None
            unit = str(row.get("unit", row.get("id", lineno)))
            rows.append({"relpath": str(row.get("id", lineno)), "unit": unit, "caption": " ".join(text.split())})
    if not rows:
        raise SptiError(f"{path} holds no captions")
    run.ensure_private()
    atomic_write_jsonl(run.private / "captions.jsonl", rows)
    # how many captions (private) stays under private/; stages.json (state/) holds public facts only
    atomic_write_json(
        run.private / "caption_stats.json", {"images": len(rows), "captioned": len(rows), "failed": 0, "skipped": 0}
    )
    source = run.CAPTIONS_FILE_UNITS
    if not all_have_units:
        source += " (rows without one: their 'id', else their line number)"
    run.record_unit_source(source)
    run.mark("caption", source="captions file")


@app.command(cls=RunSettingsCommand)
@_user_errors
def render(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with released descriptions.")],
    image_model: Annotated[str | None, Opt(help=f"Text-to-image model: {SPEC}.")] = None,
    render_size: Annotated[
        int | None, Opt("--render-size", "--release-size", help="Side of released images before upscaling.", min=8)
    ] = None,
    release_render: ReleaseRenderOpt = None,
    release_model: ReleaseModelOpt = None,
    release_steps: ReleaseStepsOpt = None,
    release_guidance: ReleaseGuidanceOpt = None,
    upscaler: Annotated[str | None, Opt(help="none | lanczos | realesrgan | sd-x4.")] = None,
    upscale: Annotated[int | None, Opt(help="Upscaling factor: 1, 2 or 4.")] = None,
    upscaler_model: Annotated[str | None, Opt(help="Real-ESRGAN weights file, or x4 upscaler model id.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps.")] = None,
    batch_size: Annotated[int | None, Opt(help="Batch size of local models.", min=1)] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stage 3 only: draw and upscale the released descriptions (post-processing: no privacy cost)."""
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, render_stage
    from spti.rundir import RunDirectory

    post = _overrides(
        image_model=image_model,
        render_size=render_size,
        release_render=release_render,
        release_model=release_model,
        release_steps=release_steps,
        release_guidance=release_guidance,
        upscaler=upscaler,
        upscale=upscale,
        upscaler_model=upscaler_model,
        device=device,
        batch_size=batch_size,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
    )
    with _existing_run_config(run_dir, post, RunDirectory.RENDER_CHANGES | RELEASE_CHANGES, stages=("render",)) as (
        run,
        cfg,
    ):
        models = Models(cfg, run)
        try:
            paths = render_stage(cfg, run, models, Reporter(quiet=quiet))
        finally:
            models.close()
    typer.echo(f"rendered {len(paths)} images in {run.release / 'images'}")


@app.command(
    cls=SptiCommand,
    epilog=(
        "Examples:\n\n"
        "  spti plan --preset openai --num-private 24\n\n"
        "  spti plan photos/ --preset openai --iterations 3 --max-cost 5\n\n"
        "  spti plan photos/ --config run.toml --prices my_prices.toml --json"
    ),
)
@_user_errors
def plan(
    private_dir: Annotated[
        Path | None, typer.Argument(help="Private folder (its images are counted; nothing is read or sent).")
    ] = None,
    num_private: Annotated[
        int | None, Opt("--num-private", "-N", help="Number of private images, when no folder is given.", min=1)
    ] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    epsilon: EpsOpt = None,
    num_samples: Annotated[int | None, Opt(help="Synthetic images to release.", min=1)] = None,
    iterations: Annotated[int | None, Opt(help="PE rounds.", min=1)] = None,
    voting: Annotated[str | None, Opt(help="text | image.")] = None,
    provider: Annotated[str | None, Opt(help="local | openai (for models named bare).")] = None,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint (for openai models without @URL).")] = None,
    caption_model: Annotated[str | None, Opt(help=f"Captioner: {SPEC}.")] = None,
    llm_model: Annotated[str | None, Opt(help=f"Chat model: {SPEC}.")] = None,
    embedding_model: Annotated[str | None, Opt(help=f"Text embedding model: {SPEC}.")] = None,
    image_model: Annotated[str | None, Opt(help=f"Text-to-image model: {SPEC}.")] = None,
    release_model: ReleaseModelOpt = None,
    population_size: Annotated[int | None, Opt(help="Descriptions kept per round.", min=1)] = None,
    population: Annotated[str | None, Opt(help="fixed | auto (planned with the count of files).")] = None,
    variation_folds: Annotated[int | None, Opt(help="Variations per kept description.", min=1)] = None,
    max_private: Annotated[int | None, Opt(help="Vote with at most this many privacy units.", min=3)] = None,
    render_size: Annotated[
        int | None, Opt("--render-size", "--release-size", help="Side of released images before upscaling.", min=8)
    ] = None,
    vote_seeds: Annotated[int | None, Opt(help="Image voting: renders per candidate.", min=1)] = None,
    privacy_unit: Annotated[str | None, Opt(help="image | folder.")] = None,
    domain: Annotated[str | None, Opt(help="Prompt set.")] = None,
    prices: PricesOpt = None,
    max_cost: MaxCostOpt = None,
    as_json: Annotated[bool, Opt("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    """Requests, tokens, images and estimated cost per model role of a run, before it runs.

    Settings resolve exactly as `spti synthesize` resolves them (preset < --config < flags); every
    other synthesize flag is planned with `spti synthesize ... --dry-run`. Writes nothing.
    """
    from spti.config import resolve_config

    overrides = _overrides(
        epsilon=epsilon,
        num_samples=num_samples,
        iterations=iterations,
        voting=voting,
        provider=provider,
        base_url=base_url,
        caption_model=caption_model,
        llm_model=llm_model,
        embedding_model=embedding_model,
        image_model=image_model,
        release_model=release_model,
        population_size=population_size,
        population=population,
        variation_folds=variation_folds,
        max_private=max_private,
        render_size=render_size,
        vote_seeds=vote_seeds,
        privacy_unit=privacy_unit,
        domain=domain,
    )
    cfg = resolve_config(preset=preset, config_file=config, overrides=overrides)
    private = _check_private_dir(private_dir) if private_dir is not None else None
    _cost_gate(
        cfg,
        private,
        max_cost=max_cost,
        yes=True,
        dry_run=True,
        prices=prices,
        num_private=num_private,
        as_json=as_json,
    )


def _register_optional_commands() -> None:
    """Commands that live in their own modules (their heavy imports stay inside the commands)."""
    from spti.cli_audit import register as register_audit
    from spti.cli_evaluate import register as register_evaluate
    from spti.cli_models import register as register_models

    register_evaluate(app)
    register_audit(app)
    register_models(app)


_register_optional_commands()


def main() -> None:
    """Console entry point: user errors print one line and exit non-zero, never a traceback."""
    try:
        app()
    except SptiError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; run again with --resume to continue", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
