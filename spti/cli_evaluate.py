"""The ``spti evaluate`` command: metrics of a run against its private data (NOT DP, owner only).

Only typer and the standard library are imported here, so registering the command costs the CLI's
start-up nothing; numpy, scipy and the models are imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spti.cli_options import one_line_errors

_one_line_errors = one_line_errors("interrupted; nothing was written")

_METRIC_HELP = "Comma list of: fid, fd-dinov2, fd-clip, precision-recall, clip-score, wavelet, text-fd (default: all)."
_EPILOG = (
    "Results are NOT differentially private: they are computed from your private data and written to "
    "RUN_DIR/private/evaluation.json and evaluation.html for you only.\n\n"
    "Examples:\n\n"
    "  spti evaluate runs/faces --inception-weights ~/models/pt_inception-2015-12-05-6726825d.pth\n\n"
    "  spti evaluate runs/faces --protocol paper --metrics fid --inception-weights inception-2015-12-05.pt\n\n"
    "  spti evaluate runs/faces --metrics wavelet,text-fd --max-images 200 --json"
)


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a finished (rendered) run.")],
    private: Annotated[
        Path | None,
        typer.Option("--private", help="Private image folder (default: the one recorded in the run)."),
    ] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", "-m", help=_METRIC_HELP)] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            help="FID Inception-v3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the "
            "TorchScript inception-2015-12-05.pt (StyleGAN, clean-fid); without it FID is skipped.",
        ),
    ] = None,
    clip_model: Annotated[
        str, typer.Option("--clip-model", help="CLIP checkpoint (id or folder) for fd-clip and clip-score.")
    ] = "openai/clip-vit-base-patch32",
    dinov2_model: Annotated[
        str, typer.Option("--dinov2-model", help="DINOv2 checkpoint for fd-dinov2 and precision-recall.")
    ] = "facebook/dinov2-small",
    text_model: Annotated[
        str | None,
        typer.Option("--text-model", help="Sentence-transformers model for text-fd (default: the run's)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")] = "auto",
    max_images: Annotated[
        int | None,
        typer.Option("--max-images", min=2, help="Use a fixed random subset of at most N images per side."),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="native: the images as they are. paper: FID comparable with the SPTI paper (both sides "
            "Resize(256)+CenterCrop(256), clean-fid bicubic resize to 299, up to --reference-size private images).",
        ),
    ] = "native",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the private reference draw (--protocol paper).")] = 0,
    reference_size: Annotated[
        int,
        typer.Option("--reference-size", min=2, help="Private reference images under --protocol paper."),
    ] = 20_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation as one JSON object.")] = False,
) -> None:
    """Compare the release with the private data (FID, FD-DINOv2/CLIP, precision/recall, CLIP score,
    wavelet spectra, text FD). NOT differentially private: for the data owner only."""
    from spti.errors import SptiError
    from spti.evaluate import NOT_DP_WARNING, evaluate_run, headline, parse_metrics
    from spti.rundir import RunDirectory

    chosen = parse_metrics(metrics)

    def say(message: str) -> None:
        typer.echo(f"evaluate: {message}", err=True)

    run = RunDirectory(run_dir)
    if not run.exists():
        raise SptiError(f"{run.root} is not an spti run directory (no config.toml)")
    with run.lock():  # it writes private/evaluation.*: one process at a time
        report = evaluate_run(
            run_dir,
            private,
            chosen,
            device=device,
            inception_weights=inception_weights,
            clip_model=clip_model,
            dinov2_model=dinov2_model,
            text_model=text_model,
            max_images=max_images,
            progress=say,
            protocol=protocol,
            seed=seed,
            reference_size=reference_size,
        )
    typer.secho(f"warning: {NOT_DP_WARNING}", fg="red", bold=True, err=True)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    width = max(len(name) for name in report["metrics"])
    for name, result in report["metrics"].items():
        counts = ""
        if result.get("status") == "ok":
            counts = f"  [{result.get('extractor', '')}; n={result.get('n_private', '-')} private"
            counts += f" / {result.get('n_released', '-')} released]"
        typer.echo(f"{name.ljust(width)}  {headline(result)}{counts}")
    outputs = report["outputs"]
    typer.echo(f"wrote {outputs['json']} and {outputs['html']} (NOT differentially private: do not share)")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to ``app`` (called from :mod:`spti.cli`)."""
    app.command("evaluate", epilog=_EPILOG)(_one_line_errors(evaluate))
