"""The ``spti`` command line. Thin: parse, validate, call the library, print.

Here: the run commands (synthesize, caption, evolve, render) and ``presets``. ``budget`` and ``plan``
live in :mod:`spti.cli_plan`, ``evaluate``, ``audit`` and ``models`` in their own modules; the option
types, help panels, flag parsing and the cost gate they share in :mod:`spti.cli_options`.

Heavy modules (dp-accounting/scipy, torch, transformers, diffusers, openai) are imported inside
the commands that need them, so ``spti --help`` starts quickly.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from spti.cli_options import (
    EXECUTOR_CHANGES,
    RELEASE_CHANGES,
    SPEC,
    BaseUrlOpt,
    BatchSizeOpt,
    ConfigOpt,
    DeltaOpt,
    DeviceOpt,
    DomainOpt,
    DryRunOpt,
    EmbeddingModelOpt,
    EpsOpt,
    ExecutorOpt,
    ImageModelOpt,
    IterationsOpt,
    LlmModelOpt,
    MaxCostOpt,
    NumSamplesOpt,
    Opt,
    OutputOpt,
    PresetOpt,
    PricesOpt,
    PrivacyUnitOpt,
    ProviderOpt,
    QuietOpt,
    RayAddressOpt,
    RayWorkersOpt,
    ReleaseGuidanceOpt,
    ReleaseModelOpt,
    ReleaseRenderOpt,
    ReleaseStepsOpt,
    ResumeOpt,
    RunSettingsCommand,
    SeedOpt,
    SptiCommand,
    SptiGroup,
    UpscaleOpt,
    UpscalerModelOpt,
    UpscalerOpt,
    VariationFoldsOpt,
    YesOpt,
    check_private_dir,
    cost_gate,
    settings_from,
    user_errors,
)
from spti.errors import SptiError

app = typer.Typer(
    name="spti",
    cls=SptiGroup,
    help=(
        "Differentially private synthetic images from a private image folder, via private textual "
        "intermediaries (caption → Private Evolution over text → render)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


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


PRESET_PURPOSE = {
    "smoke": "tiny random models built on the fly: proves the installation offline in minutes (the images are noise)",
    "quick": "small local models (SmolVLM-256M, SmolLM2-360M, MiniLM, sd-turbo): low-compute trials, text voting",
    "paper": "the published settings: Qwen2.5-VL-7B, Llama-3-8B, SDXL-Turbo votes, SDXL-base release, image voting",
    "openai": "hosted models (gpt-4o-mini, text-embedding-3-small, gpt-image-1): no GPU; needs OPENAI_API_KEY",
    "hybrid": "the SPTI authors' setup: hosted captions, Llama-3-8B on localhost:8000, local SDXL-Turbo and embedder",
}


@app.command(cls=SptiCommand, epilog="Examples:\n\n  spti presets\n\n  spti presets smoke > my_run.toml")
@user_errors
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
@user_errors
def synthesize(
    private_dir: Annotated[Path, typer.Argument(help="Folder of private images (searched recursively).")],
    output: OutputOpt,
    epsilon: EpsOpt = None,
    delta: DeltaOpt = None,
    num_samples: NumSamplesOpt = None,
    iterations: IterationsOpt = None,
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
    upscaler: UpscalerOpt = None,
    upscale: UpscaleOpt = None,
    upscaler_model: UpscalerModelOpt = None,
    domain: DomainOpt = None,
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
    variation_folds: VariationFoldsOpt = None,
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
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = None,
    concurrency: Annotated[int | None, Opt(help="Hosted API requests in flight.", min=1)] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
    max_cost: MaxCostOpt = None,
    yes: YesOpt = False,
    prices: PricesOpt = None,
) -> None:
    """Private folder → DP descriptions → images: caption, evolve and render in one run directory."""
    overrides = settings_from(locals())  # first: the flags named like settings
    from spti.config import resolve_config
    from spti.pipeline import Reporter
    from spti.pipeline import synthesize as run_pipeline

    private = check_private_dir(private_dir)
    gate = {"max_cost": max_cost, "yes": yes, "dry_run": dry_run, "prices": prices}
    if not resume:  # before anything is written: the settings exactly as the run resolves them
        from spti.plan_check import check_plan

        planned = resolve_config(preset=preset, config_file=config, overrides=overrides)
        check_plan(planned, private, output)  # sizes, budget, output folder, devices, keys: before the cost plan
        cost_gate(planned, private, **gate)
    elif dry_run:
        raise SptiError("--dry-run plans a new run; for a resumed one run `spti plan` with its settings")
    with _open_run(output, preset, config, overrides, resume, private=private) as (run, cfg):
        if resume:
            cost_gate(cfg, private, **gate)
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
@user_errors
def caption(
    private_dir: Annotated[Path, typer.Argument(help="Folder of private images.")],
    output: OutputOpt,
    preset: PresetOpt = None,
    provider: ProviderOpt = None,
    base_url: BaseUrlOpt = None,
    caption_model: Annotated[str | None, Opt(help=f"Vision-language model: {SPEC}.")] = None,
    privacy_unit: PrivacyUnitOpt = None,
    domain: Annotated[str | None, Opt(help="Prompt set (its caption prompt is used).")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda.")] = None,
    batch_size: BatchSizeOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stage 1 only: caption each private image on its own into RUN_DIR/private/ (not DP)."""
    overrides = settings_from(locals())  # first: the flags named like settings
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, caption_stage

    private = check_private_dir(private_dir)
    with _open_run(output, preset, config, overrides, resume, private=private, stages=("caption",)) as (run, cfg):
        models = Models(cfg, run)
        try:
            caption_stage(cfg, run, models, private, Reporter(quiet=quiet))
        finally:
            models.close()
    typer.echo(f"captions written to {run.private / 'captions.jsonl'} (private: never share)")


