"""``spti budget`` and ``spti plan``: the privacy noise and the cost of a run, before it runs (they write nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from spti.cli_options import (
    SPEC,
    BaseUrlOpt,
    ConfigOpt,
    EmbeddingModelOpt,
    EpsOpt,
    ImageModelOpt,
    LlmModelOpt,
    MaxCostOpt,
    NumSamplesOpt,
    Opt,
    PresetOpt,
    PricesOpt,
    PrivacyUnitOpt,
    ProviderOpt,
    ReleaseModelOpt,
    SptiCommand,
    VariationFoldsOpt,
    check_private_dir,
    cost_gate,
    fail,
    parse_epsilon,
    settings_from,
    user_errors,
)


def register(app: typer.Typer) -> None:
    app.command(
        cls=SptiCommand,
        epilog=(
            "Examples:\n\n"
            "  spti budget --epsilon 1 --delta 1e-5 --iterations 10\n\n"
            "  spti budget --epsilon 4 --iterations 10 --num-private 30000 --population 14000 --json"
        ),
    )(budget)
    app.command(
        cls=SptiCommand,
        epilog=(
            "Examples:\n\n"
            "  spti plan --preset openai --num-private 24\n\n"
            "  spti plan photos/ --preset openai --iterations 3 --max-cost 5\n\n"
            "  spti plan photos/ --config run.toml --prices my_prices.toml --json"
        ),
    )(plan)


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

    eps = parse_epsilon(epsilon)
    try:
        if delta is None:
            if num_private is None:
                raise fail("pass --delta, or --num-private N to use the default delta 1/(N·ln N)")
            delta = accounting.default_delta(num_private)
        if num_private is not None:
            accounting.check_delta_for_units(delta, num_private)
        plan = accounting.plan_noise(epsilon=eps, delta=delta, rounds=iterations, count_share=count_share)
    except ValueError as exc:
        raise fail(str(exc)) from None
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


@user_errors
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
    num_samples: NumSamplesOpt = None,
    iterations: Annotated[int | None, Opt(help="PE rounds.", min=1)] = None,
    voting: Annotated[str | None, Opt(help="text | image.")] = None,
    provider: ProviderOpt = None,
    base_url: BaseUrlOpt = None,
    caption_model: Annotated[str | None, Opt(help=f"Captioner: {SPEC}.")] = None,
    llm_model: LlmModelOpt = None,
    embedding_model: EmbeddingModelOpt = None,
    image_model: ImageModelOpt = None,
    release_model: ReleaseModelOpt = None,
    population_size: Annotated[int | None, Opt(help="Descriptions kept per round.", min=1)] = None,
    population: Annotated[str | None, Opt(help="fixed | auto (planned with the count of files).")] = None,
    variation_folds: VariationFoldsOpt = None,
    max_private: Annotated[int | None, Opt(help="Vote with at most this many privacy units.", min=3)] = None,
    render_size: Annotated[
        int | None, Opt("--render-size", "--release-size", help="Side of released images before upscaling.", min=8)
    ] = None,
    vote_seeds: Annotated[int | None, Opt(help="Image voting: renders per candidate.", min=1)] = None,
    privacy_unit: PrivacyUnitOpt = None,
    domain: Annotated[str | None, Opt(help="Prompt set.")] = None,
    prices: PricesOpt = None,
    max_cost: MaxCostOpt = None,
    as_json: Annotated[bool, Opt("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    """Requests, tokens, images and estimated cost per model role of a run, before it runs.

    Settings resolve exactly as `spti synthesize` resolves them (preset < --config < flags); every
    other synthesize flag is planned with `spti synthesize ... --dry-run`. Writes nothing.
    """
    overrides = settings_from(locals())  # first: the flags named like settings
    from spti.config import resolve_config

    cfg = resolve_config(preset=preset, config_file=config, overrides=overrides)
    private = check_private_dir(private_dir) if private_dir is not None else None
    cost_gate(
        cfg,
        private,
        max_cost=max_cost,
        yes=True,
        dry_run=True,
        prices=prices,
        num_private=num_private,
        as_json=as_json,
    )
