"""``spti models list|check|download``: the models a preset or config needs, and whether they are here.

Registered on the main app by :func:`register`. Needs no network (``download`` aside) and imports
no torch: a check takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from spti.cli_options import ConfigOpt, PresetOpt, one_line_errors

EPILOG = (
    "Examples:\n\n"
    "  spti models list --preset paper\n\n"
    "  spti models check --config my.toml      # exit 1 when a model is missing\n\n"
    "  spti models download --preset quick     # fetch the missing ones into the Hugging Face cache\n\n"
    "On a machine without internet: run `spti models list` there, `hf download ID` for each missing "
    "model on a connected machine, copy its Hugging Face cache ($HF_HOME, default ~/.cache/huggingface) "
    "over and point HF_HOME at it."
)

# `spti models download` fetches into the Hugging Face cache; what it finished stays there
_run = one_line_errors("interrupted; run the command again to fetch the rest")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

models_app = typer.Typer(
    name="models",
    help="The models a preset or config needs: list them, check they are here, download the missing ones.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _statuses(preset: str | None, config: Path | None) -> tuple[Any, list[Any]]:
    """The resolved config and its models. A config that names the FID Inception embedder without
    its weights file (the paper preset) is refused by a run; here that file is listed as missing."""
    import dataclasses

    from spti.config import resolve_config
    from spti.errors import SptiError
    from spti.models_check import image_features_status, model_statuses

    try:
        cfg = resolve_config(preset=preset, config_file=config)
        return cfg, model_statuses(cfg)
    except SptiError as exc:
        if "Inception embedder needs its weights file" not in str(exc):
            raise
    cfg = resolve_config(preset=preset, config_file=config, overrides={"image_embedder": "wavelet"})
    statuses = model_statuses(cfg)
    fixed = [image_features_status("inception") if s.role == "image_features" else s for s in statuses]
    return dataclasses.replace(cfg), fixed


def _table(cfg: Any, statuses: list[Any]) -> str:
    width = max([len(s.model) for s in statuses] + [5])
    lines = [f"models of the {cfg.preset} preset:"]
    for s in statuses:
        lines.append(f"  {s.role:<15} {s.model:<{width}}  {s.status:<10}  {s.detail}")
        if s.missing and s.fetch:
            lines.append(f"  {'':<15} {'':<{width}}  {'':<10}  fetch: {s.fetch}")
    return "\n".join(lines)


@models_app.command("list", epilog=EPILOG)
@_run
def list_models(preset: PresetOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Each role's model and where it is: cached, local path, built-in, hosted or missing."""
    cfg, statuses = _statuses(preset, config)
    if as_json:
        typer.echo(json.dumps({"preset": cfg.preset, "models": [s.as_dict() for s in statuses]}))
        return
    typer.echo(_table(cfg, statuses))


@models_app.command("check", epilog=EPILOG)
@_run
def check_models(preset: PresetOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Exit 1 when a model the run needs is not on this machine (each named with its fetch command)."""
    from spti.models_check import missing_models_message

    cfg, statuses = _statuses(preset, config)
    missing = [s for s in statuses if s.missing]
    if as_json:
        typer.echo(json.dumps({"preset": cfg.preset, "missing": [s.as_dict() for s in missing]}))
    elif missing:
        typer.echo(missing_models_message(missing, offline=False), err=True)
    else:
        typer.echo(f"all {len(statuses)} models of the {cfg.preset} preset are here (or hosted)")
    if missing:
        raise typer.Exit(1)


@models_app.command("download", epilog=EPILOG)
@_run
def download_models(preset: PresetOpt = None, config: ConfigOpt = None) -> None:
    """Fetch the missing Hugging Face models into the cache ($HF_HOME); one line per model that could not come."""
    from spti.models_check import download_missing

    cfg, statuses = _statuses(preset, config)
    if not any(s.missing for s in statuses):
        typer.echo(f"nothing to download: all {len(statuses)} models of the {cfg.preset} preset are here")
        return
    failed = 0
    for status, problem in download_missing(statuses):
        if problem is None:
            typer.echo(f"downloaded {status.model} ({status.role})")
        else:
            failed += 1
            typer.echo(f"error: {status.role} model {status.model}: {problem}", err=True)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``models`` command group to ``app``."""
    app.add_typer(models_app, name="models")
