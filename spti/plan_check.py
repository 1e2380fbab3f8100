"""Checks of a run's plan before any work: each returns a list of problems, one line each (empty: fine).

:func:`check_plan` runs them all and refuses the first problem in one line, before a run folder is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from spti.errors import SptiError

if TYPE_CHECKING:
    from spti.config import ModelSpec, RunConfig

DEFAULT_KEY_ENV = "OPENAI_API_KEY"  # the key variable of openai roles that name none


def check_models(cfg: RunConfig) -> list[str]:
    """The models the run needs that this machine does not have, each with the command that fetches it.

    A weights file (FID Inception, Real-ESRGAN) that is not on disk is always a problem; a Hugging
    Face model that is not in the cache only offline (``HF_HUB_OFFLINE``, or the hub's host does not
    answer within 3 s: then the process is switched to offline mode so cached models load without
    retries). Hosted roles need nothing downloaded (their key variables are another check). No
    network call beyond that one reachability probe; see :mod:`spti.models_check`.
    """
    from spti.models_check import check_models as _check
    from spti.models_check import use_offline_mode

    problems = _check(cfg, offline=False)  # files: always
    statuses_need_hub = _check(cfg, offline=True)
    if len(statuses_need_hub) > len(problems) and use_offline_mode():
        return statuses_need_hub
    return problems


# --------------------------------------------------------------------------------------------
# The whole plan, before any work and before the run folder is made
# --------------------------------------------------------------------------------------------
STAGES = ("caption", "evolve", "render")
_RANKS = re.compile(r"round (\d+) ranks (\d+) candidates but must keep (\d+)")


def check_plan(
    cfg: RunConfig,
    private_dir: Path | None,
    output: Path,
    *,
    new_run: bool = True,
    stages: Sequence[str] = STAGES,
) -> None:
    """Refuse (one :class:`SptiError` line) a run that cannot work, before anything is written.

    ``private_dir`` is ``None`` when the run brings its own captions; ``new_run`` is false when an
    existing run directory is continued (``--resume``, ``spti evolve RUN``, ``spti render RUN``);
    ``stages`` are those the command runs (the models of the others are not needed).
    """
    problems = plan_problems(cfg, private_dir, output, new_run=new_run, stages=stages)
    if problems:
        raise SptiError(problems[0])


def plan_problems(
    cfg: RunConfig,
    private_dir: Path | None,
    output: Path,
    *,
    new_run: bool = True,
    stages: Sequence[str] = STAGES,
) -> list[str]:
    """Every problem of the plan, one line each, in the order a user should fix them."""
    problems = check_location(private_dir, output)
    if problems:
        return problems  # nothing else is checked (or probed) inside the private folder
    if new_run:
        problems += check_output(output)
    if new_run or "evolve" in stages:
        problems += check_schedule(cfg, new_run=new_run)
    roles = roles_used(cfg, stages)
    problems += check_device(cfg, roles)
    problems += check_api_keys(cfg, roles)
    if getattr(cfg, "executor", "local") == "local":
        # every model the run needs, named at once with the command that fetches each (Ray workers
        # build their models on their own machines, so they are not checked here)
        problems += missing_models_problem(cfg, stages)
    return problems


def missing_models_problem(cfg: RunConfig, stages: Sequence[str] = STAGES) -> list[str]:
    """One problem naming every model the stages need that this machine lacks, or none."""
    from spti import models_check

    done = [s for s in ("caption", "evolve") if s not in stages]
    statuses = models_check.model_statuses(cfg, done)
    offline = any(s.repo_id for s in statuses) and models_check.use_offline_mode()
    missing = [s for s in statuses if s.missing and (offline or not s.repo_id)]
    return [models_check.missing_models_message(missing, offline=offline, resume_hint=False)] if missing else []


def _one_line(check: Callable[[], object]) -> list[str]:
    try:
        check()
    except SptiError as exc:
        return [str(exc)]
    return []


def check_location(private_dir: Path | None, output: Path) -> list[str]:
    """The output folder is outside the private folder and holds no private folder."""
    if private_dir is None:
        return []
    from spti.data import check_output_location

    return _one_line(lambda: check_output_location(private_dir, output))


def check_output(output: Path) -> list[str]:
    """A new run can be made at ``output``: not a file, not another run, a folder this user can write."""
    from spti.rundir import RunDirectory

    return _one_line(RunDirectory(output).check_creatable)


def check_schedule(cfg: RunConfig, *, new_run: bool = True) -> list[str]:
    """Sizes, schedule and privacy budget fit together (the PE settings and the noise plan)."""
    from spti.pipeline import pe_config

    fix = "" if new_run else "; this run cannot continue with these settings: start a new run in a new --output"
    try:
        pe_cfg = pe_config(cfg)
    except ValueError as exc:
        return [_schedule_message(cfg, str(exc)) + fix]
    try:
        pe_cfg.noise_plan()
    except ValueError as exc:
        return [f"invalid privacy settings (--epsilon {cfg.epsilon:g}, --delta): {exc}{fix}"]
    return []


def _schedule_message(cfg: RunConfig, message: str) -> str:
    """A PE settings error in the CLI's words (its flags), with the fix."""
    found = _RANKS.search(message)
    if found and int(found.group(1)) == cfg.iterations - 1:
        ranked = int(found.group(2))
        return (
            f"--num-samples {cfg.num_samples} is more than the {ranked} candidates the last round ranks "
            f"(--population-size {cfg.population_size} × (1 + --variation-folds {cfg.variation_folds})); "
            f"lower --num-samples to at most {ranked}, or raise --population-size or --variation-folds"
        )
    if found:
        return (
            f"round {found.group(1)} ranks {found.group(2)} candidates but must keep {found.group(3)} "
            "(--population-size); raise --variation-folds or lower --population-size"
        )
    return "invalid population settings: " + message.removeprefix("invalid PE settings: ")


