"""``spti audit``: memorisation, text-overlap and canary checks of a run (results are NOT DP).

Registered on the main app by :func:`register`. Only typer and the standard library are imported
here; numpy, torch and the models load when the command runs, so ``spti --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from spti.cli_options import one_line_errors

_one_line_errors = one_line_errors("interrupted; the audit wrote nothing new")

EPILOG = (
    "Examples:\n\n"
    "  spti audit runs/r1\n\n"
    "  spti audit runs/r1 --private photos/ --features wavelet,dinov2 --percentile 1\n\n"
    "  spti audit runs/r1 --canaries 20 --json\n\n"
    "Results read the private data and are NOT differentially private: they are written to "
    "RUN_DIR/private/audit.json and audit.html (owner only). Never share them."
)


def parse_features(value: str) -> tuple[str, ...]:
    """``"wavelet,clip"`` → ``("wavelet", "clip")``; an empty or repeated spec is a user error."""
    from spti.errors import SptiError

    specs = tuple(part.strip() for part in value.split(",") if part.strip())
    if not specs:
        raise SptiError("--features: give one or two feature specs, e.g. wavelet,clip")
    if len(set(specs)) != len(specs):
        raise SptiError(f"--features {value!r} names the same feature space twice")
    return specs


def canary_cost_line(run: Any) -> str:
    """What ``--canaries`` costs, said before any work: two more runs on the same private data."""
    import math

    eps = run.load_config().epsilon
    each = f"ε={eps:g}" if math.isfinite(eps) else "ε=inf (no privacy)"
    total = f"2×{eps:g} = {2 * eps:g}" if math.isfinite(eps) else "inf"
    return (
        f"audit --canaries: reruns the pipeline twice on the same private data ({each} each), so it spends up to "
        f"twice the run's ε again ({total} more, on top of the run's own); its outputs stay in "
        f"{run.private / 'canary_audit'} and must never be shared"
    )


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to ``app``."""

    @app.command(epilog=EPILOG)
    @_one_line_errors
    def audit(
        run_dir: Annotated[Path, typer.Argument(help="Run directory to audit (from `spti synthesize`).")],
        private: Annotated[
            Path | None,
            typer.Option("--private", help="Private folder (default: the one recorded in the run's manifest)."),
        ] = None,
        features: Annotated[
            str,
            typer.Option(
                help="Two image feature spaces, comma separated: wavelet | clip[:ID] | dinov2[:ID] | inception:PATH."
            ),
        ] = "wavelet,clip",
        canaries: Annotated[
            int,
            typer.Option(
                help="Canaries to plant (K; 2K are drawn, K held out). Reruns the pipeline twice. 0 skips.", min=0
            ),
        ] = 0,
        percentile: Annotated[
            float, typer.Option(help="Fresh-sample percentile under which a released image counts as too close.")
        ] = 1.0,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps (feature extractors).")] = "auto",
        seed: Annotated[int, typer.Option(help="Public seed of the A/B split and of the canaries.")] = 0,
        as_json: Annotated[bool, typer.Option("--json", help="Print the audit as one JSON object.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ) -> None:
        """Look for memorised images and copied captions in a release. Results are NOT DP: owner only."""
        from spti.audit import AuditSettings, run_audit
        from spti.errors import SptiError
        from spti.pipeline import Reporter
        from spti.rundir import RunDirectory

        settings = AuditSettings(features=parse_features(features), percentile=percentile, seed=seed, device=device)
        run = RunDirectory(run_dir)
        if not run.exists():
            raise SptiError(f"{run.root} is not an spti run directory (no config.toml)")
        with run.lock():  # it writes under private/: one process at a time
            if canaries:
                typer.echo(canary_cost_line(run), err=True)
            reporter = Reporter(quiet=quiet or as_json)
            result = run_audit(run_dir, private, settings=settings, canaries=canaries, reporter=reporter)
        out = Path(result["run_dir"]) / "private"
        if as_json:
            typer.echo(json.dumps(result))
        else:
            _print_summary(result)
        typer.echo(
            f"wrote {out / 'audit.json'} and {out / 'audit.html'}: NOT differentially private, do not share",
            err=True,
        )


def _print_summary(result: dict[str, Any]) -> None:
    verdict = result["verdict"]
    lines = [
        f"audit of {result['run_dir']} — {result['banner']}",
        f"  {result['num_released_images']} released images vs {result['num_private_images']} private images",
        f"  pixel near-duplicates: {result['pixel']['num_near_duplicates']} "
        f"(NCC >= {result['pixel']['ncc_threshold']})",
    ]
    for spec, f in result["features"].items():
        if f.get("folds"):
            lines.append(
                f"  {spec}: {f['num_flagged']}/{result['num_released_images']} closer than fresh private samples "
                f"(expected at most {f['expected_fraction_at_most']:.3g} by chance; excess p={f['excess_p']:.3g})"
            )
        else:
            lines.append(f"  {spec}: {f.get('note', '')}")
    text = result.get("text")
    if text:
        lines.append(
            f"  text: {text['num_verbatim']} verbatim, {text['num_near_verbatim']} near-verbatim of "
            f"{text['num_released']} descriptions vs {text['num_private']} private captions"
        )
    if not text:
        lines.append(f"  text: skipped ({result.get('text_note')})")
    canary = result.get("canary")
    if canary:
        c = canary["counts"]
        lines.append(
            f"  canaries: planted matched {c['planted_matched']}/{c['planted']}, held-out {c['held_out_matched']}/"
            f"{c['held_out']}, control {c['control_matched']}/{c['planted']}; "
            f"one-run ε lower bound {canary['epsilon_lower_bound_one_run']:.3g}"
        )
    lines.append(
        ("MEMORISATION SUSPECTED: " if verdict["memorization_suspected"] or verdict["text_copy_suspected"] else "")
        + verdict["summary"]
    )
    typer.echo("\n".join(lines))