@app.command(cls=SptiCommand)
@user_errors
def evolve(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory with captions (from `spti caption`).")] = None,
    captions: Annotated[Path | None, Opt(help="Bring your own private captions (JSONL: caption, unit).")] = None,
    output: Annotated[Path | None, Opt("--output", "-o", help="New run directory (with --captions).")] = None,
    epsilon: EpsOpt = None,
    delta: DeltaOpt = None,
    num_samples: Annotated[int | None, Opt(help="Descriptions to release.", min=1)] = None,
    iterations: IterationsOpt = None,
    preset: PresetOpt = None,
    provider: ProviderOpt = None,
    base_url: BaseUrlOpt = None,
    llm_model: LlmModelOpt = None,
    embedding_model: EmbeddingModelOpt = None,
    domain: DomainOpt = None,
    population_size: Annotated[int | None, Opt(help="Descriptions kept per round (auto: the most).", min=1)] = None,
    population: Annotated[str | None, Opt(help="fixed | auto (sized from the DP count of units).")] = None,
    target_signal: Annotated[float | None, Opt(help="--population auto: votes per candidate ÷ σ.")] = None,
    seeding: Annotated[str | None, Opt(help="attributes | none.")] = None,
    seeding_share: Annotated[float | None, Opt(help="Budget share (of μ²) for seeding.", min=0.0, max=0.9)] = None,
    count_share: Annotated[float | None, Opt(help="Budget share (of μ²) for the DP count.", min=0.0, max=0.9)] = None,
    max_private: Annotated[int | None, Opt(help="Vote with a random subset of at most N units.", min=3)] = None,
    units_bound: Annotated[int | None, Opt(help="Public upper bound B on the units: δ = 1/(B·ln B).", min=3)] = None,
    variation_folds: VariationFoldsOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stage 2 only: Private Evolution with text voting; releases RUN_DIR/release/captions.jsonl."""
    overrides = settings_from(locals())  # first: the flags named like settings
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, evolve_stage

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
@user_errors
def render(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with released descriptions.")],
    image_model: ImageModelOpt = None,
    render_size: Annotated[
        int | None, Opt("--render-size", "--release-size", help="Side of released images before upscaling.", min=8)
    ] = None,
    release_render: ReleaseRenderOpt = None,
    release_model: ReleaseModelOpt = None,
    release_steps: ReleaseStepsOpt = None,
    release_guidance: ReleaseGuidanceOpt = None,
    upscaler: UpscalerOpt = None,
    upscale: UpscaleOpt = None,
    upscaler_model: UpscalerModelOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stage 3 only: draw and upscale the released descriptions (post-processing: no privacy cost)."""
    post = settings_from(locals())  # first: the flags named like settings
    from spti.backends.factory import Models
    from spti.pipeline import Reporter, render_stage
    from spti.rundir import RunDirectory

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


def _register_optional_commands() -> None:
    """Commands that live in their own modules (their heavy imports stay inside the commands)."""
    from spti.cli_audit import register as register_audit
    from spti.cli_evaluate import register as register_evaluate
    from spti.cli_models import register as register_models
    from spti.cli_plan import register as register_plan

    register_plan(app)
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
