"""caption → evolve → render over one run directory; every stage resumable.

- caption (text voting only): each private image is captioned on its own; captions are appended to
  ``private/captions.jsonl`` batch by batch, so a kill loses at most the batch in flight (and with a
  hosted provider, the request cache makes even that free).
- evolve: private captions (text voting) or private images (image voting) vote in PE rounds; only
  noisy histograms are released; the selected descriptions go to ``release/captions.jsonl``.
- render: each released description is drawn and upscaled; ``release/images/NNNNN.png``. This is
  post-processing of the DP release and costs no privacy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from private_evolution.files import (
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
)
from spti.config import RunConfig
from spti.errors import SptiError
from spti.rundir import RunDirectory


# --------------------------------------------------------------------------------------------
# Progress and messages
# --------------------------------------------------------------------------------------------
class Reporter:
    """Where the pipeline says what it does: rich progress bars on a terminal, plain lines otherwise."""

    def __init__(self, *, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=self.quiet,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


@dataclass
class RunSummary:
    run_dir: Path
    images: list[Path] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Stage 1: caption
# --------------------------------------------------------------------------------------------
def _scan(cfg: RunConfig, private_dir: Path, run: RunDirectory, reporter: Reporter) -> Any:
    from spti.data import check_output_location, scan_private_folder

    check_output_location(private_dir, run.root)

    def on_skip(item: Any) -> None:
        reporter.warn(f"skipped {item.relpath}: {item.reason}")

    folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit, on_skip=on_skip)  # type: ignore[arg-type]
    run.ensure_private()
    subset = _private_subset(run, [im.unit for im in folder.images], cfg.max_private)
    if subset is not None:
        folder.images = [im for im in folder.images if im.unit in subset]
        reporter.info(f"max-private: voting with a uniformly random subset of {len(subset)} privacy units")
    manifest = {
        "root": str(folder.root),
        "privacy_unit": folder.privacy_unit,
        "images": [{"relpath": im.relpath, "unit": im.unit} for im in folder.images],
        "skipped": [{"relpath": s.relpath, "reason": s.reason} for s in folder.skipped],
        "summary": folder.summary(),
    }
    atomic_write_json(run.private / "manifest.json", manifest)
    reporter.info(
        f"private folder: {len(folder.images)} images in {folder.num_units} privacy units "
        f"({cfg.privacy_unit}-level), {len(folder.skipped)} files skipped"
    )
    return folder


def _private_subset(run: RunDirectory, units: list[str], max_private: int | None) -> set[str] | None:
    """The units that vote when ``--max-private`` caps them: a uniformly random subset, drawn once
    from OS entropy (never from ``--seed``) and kept under ``private/`` so a resume uses the same."""
    path = run.private / "subset.json"
    if path.exists():
        return set(json.loads(path.read_text()))
    distinct = sorted(set(units))
    if max_private is None or len(distinct) <= max_private:
        return None
    rng = np.random.default_rng(np.random.SeedSequence())
    chosen = sorted(distinct[int(i)] for i in rng.choice(len(distinct), size=max_private, replace=False))
    atomic_write_json(path, chosen)
    return set(chosen)


def _load_manifest(run: RunDirectory) -> dict[str, Any]:
    path = run.private / "manifest.json"
    if not path.exists():
        raise SptiError(
            f"{run.root} has no scan of a private folder yet; run `spti caption` or `spti synthesize` first"
        )
    return json.loads(path.read_text())


def caption_stage(cfg: RunConfig, run: RunDirectory, models: Any, private_dir: Path, reporter: Reporter) -> None:
    from private_evolution.files import open_private_append
    from spti.data import load_image

    folder = _scan(cfg, private_dir, run, reporter)
    out_path = run.private / "captions.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if out_path.exists():
        for row in _read_captions(out_path, reporter, repair=True):
            if "relpath" in row:
                done[row["relpath"]] = row
    todo = [im for im in folder.images if im.relpath not in done]
    if not todo:
        reporter.info("caption: all private images already captioned")
    else:
        hosted = cfg.model_spec("caption").provider == "openai"
        if hosted:
            reporter.warn(
                f"private images will be sent to {models.endpoint_of('caption')} for captioning "
                f"(model {cfg.caption_model}); DP does not hide them from the provider"
            )
        prompt = _prompts(cfg).caption_prompt
        batch = max(1, cfg.concurrency if hosted else _parallel_batch(models, cfg.batch_size))
        with (
            open_private_append(out_path) as fh,
            reporter.progress("caption", len(folder.images)) as advance,
        ):
            advance(len(folder.images) - len(todo))
            for start in range(0, len(todo), batch):
                items = todo[start : start + batch]
                images, kept = [], []
                for im in items:
                    try:
                        images.append(load_image(im.path))
                        kept.append(im)
                    except SptiError as exc:
                        reporter.warn(str(exc))
                        done[im.relpath] = {
                            "relpath": im.relpath,
                            "unit": im.unit,
                            "caption": None,
                            "error": str(exc),
                        }
                        fh.write(json.dumps(done[im.relpath]) + "\n")
                captions = (
                    models.captioner.caption(
                        images,
                        prompt=prompt,
                        max_new_tokens=cfg.caption_max_tokens,
                        keys=[f"caption/{im.relpath}" for im in kept],
                    )
                    if images
                    else []
                )
                for im, cap in zip(kept, captions, strict=True):
                    row = {"relpath": im.relpath, "unit": im.unit, "caption": _clean_caption(cap)}
                    done[im.relpath] = row
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                advance(len(items))
    failed = sum(1 for r in done.values() if not r.get("caption"))
    if failed:
        reporter.warn(f"{failed} private images could not be captioned; they do not vote")
    # exact counts of private files stay under private/; stages.json (state/) holds public facts only
    atomic_write_json(
        run.private / "caption_stats.json",
        {
            "images": len(folder.images),
            "captioned": len(folder.images) - failed,
            "failed": failed,
            "skipped": len(folder.skipped),
        },
    )
    run.seal_private()
    run.record_private_endpoints("caption", _sent(models, "caption"))
    run.mark("caption")


def _parallel_batch(models: Any, batch: int) -> int:
    """Items to hand the models at once: ``batch``, or one batch per worker of a Ray executor."""
    parallel = getattr(models, "parallel_batch", None)
    return parallel(batch) if callable(parallel) else batch


def _sent(models: Any, *roles: str) -> dict[str, str]:
    """Where the stage's own roles sent private data (a Models object used by an earlier stage
    also remembers that stage's roles)."""
    return {role: endpoint for role, endpoint in models.endpoints.items() if role in roles}