def roles_used(cfg: RunConfig, stages: Sequence[str] = STAGES) -> list[str]:
    """The model roles the given stages call (``synthesize`` with image voting captions nothing)."""
    roles: list[str] = []
    if "caption" in stages and (cfg.voting == "text" or tuple(stages) == ("caption",)):
        roles.append("caption")
    if "evolve" in stages:
        roles += ["llm", "text_embedding"] if cfg.voting == "text" else ["llm", "image", "image_features"]
    if "render" in stages:
        roles += [r for r in ("image", "release_image") if r not in roles]
        if cfg.upscaler in ("realesrgan", "sd-x4"):
            roles.append("upscaler")
    return roles


def _uses_torch(cfg: RunConfig, role: str) -> bool:
    spec = cfg.model_spec(role)
    if spec.provider != "local":
        return False
    if role == "image_features":
        return spec.model != "wavelet"
    return True


def check_device(cfg: RunConfig, roles: Sequence[str]) -> list[str]:
    """``--device cuda[:N]`` only where CUDA is there (asked only when a local torch model runs)."""
    if not cfg.device.startswith("cuda") or not any(_uses_torch(cfg, r) for r in roles):
        return []
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA device: use --device cpu or auto"]
    index = cfg.device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        count = torch.cuda.device_count()
        return [f"--device {cfg.device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"]
    return []


def check_api_keys(cfg: RunConfig, roles: Sequence[str]) -> list[str]:
    """Every openai role has its key: its ``api_key_env`` variable set, or ``$OPENAI_API_KEY`` for
    api.openai.com (servers such as vLLM or llama.cpp take none)."""
    from spti.backends.openai.helpers import split_base_urls

    problems: list[str] = []
    for role in roles:
        spec = cfg.model_spec(role)
        if spec.provider != "openai":
            continue
        if spec.endpoints:
            problems.extend(_fleet_key_problems(role, spec))
            continue
        if spec.api_key_env:
            if not os.environ.get(spec.api_key_env):
                problems.append(
                    f"the {role} model {spec} reads its API key from ${spec.api_key_env}, which is not set; "
                    f"export {spec.api_key_env}=... (or change api_key_env in [models.{role}])"
                )
            continue
        try:
            urls = split_base_urls(cfg.endpoint_base_url(spec))
        except SptiError as exc:
            problems.append(str(exc))
            continue
        if os.environ.get(DEFAULT_KEY_ENV):
            continue
        if any(urlsplit(url).hostname == "api.openai.com" for url in urls):
            problems.append(
                f"the {role} model {spec} runs on api.openai.com and needs an API key: export "
                f"{DEFAULT_KEY_ENV}=... (or point --base-url at your own OpenAI-compatible server)"
            )
    return problems


def _fleet_key_problems(role: str, spec: ModelSpec) -> list[str]:
    """Each endpoint of a role's ``endpoints`` list has its key: its ``api_key_env`` (its own, else
    the role's) set, or ``$OPENAI_API_KEY`` where it is api.openai.com."""
    from spti.backends.openai.helpers import describe_endpoint

    problems = []
    for endpoint in spec.endpoints:
        label = endpoint.name or describe_endpoint(endpoint.base_url)
        if endpoint.api_key_env:
            if not os.environ.get(endpoint.api_key_env):
                problems.append(
                    f"endpoint {label} of the {role} model reads its API key from ${endpoint.api_key_env}, "
                    f"which is not set; export {endpoint.api_key_env}=... "
                    f"(or change its api_key_env in [models.{role}] endpoints)"
                )
        elif urlsplit(endpoint.base_url).hostname == "api.openai.com" and not os.environ.get(DEFAULT_KEY_ENV):
            problems.append(
                f"endpoint {label} of the {role} model is api.openai.com and needs an API key: export "
                f"{DEFAULT_KEY_ENV}=... (or name its variable with api_key_env in [models.{role}] endpoints)"
            )
    return problems
