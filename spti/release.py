"""What ``release/privacy.json`` states, and the checks that keep ``release/`` one release.

The statement is built from public inputs and DP releases only: the budget, the noise plan, the
ledger's releases and the DP count of units — never the exact number of private units, which
under add/remove neighbours is itself private. It names the ledger's releases (and a hash of them)
and the hash of ``release/captions.jsonl``, so a resumed stage can tell whether what is on disk
still belongs together (:func:`check_release_matches`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spti.errors import SptiError

if TYPE_CHECKING:
    from private_evolution import PEResult, PrivacyLedger
    from spti.config import RunConfig
    from spti.rundir import RunDirectory

# Digits of the noisy votes in release/captions.jsonl: selection already happened, and the low bits
# of floating-point noise are what floating-point attacks on DP samplers read.
VOTE_DIGITS = 1

# Points of the privacy curve shown besides the headline (ε, δ).
PROFILE_DELTAS = (1e-5, 1e-6, 1e-7, 1e-8)

NOT_DP = {
    "private/": (
        "captions of the private images, their embeddings and image features, the manifest and counts of "
        "the private files, the hosted-model request cache, the PE data fingerprint, evaluation and audit "
        "results: NOT differentially private, owner-only, never share"
    ),
    "state/": (
        "checkpoints: public candidates and their embeddings, vote renders of public candidates and their "
        "features, the DP vote histograms (full precision), the DP unit count and seeding release, the ledger, "
        "stage bookkeeping, usage; DP or public, but owner-only and not part of the release"
    ),
    "console output": "a run's messages may name skipped private files and their problems",
}


def ledger_digest(ledger: PrivacyLedger) -> dict[str, Any]:
    """The ledger's releases as published: names and noise, plus a hash of both."""
    releases = [
        {"name": r.name, "noise_multiplier": r.noise_multiplier, "sensitivity": r.sensitivity, "mechanism": r.mechanism}
        for r in ledger.releases
    ]
    blob = json.dumps(releases, sort_keys=True, separators=(",", ":")).encode()
    return {"releases": releases, "sha256": hashlib.sha256(blob).hexdigest()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_rows(result: PEResult[str]) -> list[dict[str, Any]]:
    return [
        {"index": i, "id": sid, "text": text, "votes": round(float(v), VOTE_DIGITS)}
        for i, (sid, text, v) in enumerate(zip(result.ids, result.samples, result.votes, strict=True))
    ]


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("spti", "dp-accounting", "numpy", "torch", "transformers", "diffusers", "sentence-transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def privacy_statement(
    cfg: RunConfig,
    run: RunDirectory,
    result: PEResult[str],
    *,
    generation: dict[str, int],
    captions_sha256: str,
) -> dict[str, Any]:
    """The content of ``release/privacy.json`` for a finished evolve stage."""
    from private_evolution import accounting

    ledger = result.ledger
    spent = ledger.spent_epsilon()
    mu = ledger.mu()
    private = not math.isinf(spent)
    count = result.unit_count
    warnings: list[str] = []
    unit_count: dict[str, Any] | None = None
    conventional: dict[str, Any] | None = None
    if count is not None:
        unit_count = {
            "value": count.value,
            "noise_multiplier": count.noise_multiplier,
            "lower_bound": count.lower_bound(),
            "upper_bound": count.upper_bound(),
            "meaning": "a DP release of the number of privacy units that voted (Gaussian, sensitivity 1); "
            "bounds at 99.9% one-sided confidence",
        }
        conv = count.conventional_delta()
        if conv is not None and private:
            conventional = {"delta": conv, "epsilon": accounting.epsilon_at(gdp_mu=mu, delta=conv)}
            if result.delta > conv:
                warnings.append(
                    f"delta={result.delta:.3g} is larger than the conventional 1/(N ln N) = {conv:.3g} for about "
                    f"{count.lower_bound():.0f} units; pass a smaller --delta for a stronger statement"
                )
        if private and result.noise_multiplier > 0:
            per_candidate = max(count.value, 0.0) / max(1, _candidates_per_round(result))
            if per_candidate < result.noise_multiplier:
                warnings.append(
                    f"signal below noise: a candidate expects about {per_candidate:.3g} votes per round "
                    f"(DP count / candidates) but the noise std is {result.noise_multiplier:.3g}"
                )
    if not private:
        warnings.insert(0, "epsilon is infinite: this release is NOT differentially private")
    if result.delta > 1e-5 and private:
        warnings.append(f"delta={result.delta:.3g} is larger than 1e-5")
    released = inspect_released_texts(result.samples, cfg)
    warnings.extend(released.warnings())
    fallbacks = sum(v for k, v in generation.items() if k.endswith("fallbacks"))
    if fallbacks:
        warnings.append(f"{fallbacks} LLM answers were unusable and replaced by public fallbacks")
    profile = (
        [{"delta": d, "epsilon": accounting.epsilon_at(gdp_mu=mu, delta=d)} for d in PROFILE_DELTAS] if private else []
    )
    return {
        "differentially_private": private,
        "epsilon": _finite(spent),
        "delta": result.delta,
        "epsilon_budget": _finite(cfg.epsilon),
        "gdp_mu": _finite(mu),
        "noise_multiplier": result.noise_multiplier,
        "iterations": cfg.iterations,
        "privacy_unit": cfg.privacy_unit,
        "unit_source": run.unit_source(),
        "neighbouring_relation": f"add or remove one privacy unit ({run.unit_source()})",
        "delta_source": _delta_source(cfg),
        "unit_count": unit_count,
        "conventional_delta": conventional,
        "population": {
            "mode": cfg.population,
            "candidates_per_round": _candidates_per_round(result),
            "sized_from": "the DP unit count" if cfg.population == "auto" else "the settings",
        },
        "seeding": {
            "used": result.seeding is not None,
            "noise_multiplier": result.plan.seeding_noise_multiplier,
            "what": "a DP histogram of the public attribute values the private captions mention, weighting the "
            "random API's first population"
            if result.seeding is not None
            else None,
        },
        "privacy_profile": profile,
        "ledger": ledger_digest(ledger),
        "redrawn_releases": [r.name for r in ledger.releases if "#" in r.name],
        "mechanism": (
            "Gaussian mechanism on nearest-neighbour vote histograms (each unit's vote vector has L2 norm <= 1; "
            "canonical votes: identical candidates are one bin, exact float64 re-scoring, ties to the lowest index), "
            f"k={cfg.k}, threshold={cfg.threshold}, {cfg.voting} voting; {cfg.iterations} round releases, the "
            "DP unit count"
            + (" and the seeding release" if result.seeding is not None else "")
            + " composed exactly as Gaussian DP; epsilon from dp-accounting's analytical Gaussian mechanism"
        ),
        "voting": cfg.voting,
        "noise_source": (
            "numpy PCG64DXSM seeded from OS entropy (independent of --seed), standard normal by numpy's ziggurat; "
            "floating point, not hardened against floating-point attacks; released votes rounded to "
            f"{VOTE_DIGITS} decimal"
        ),
        "private_data_sent_to": run.private_data_endpoints(),
        "models": _model_routes(cfg),
        "not_dp": NOT_DP,
        "generation_fallbacks": generation,
        "junk_in_release": released.junk,
        "attribute_templates_in_release": released.templates,
        "warnings": warnings,
        "captions_sha256": captions_sha256,
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# Roles that read private data (the rest see only public prompts and DP-selected descriptions).
PRIVATE_ROLES = frozenset({"caption", "text_embedding", "image_features"})


def _model_routes(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Every role of the run: its provider, model and endpoint (never a key), and whether it reads
    private data. Public settings; which endpoints did receive private data is under
    ``private_data_sent_to``."""
    from spti.config import ROLE_FIELDS

    routes: dict[str, dict[str, Any]] = {}
    for role in ROLE_FIELDS:
        try:
            spec = cfg.model_spec(role)
        except Exception:  # a role this run does not configure
            continue
        if not spec.model:
            continue
        routes[role] = {
            "provider": spec.provider,
            "model": spec.model,
            "endpoint": "local" if spec.provider == "local" else _hosted_endpoint(cfg.endpoint_base_url(spec)),
            "reads_private_data": role in PRIVATE_ROLES,
        }
    return routes


def _hosted_endpoint(base_url: str | None) -> str:
    from spti.backends.openai_api import describe_endpoint

    return describe_endpoint(base_url)


@dataclass(frozen=True)
class ReleasedTexts:
    """What the released texts are, read from the texts alone (post-processing, no privacy cost)."""

    count: int
    junk: dict[str, int]  # texts the junk check would reject (blanks left, refusals, echoes…), by reason
    templates: int  # texts that are the random API's attribute template rather than LLM prose

    def warnings(self) -> list[str]:
        out = []
        if self.junk:
            out.append(f"{sum(self.junk.values())} released descriptions look like junk LLM answers ({self.junk})")
        if self.templates:
            out.append(
                f"{self.templates} of {self.count} released descriptions are the attribute template "
                "(the LLM ignored what its prompt asked for; a stronger LLM writes prose instead)"
            )
        return out


def inspect_released_texts(texts: Sequence[str], cfg: RunConfig) -> ReleasedTexts:
    """Count junk and attribute templates among ``texts`` for ``cfg``'s domain and word floor."""
    junk, templates = _junk_in_release(texts, cfg), _templates_in_release(texts, cfg)
    return ReleasedTexts(count=len(texts), junk=junk, templates=templates)


def _junk_in_release(texts: Sequence[str], cfg: RunConfig) -> dict[str, int]:
    from spti.llm_answers import junk_reason
    from spti.pipeline import variation_settings

    # the generator's own word floor, so the release is checked by the rule its answers passed
    min_words = variation_settings(cfg).junk_min_words
    counts: dict[str, int] = {}
    for text in texts:
        reason = junk_reason(text, min_words=min_words)
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _templates_in_release(texts: Sequence[str], cfg: RunConfig) -> int:
    from spti.prompts import load_prompt_set
    from spti.text_evolution import is_attribute_template

    try:
        prompts = load_prompt_set(cfg.domain)
    except SptiError:
        return 0
    return sum(is_attribute_template(text, prompts) for text in texts)


def _candidates_per_round(result: PEResult[str]) -> int:
    run_cfg = result.config
    if run_cfg is None:
        return 0
    return run_cfg.population_at(1) if run_cfg.iterations > 1 else run_cfg.population_at(0)


def _delta_source(cfg: RunConfig) -> str:
    if cfg.delta is not None:
        return "given by the user"
    if cfg.units_bound is not None:
        return f"1/(B ln B) for the public bound B={cfg.units_bound} on the number of units"
    return "the public default 1e-6 (delta never depends on the private number of units)"


def load_statement(run: RunDirectory) -> dict[str, Any] | None:
    path = run.release / "privacy.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_release_matches(run: RunDirectory, ledger_path: Path) -> None:
    """Refuse to go on when ``release/`` no longer belongs to the run's ledger.

    ``release/privacy.json`` names the ledger's releases and the hash of ``release/captions.jsonl``:
    a ledger that is missing or different, or captions that changed, mean that what is on disk
    would mix draws, and the stated ε would not cover it.
    """
    from private_evolution import PrivacyLedger

    statement = load_statement(run)
    captions = run.release / "captions.jsonl"
    if statement is None:
        raise SptiError(f"{run.release} has no privacy.json: run `spti evolve` (or `--resume`) first")
    if not ledger_path.exists():
        raise SptiError(
            f"{ledger_path} is missing but {run.release} holds a release: the privacy it spent is unknown and a "
            "new ledger would mix draws; start a new run in a new --output"
        )
    digest = ledger_digest(PrivacyLedger.load(ledger_path))
    expected = statement.get("ledger", {}).get("sha256")
    if digest["sha256"] != expected:
        raise SptiError(
            f"{run.release / 'privacy.json'} does not match the ledger {ledger_path} (other releases): release/ "
            "would mix draws; start a new run in a new --output"
        )
    if not captions.exists() or file_sha256(captions) != statement.get("captions_sha256"):
        raise SptiError(
            f"{captions} does not match {run.release / 'privacy.json'}: the released descriptions changed; "
            "start a new run in a new --output"
        )