def _clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None


def _read_captions(path: Path, reporter: Any, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of the append-only captions file: a torn last line (a kill mid-write) is ignored (and cut
    off with ``repair``), a bad line in the middle is skipped with a warning; the rows after it count."""
    from private_evolution.files import recover_jsonl

    found = recover_jsonl(path, repair=repair)
    for lineno in found.bad_lines:
        reporter.warn(f"{path}, line {lineno}: not a JSON object; skipped (the other lines are used)")
    return found.rows


def _prompts(cfg: RunConfig) -> Any:
    from spti.prompts import load_prompt_set

    return load_prompt_set(cfg.domain)


# --------------------------------------------------------------------------------------------
# Stage 2: evolve
# --------------------------------------------------------------------------------------------
@dataclass
class PrivateVotes:
    """What the private side brings to the vote (all of it NOT DP; it never leaves ``private/``)."""

    embeddings: np.ndarray
    units: np.ndarray
    captions: list[str] | None = None  # text voting: the captions that vote


def _private_votes(
    cfg: RunConfig, run: RunDirectory, models: Any, reporter: Reporter, captions_file: Path | None
) -> PrivateVotes:
    """Private embeddings, their privacy units (and captions), cached under ``private/``."""
    run.ensure_private()
    if cfg.voting == "text":
        source = captions_file or run.private / "captions.jsonl"
        if not source.exists():
            raise SptiError(f"no private captions at {source}; run the caption stage first")
        rows = [r for r in _read_captions(source, reporter) if r.get("caption")]
        all_units = [str(r.get("unit", r.get("relpath", i))) for i, r in enumerate(rows)]
        subset = _private_subset(run, all_units, cfg.max_private)
        if subset is not None:
            rows = [r for r, u in zip(rows, all_units, strict=True) if u in subset]
        if not rows:
            raise SptiError(f"{source} holds no usable captions")
        units = np.array([str(r.get("unit", r.get("relpath", i))) for i, r in enumerate(rows)])
        captions = [r["caption"] for r in rows]
        cache = run.private / "text_embeddings.npy"
        if cache.exists() and np.load(cache, mmap_mode="r").shape[0] == len(rows):
            return PrivateVotes(np.load(cache, mmap_mode="r"), units, captions)
        if cfg.model_spec("text_embedding").provider == "openai":
            reporter.warn(f"private captions will be sent to {models.endpoint_of('text_embedding')} for embedding")
        from spti.vote_spaces import TextVoteSpace

        with reporter.progress("embed private captions", len(rows)) as advance:
            emb = TextVoteSpace(models.text_embedder).embed(captions)
            advance(len(rows))
        atomic_save_npy(cache, emb)
        return PrivateVotes(emb, units, captions)
    # image voting: private images vote in image-feature space, features computed locally
    from spti.data import load_image

    manifest = _load_manifest(run)
    images = manifest["images"]
    units = np.array([im["unit"] for im in images])
    cache = run.private / "image_features.npy"
    # the cache belongs to one extractor at one input size; other settings compute it again
    spec_path = run.private / "image_features.json"
    spec = {"image_embedder": cfg.image_embedder, "voting_size": cfg.voting_size, "rows": len(images)}
    if cache.exists() and spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return PrivateVotes(np.load(cache, mmap_mode="r"), units)
    root = Path(manifest["root"])
    feats = []
    step = _parallel_batch(models, max(cfg.batch_size, 16))
    with reporter.progress("private image features", len(images)) as advance:
        for start in range(0, len(images), step):
            batch = [load_image(root / im["relpath"], size=cfg.voting_size) for im in images[start : start + step]]
            feats.append(np.asarray(models.image_embedder.embed(batch), dtype=np.float32))
            advance(len(batch))
    emb = np.concatenate(feats)
    atomic_save_npy(cache, emb)
    atomic_write_json(spec_path, spec)
    return PrivateVotes(emb, units)


class _RoundMetrics:
    """After each round: the Fréchet distance in the voting space between the selected candidates
    and the private set, appended to ``private/metrics_by_round.jsonl`` (owner-only, NOT DP; how
    rounds, lookahead and prompts are judged). A diagnostic never stops a run."""

    REFERENCE_ROWS = 5000  # a fixed random sample of the private set keeps each round cheap

    def __init__(self, run: RunDirectory, state: Path, private: np.ndarray, reporter: Reporter) -> None:
        self.path = run.private / "metrics_by_round.jsonl"
        self.state = state
        self.reporter = reporter
        rows = np.random.default_rng(0).permutation(len(private))[: self.REFERENCE_ROWS]
        self.reference = np.asarray(private)[np.sort(rows)]

    def __call__(self, result: Any) -> None:
        from private_evolution.files import open_private_append
        from spti.metrics import round_metrics

        path = self.state / f"round_{result.round_index:03d}" / "embeddings.npy"
        try:
            selected = np.load(path, allow_pickle=False)[result.selected]
            row = {"round": result.round_index} | round_metrics(selected, self.reference)
        except (OSError, ValueError, np.linalg.LinAlgError) as exc:
            self.reporter.warn(f"round {result.round_index} metrics skipped: {exc}")
            return
        with open_private_append(self.path) as fh:
            fh.write(json.dumps(row) + "\n")


def seeding_active(cfg: RunConfig) -> bool:
    """Seeding votes with captions: it runs with text voting (image voting has no captions)."""
    return cfg.seeding == "attributes" and cfg.voting == "text" and cfg.seeding_share > 0


def variation_settings(cfg: RunConfig, **extra: Any) -> Any:
    """The LLM APIs' :class:`~spti.text_evolution.VariationSettings` of a run (``extra``: fields a run
    config does not hold, e.g. a benchmark's token caps)."""
    from spti.text_evolution import VariationSettings

    return VariationSettings(
        word_count_std=cfg.word_count_std,
        min_words=cfg.min_words,
        max_words=cfg.max_words,
        rephrase_fraction=cfg.rephrase_fraction,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        min_attribute_share=cfg.min_attribute_share,
        seeding_uniform_mix=cfg.seeding_uniform_mix,
        **extra,
    )


def pe_config(cfg: RunConfig) -> Any:
    from private_evolution import PEConfig

    strengths = cfg.strength
    return PEConfig(
        iterations=cfg.iterations,
        num_samples=cfg.num_samples,
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        units_bound=cfg.units_bound,
        count_share=cfg.count_share,
        seeding_share=cfg.seeding_share if seeding_active(cfg) else 0.0,
        population_size="auto" if cfg.population == "auto" else cfg.population_size,
        target_signal=cfg.target_signal,
        auto_population_bounds=(min(cfg.population_min, cfg.population_size), cfg.population_size),
        variation_folds=cfg.variation_folds,
        initial_population=cfg.initial_population,
        strength=tuple(strengths) if len(strengths) > 1 else float(strengths[0]),
        selection=cfg.selection,  # type: ignore[arg-type]
        keep_selected=True,
        k=cfg.k,
        metric="l2",  # embeddings are L2-normalised for text; image features use plain L2
        threshold=cfg.threshold,
        lookahead=cfg.lookahead,
        seed=cfg.seed,
    )


def evolve_stage(
    cfg: RunConfig,
    run: RunDirectory,
    models: Any,
    reporter: Reporter,
    *,
    captions_file: Path | None = None,
) -> list[dict[str, Any]]:
    from private_evolution import BudgetExceededError, PrivacyPlanError, PrivateEvolution, RunStateError
    from spti.release import check_release_matches, file_sha256, privacy_statement, release_rows
    from spti.text_evolution import LLMDescriptionGenerator
    from spti.vote_spaces import FeatureCache, RenderedVoteSpace, TextVoteSpace

    state = run.state / "pe"
    # A release on disk belongs to one ledger: never start a new one beside it.
    if (run.release / "privacy.json").exists():
        check_release_matches(run, state / "ledger.json")
    elif not (state / "ledger.json").exists() and (
        (run.release / "captions.jsonl").exists() or any((run.release / "images").glob("*.png"))
    ):
        raise SptiError(
            f"{run.release} holds released files but {state / 'ledger.json'} is missing: a new ledger would mix "
            "draws; start a new run in a new --output"
        )
    try:
        pe_cfg = pe_config(cfg)
        plan = pe_cfg.noise_plan()
    except ValueError as exc:
        raise SptiError(f"invalid privacy settings: {exc}") from None
    votes = _private_votes(cfg, run, models, reporter, captions_file)
    seeding = None
    if seeding_active(cfg):
        from spti.seeding import attribute_affinities

        seeding = attribute_affinities(votes.captions or [], _prompts(cfg))
    elif cfg.seeding == "attributes" and cfg.voting != "text":
        reporter.info("seeding: skipped (it votes with captions; image voting has none)")

    generator = LLMDescriptionGenerator(
        models.llm,
        _prompts(cfg),
        variation_settings(cfg),
        # per-call counts on disk, so privacy.json sums fallbacks over every process of the run
        stats_path=run.state / "llm_stats.jsonl",
    )
    if cfg.voting == "text":
        space: Any = TextVoteSpace(models.text_embedder)
    else:
        space = RenderedVoteSpace(
            models.image_generator,
            models.image_embedder,
            size=cfg.vote_render_size,  # "native": the generator's own size, as the SPTI authors render
            feature_size=cfg.voting_size,  # the extractor's input, as the private images are loaded
            steps=cfg.steps,
            guidance=cfg.guidance,
            seed=cfg.seed,
            num_seeds=cfg.vote_seeds,
            batch_size=_parallel_batch(models, cfg.batch_size),  # with Ray: one batch per worker at a time
            cache=FeatureCache(run.state / "vote_features.sqlite"),
            model=cfg.image_model,
            tag=cfg.image_embedder,
            # the renders the private images vote for, kept so that the render stage releases them
            render_dir=run.state / VOTE_RENDERS if cfg.keeps_vote_renders() else None,
            fallback_size=cfg.render_size,
        )
    reporter.info(
        f"evolve: {cfg.iterations} rounds, σ={plan.round_noise_multiplier:.4g} per round at δ={plan.delta:.3g}, "
        f"{cfg.voting} voting" + (", DP seeding of the first population" if seeding is not None else "")
    )

    def on_start(sized: Any, count: Any) -> None:
        per_round = sized.kept(0) * (sized.variation_folds + 1) if sized.iterations > 1 else sized.population_at(0)
        line = f"evolve: {per_round} candidates a round"
        if count is not None:
            line += f"; DP count of privacy units ≈ {count.value:.0f} (noise σ {count.noise_multiplier:.3g})"
            expected = max(count.value, 0.0) / max(per_round, 1)
            if plan.round_noise_multiplier > 0 and expected < plan.round_noise_multiplier:
                reporter.warn(
                    f"a candidate expects about {expected:.3g} votes per round but the noise std is "
                    f"{plan.round_noise_multiplier:.3g}: selection will be mostly noise (try --population auto)"
                )
        if cfg.population == "auto":
            line += f"; population auto: {sized.kept(0)} kept per round (target {cfg.target_signal:g}·σ votes each)"
        reporter.info(line)

    metrics = _RoundMetrics(run, state, votes.embeddings, reporter)
    resume = (state / "config.json").exists()
    with reporter.progress("evolve (rounds)", cfg.iterations) as advance:
        completed = sum(1 for t in range(cfg.iterations) if (state / f"round_{t:03d}" / "complete.json").exists())
        advance(completed)
        pe = PrivateEvolution(generator, space, pe_cfg, state, private_dir=run.private / "pe")
        try:
            result = pe.run(
                votes.embeddings,
                units=votes.units,
                resume=resume,
                callbacks=[metrics, lambda r: advance(1)],
                seeding_weights=seeding,
                on_start=on_start,
            )
        except (BudgetExceededError, RunStateError, PrivacyPlanError) as exc:
            raise SptiError(str(exc)) from None
    for name in result.redrawn:
        reporter.warn(f"release {name} was drawn again after a crash lost its first draw; it is charged")
    rows = release_rows(result)
    captions_path = run.release / "captions.jsonl"
    atomic_write_jsonl(captions_path, rows)
    run.record_private_endpoints("evolve", _sent(models, "text_embedding", "image_features"))
    privacy = privacy_statement(
        cfg,
        run,
        result,
        # counts, and why answers were junk (e.g. junk_blanks, junk_ignored_attributes)
        generation=generator.stats.as_dict() | {f"junk_{k}": v for k, v in generator.stats.junk_reasons.items()},
        captions_sha256=file_sha256(captions_path),
    )
    atomic_write_json(run.release / "privacy.json", privacy)
    run.share_release()
    run.mark("evolve", epsilon=privacy["epsilon"], num_samples=len(rows))
    for warning in privacy["warnings"]:
        reporter.warn(warning)
    eps = privacy["epsilon"]
    reporter.info(
        f"evolve: released {len(rows)} descriptions at ε={eps if isinstance(eps, str) else format(eps, '.4g')}, "
        f"δ={plan.delta:.3g}"
    )
    return rows


# --------------------------------------------------------------------------------------------
# Stage 3: render (post-processing)
# --------------------------------------------------------------------------------------------
# Where the evolve stage keeps each candidate's vote render (``state/vote_renders/<key>.png``, public).
VOTE_RENDERS = "vote_renders"


@dataclass
class _ReleasePlan:
    """How the render stage draws each released description: its vote render, or a new render."""

    mode: str  # "voted" | "rerender"
    reason: str
    spec: Any = None  # the VoteRenderSpec of the kept vote renders (voted)

    def settings(self, cfg: RunConfig, upscaling: bool) -> dict[str, Any]:
        """What decides the released pixels (recorded in state/render.json)."""
        drawn: dict[str, Any] = (
            {"mode": "voted", **self.spec.to_dict()}
            if self.mode == "voted"
            else {
                "mode": "rerender",
                "model": cfg.release_model_name,
                "size": cfg.render_size,
                "steps": cfg.release_steps_used,
                "guidance": cfg.release_guidance_used,
                "seed": cfg.seed,
            }
        )
        if upscaling:
            drawn |= {"upscaler": cfg.upscaler, "upscale": cfg.upscale, "upscaler_model": cfg.upscaler_model}
        return drawn


def _release_plan(cfg: RunConfig, run: RunDirectory) -> _ReleasePlan:
    """Release the very renders the private images voted for when they exist and fit the release settings."""
    from spti.vote_spaces import VoteRenderSpec

    if cfg.voting != "image":
        return _ReleasePlan("rerender", "text voting renders nothing before the release")
    if cfg.release_render == "rerender":
        return _ReleasePlan("rerender", "--release-render rerender")
    spec = VoteRenderSpec.load(run.state / VOTE_RENDERS)
    if spec is None:
        return _ReleasePlan("rerender", "the evolve stage kept no vote renders")
    differs = []
    if cfg.release_model_name != spec.model:
        differs.append(f"model {cfg.release_model_name} (votes: {spec.model})")
    if cfg.render_size != spec.size:
        differs.append(f"size {cfg.render_size}² (votes: {spec.size}²)")
    steps, guidance = cfg.release_steps_used, cfg.release_guidance_used
    if steps is not None and steps != spec.steps:
        differs.append(f"{steps} steps (votes: {spec.steps})")
    if guidance is not None and guidance != spec.guidance:
        differs.append(f"guidance {guidance} (votes: {spec.guidance})")
    if cfg.seed != spec.seed:
        differs.append(f"seed {cfg.seed} (votes: {spec.seed})")
    if differs:
        return _ReleasePlan("rerender", "the release differs from the vote renders: " + ", ".join(differs))
    return _ReleasePlan("voted", "the renders the private images voted for", spec)


def render_stage(cfg: RunConfig, run: RunDirectory, models: Any, reporter: Reporter) -> list[Path]:
    """Draw (or take) and upscale every released description; post-processing of the DP release.

    With image voting the released image of a description is by default the render its votes were
    cast on (kept by the evolve stage under ``state/vote_renders/``), copied byte for byte before
    upscaling; a different release model, size, steps, guidance or ``--release-render rerender`` draws
    each description again with the release generator. Images already drawn with the same settings
    are kept (a resumed stage draws only the missing ones); other settings draw them all again.
    """
    from spti.release import check_release_matches, file_sha256

    captions_path = run.release / "captions.jsonl"
    if not captions_path.exists():
        raise SptiError(f"{run.root} has no released descriptions yet; run `spti evolve` first")
    check_release_matches(run, run.state / "pe" / "ledger.json")
    rows = read_jsonl(captions_path)
    out_dir = run.release / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{row['index']:05d}.png" for row in rows]
    # Images belong to the descriptions they were drawn from: never mix renders of two releases.
    render_record = run.state / "render.json"
    captions_sha = file_sha256(captions_path)
    record = json.loads(render_record.read_text()) if render_record.exists() else {}
    if any(out_dir.glob("*.png")) and record.get("captions_sha256") != captions_sha:
        raise SptiError(
            f"{out_dir} holds images drawn from other descriptions than {captions_path}; "
            "start a new run in a new --output"
        )
    plan = _release_plan(cfg, run)
    upscaling = models.upscaler is not None
    settings = plan.settings(cfg, upscaling)
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if record.get("settings") not in (None, settings) and len(todo) < len(paths):
        reporter.info(f"render: the settings changed since the images were drawn: all {len(paths)} are drawn again")
        todo = list(range(len(paths)))
    atomic_write_json(render_record, {"captions_sha256": captions_sha, "settings": settings})
    size = plan.spec.size if plan.mode == "voted" else cfg.render_size
    final = size * (cfg.upscale if upscaling else 1)
    upscale_note = f", upscaled ×{cfg.upscale} ({cfg.upscaler}) to {final}²" if upscaling else ""
    if plan.mode == "voted":
        reporter.info(f"render: {len(rows)} images: {plan.reason} ({size}², {plan.spec.model}){upscale_note}")
    else:
        reporter.info(
            f"render: {len(rows)} images at {size}² with {cfg.release_model_name}{upscale_note}"
            + (f" ({plan.reason})" if cfg.voting == "image" else "")
        )
    redrawn = 0
    with reporter.progress("render", len(rows)) as advance:
        advance(len(rows) - len(todo))
        step = _parallel_batch(models, cfg.batch_size) if todo else cfg.batch_size
        for start in range(0, len(todo), step):
            idx = todo[start : start + step]
            prompts = [rows[i]["text"] for i in idx]
            if plan.mode == "voted":
                pngs, missing = _vote_renders(plan.spec, run.state / VOTE_RENDERS, prompts, models)
                redrawn += missing
                if not upscaling:
                    for i, data in zip(idx, pngs, strict=True):
                        atomic_write_bytes(paths[i], data)  # the vote render itself, byte for byte
                    advance(len(idx))
                    continue
                images = [_open_png(data) for data in pngs]
            else:
                images = _rerender(cfg, models, rows, idx)
            if upscaling:
                images = models.upscaler.upscale(images, prompts=prompts)
            for i, image in zip(idx, images, strict=True):
                _save_png(image, paths[i])
            advance(len(idx))
    if redrawn:
        reporter.warn(
            f"{redrawn} vote renders were missing and were drawn again with their vote seeds "
            "(the same image, up to floating-point differences between runs)"
        )
    # released descriptions longer than the text encoder reads (77 CLIP tokens): drawn cut at a word
    # boundary; counted by the generator that drew them when it is loaded (None: not counted)
    drew = vars(models).get("release_image_generator" if plan.mode == "rerender" else "image_generator")
    count = getattr(drew, "count_truncated", None)
    truncated = count([row["text"] for row in rows]) if callable(count) else None
    if truncated is None and record.get("captions_sha256") == captions_sha and record.get("settings") == settings:
        # nothing was drawn this time (a resume): the count of the process that drew them stands
        truncated = record.get("truncated_prompts")
    atomic_write_json(
        render_record, {"captions_sha256": captions_sha, "settings": settings, "truncated_prompts": truncated}
    )
    if truncated:
        reporter.info(f"render: {truncated} of {len(rows)} descriptions were cut to the text encoder's token limit")
    from spti.report import write_contact_sheet, write_report

    write_contact_sheet(paths, run.release / "contact_sheet.png")
    write_report(run, cfg)
    run.share_release()
    run.mark("render", images=len(paths), resolution=final, release=plan.mode)
    return paths


def _vote_renders(spec: Any, render_dir: Path, texts: list[str], models: Any) -> tuple[list[bytes], int]:
    """The kept vote render (PNG bytes) of each text; a missing one is drawn again exactly as it was voted
    on (vote generator, size, steps, guidance, first vote seed) and kept. Returns the bytes and how many
    were drawn again."""
    from spti.vote_spaces import render_seed

    paths = [render_dir / f"{spec.render_key(t)}.png" for t in texts]
    missing = [j for j, p in enumerate(paths) if not p.exists()]
    if missing:
        images = models.image_generator.generate(
            [texts[j] for j in missing],
            seeds=[render_seed(texts[j], spec.seed, 0) for j in missing],
            width=spec.size,
            height=spec.size,
            steps=spec.steps,
            guidance=spec.guidance,
        )
        for j, image in zip(missing, images, strict=True):
            _save_png(image, paths[j])
    return [p.read_bytes() for p in paths], len(missing)


def _rerender(cfg: RunConfig, models: Any, rows: list[dict[str, Any]], idx: list[int]) -> list[Any]:
    """Draw released descriptions anew with the release generator (seeds from the release index)."""
    from private_evolution.population import derive_seed

    return models.release_image_generator.generate(
        [rows[i]["text"] for i in idx],
        seeds=[derive_seed(cfg.seed, "render", rows[i]["index"]) & 0x7FFFFFFF for i in idx],
        width=cfg.render_size,
        height=cfg.render_size,
        steps=cfg.release_steps_used,
        guidance=cfg.release_guidance_used,
    )


def _open_png(data: bytes) -> Any:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _save_png(image: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------
def synthesize(
    cfg: RunConfig, private_dir: Path, run: RunDirectory, reporter: Reporter, *, models: Any = None
) -> RunSummary:
    from spti.backends.factory import Models

    models = models or Models(cfg, run)
    try:
        if cfg.preset == "smoke":
            reporter.warn("smoke preset: tiny random models, offline; the images are noise (it proves the install)")
        if cfg.voting == "text" and not run.stage_done("caption"):
            caption_stage(cfg, run, models, private_dir, reporter)
        elif cfg.voting == "image" and not (run.private / "manifest.json").exists():
            _scan(cfg, private_dir, run, reporter)
        if not run.stage_done("evolve"):
            evolve_stage(cfg, run, models, reporter)
        images = render_stage(cfg, run, models, reporter)
        privacy = json.loads((run.release / "privacy.json").read_text())
        if _save_usage(cfg, run, models, reporter):
            from spti.report import write_report

            write_report(run, cfg)  # again, now with this process's usage in private/usage.json
            run.share_release()
        return RunSummary(run.root, images, privacy)
    finally:
        _save_usage(cfg, run, models, reporter, quiet=True)  # also when a stage failed or was interrupted
        models.close()


def _save_usage(cfg: RunConfig, run: RunDirectory, models: Any, reporter: Reporter, *, quiet: bool = False) -> bool:
    """This process's hosted usage and cost into ``private/usage.json`` (summed over every process of
    the run; saving again replaces this process's entry). A failure to save never stops a run."""
    try:
        usage = models.usage()
        if not usage:
            return False
        from spti.plan_cost import save_usage

        saved = save_usage(run, cfg, usage)
    except Exception as exc:  # the accounting must not lose a finished release
        reporter.warn(f"could not save hosted usage to {run.private / 'usage.json'}: {exc}")
        return False
    if not quiet:
        t = saved["total"]
        cost = f"${t['cost_usd']:.2f}" + ("" if t["cost_known"] else " (a lower bound: some prices unknown)")
        reporter.info(
            f"hosted usage (this run, all processes): {t['requests']} requests, {t['images']} images, "
            f"{t['prompt_tokens']:,} prompt + {t['completion_tokens']:,} answer tokens, {cost} "
            f"({run.private / 'usage.json'})"
        )
    return True
