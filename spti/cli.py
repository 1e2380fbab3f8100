"""The ``spti`` command line. Thin: parse, validate, call the library, print.

Heavy modules (dp-accounting/scipy, torch, transformers, diffusers, openai) are imported inside
the commands that need them, so ``spti --help`` starts quickly.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated

import typer

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


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from spti import __version__

        typer.echo(f"spti {__version__}")
        raise typer.Exit()


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
    epilog=(
        "Examples:\n\n"
        "  spti budget --epsilon 1 --delta 1e-5 --iterations 10\n\n"
        "  spti budget --epsilon 4 --iterations 10 --num-private 30000 --population 14000 --json"
    )
)
def budget(
    epsilon: Annotated[str, typer.Option("--epsilon", "-e", help="Target ε ('inf' for no privacy).")] = "1.0",
    delta: Annotated[
        float | None,
        typer.Option(help="Target δ. Default with --num-private: 1/(N·ln N)."),
    ] = None,
    iterations: Annotated[
        int, typer.Option("--iterations", "-T", help="PE rounds (noisy releases).", min=1)
    ] = 10,
    num_private: Annotated[
        int | None, typer.Option("--num-private", "-N", help="Number of privacy units that vote.", min=1)
    ] = None,
    population: Annotated[
        int | None, typer.Option("--population", "-M", help="Candidates voted on per round.", min=1)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Noise per round for a privacy budget, and whether the votes will rise above it."""
    from private_evolution import accounting

    eps = _parse_epsilon(epsilon)
    try:
        if delta is None:
            if num_private is None:
                raise _fail("pass --delta, or --num-private N to use the default delta 1/(N·ln N)")
            delta = accounting.default_delta(num_private)
        if num_private is not None:
            accounting.check_delta_for_units(delta, num_private)
        sigma = accounting.noise_multiplier(epsilon=eps, delta=delta, rounds=iterations)
        achieved = (
            accounting.epsilon(noise_multiplier=sigma, delta=delta, rounds=iterations) if sigma > 0 else eps
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    mu = accounting.gdp_mu(sigma, iterations) if sigma > 0 else math.inf
    report: dict[str, object] = {
        "epsilon": eps if math.isfinite(eps) else "inf",
        "delta": delta,
        "iterations": iterations,
        "noise_multiplier": sigma,
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
    table.add_row("noise multiplier σ", f"{sigma:.4f}")
    table.add_row("Gaussian DP μ = √T/σ", f"{mu:.4f}")
    table.add_row("achieved ε", f"{achieved:.6g}")
    if "expected_votes_per_candidate" in report:
        table.add_row("expected votes / candidate (N/M)", f"{report['expected_votes_per_candidate']:.4g}")
        table.add_row("signal / noise (N/M ÷ σ)", f"{report['signal_to_noise']:.3g}")
    console.print(table)
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")


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
