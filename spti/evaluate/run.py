"""The entry point: :func:`evaluate_run` reads a run, extracts features once, computes every metric
and writes the owner-only ``private/evaluation.{json,html}``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spti.errors import SptiError
from spti.evaluate.common import (
    DEFAULT_CLIP,
    DEFAULT_DINOV2,
    IMAGE_METRICS,
    METRICS,
    NOT_DP_WARNING,
    PAPER_REFERENCE_SIZE,
    PAPER_RELEASE_SIZE,
    PAPER_SIZE,
    PROTOCOLS,
    ROLE_METRICS,
    SUBSET_SEED,
    Progress,
    jsonable,
    parse_metrics,
    read_rows,
)
from spti.evaluate.extract import Extracted, extract, load_extractors, wavelet_size
from spti.evaluate.inputs import ImageSet, private_images, released_images
from spti.evaluate.page import render_html
from spti.evaluate.results import (
    clip_score_result,
    frechet_result,
    precision_recall_result,
    text_result,
    wavelet_result,
)
from spti.evaluate.rounds import read_round_metrics
from spti.evaluate.text import CLIPTextTower
from spti.rundir import RunDirectory


def protocol_section(protocol: str, reference_size: int | None, seed: int) -> dict[str, Any]:
    """What the protocol did to the images, for the report (and for anyone comparing numbers)."""
    if protocol == "paper":
        return {
            "name": "paper",
            "explains": (
                f"both sides Resize({PAPER_SIZE}) + CenterCrop({PAPER_SIZE}) (torchvision semantics, PIL bilinear), "
                "then clean-fid's resize to 299² (PIL bicubic on float32 channels, no quantisation), "
                "Inception input (x − 128) / 128, fp32 features; "
                f"a reference of up to {reference_size:,} private images drawn with seed {seed} "
                f"against the release (the paper compared with {PAPER_RELEASE_SIZE:,} released images)"
            ),
            "resize": PAPER_SIZE,
            "fid_resize": "clean-fid PIL bicubic 299, float, no quantisation",
            "reference_size": reference_size,
            "seed": seed,
        }
    return {
        "name": "native",
        "explains": (
            "images at their own size; FID Inception resizes bilinearly to 299² (pytorch-fid / "
            "the TorchScript file's own convention); fp32 features"
        ),
    }


def evaluate_run(
    run_dir: str | Path,
    private_dir: str | Path | None = None,
    metrics: str | Iterable[str] | None = METRICS,
    *,
    device: str = "auto",
    inception_weights: str | Path | None = None,
    clip_model: str = DEFAULT_CLIP,
    dinov2_model: str = DEFAULT_DINOV2,
    text_model: str | None = None,
    max_images: int | None = None,
    progress: Progress | None = None,
    batch_size: int = 16,
    pr_space: str = "dinov2",
    k: int = 3,
    protocol: str = "native",
    seed: int = 0,
    reference_size: int = PAPER_REFERENCE_SIZE,
) -> dict[str, Any]:
    """Evaluate a finished run against its private data; write ``private/evaluation.{json,html}``.

    ``metrics`` is a subset of :data:`METRICS` (a comma list or sequence). ``private_dir`` replaces
    the folder recorded in the run (e.g. a moved folder, or held-out images of the same people).
    ``max_images`` evaluates a fixed pseudo-random subset of each image set (quick checks).
    ``pr_space`` is the feature space of precision/recall: ``dinov2`` (default: it tracks human
    judgements of generated images better than Inception), ``clip`` or ``inception``.

    ``protocol="paper"`` makes FID comparable with the published numbers: both sides
    ``Resize(256) + CenterCrop(256)``, clean-fid's bicubic resize to 299, and a reference of up to
    ``reference_size`` (20,000) private images drawn with ``seed``; ``"native"`` compares the
    images as they are. Features are fp32 under both.

    ``progress`` receives one short line per step (loading a model, a pass over the images), and
    one line per feature space that is skipped, with the reason.

    Returns the report that was written to ``evaluation.json``. It is NOT differentially private.
    """
    say: Progress = progress or (lambda _msg: None)
    chosen = parse_metrics(metrics)
    if max_images is not None and max_images < 2:
        raise SptiError(f"--max-images must be at least 2, got {max_images}")
    if pr_space not in ("dinov2", "clip", "inception"):
        raise SptiError(f"precision/recall space {pr_space!r}: use dinov2, clip or inception")
    if protocol not in PROTOCOLS:
        raise SptiError(f"evaluation protocol {protocol!r}: use {' or '.join(PROTOCOLS)}")
    if reference_size < 2:
        raise SptiError(f"--reference-size must be at least 2, got {reference_size}")
    run = RunDirectory(run_dir)
    cfg = run.load_config()
    released_rows = read_rows(run.release / "captions.jsonl")
    released = released_images(run)
    if not released_rows and not released.paths:
        raise SptiError(f"{run.root} has released nothing yet; finish the run (spti synthesize / evolve / render)")
    private_rows = [r for r in read_rows(run.private / "captions.jsonl") if r.get("caption")]

    image_metrics = [m for m in chosen if m in IMAGE_METRICS]
    private = ImageSet("private")
    private_root: Path | None = Path(private_dir).expanduser() if private_dir else None
    if image_metrics:
        private, private_root = private_images(run, cfg, Path(private_dir) if private_dir else None)
    if protocol == "paper":
        limit = reference_size if max_images is None else min(reference_size, max_images)
        private = private.subset(limit, seed=seed)
    else:
        private = private.subset(max_images)
    released = released.subset(max_images)

    roles: dict[str, None] = {}
    for m in image_metrics:
        role = {"fid": "inception", "fd-dinov2": "dinov2", "fd-clip": "clip", "clip-score": "clip"}.get(m)
        if m == "precision-recall":
            role = pr_space
        if role:
            roles[role] = None
    extractors = load_extractors(
        roles,
        protocol=protocol,
        inception_weights=inception_weights,
        clip_model=clip_model,
        dinov2_model=dinov2_model,
        device=device,
        batch_size=batch_size,
        progress=say,
    )
    for role, ext in extractors.items():
        if ext.reason is not None:
            served = [m for m in chosen if m in ROLE_METRICS[role] or (m == "precision-recall" and role == pr_space)]
            say(f"skipped {', '.join(served)}: {ext.reason}")
    text_tower, text_reason = None, None
    if "clip-score" in chosen and extractors["clip"].reason is None:
        try:
            text_tower = CLIPTextTower(extractors["clip"].source or clip_model, device=device)
        except SptiError as exc:
            text_reason = str(exc)

    size, size_reason = None, None
    upscale: tuple[int, str] | None = None
    if "wavelet" in chosen:
        size, size_reason = wavelet_size(private, released)
        if cfg.upscaler != "none" and cfg.upscale > 1:
            upscale = (cfg.upscale, cfg.upscaler)
    usable = [e for e in extractors.values() if e.embedder is not None]
    priv = rel = Extracted()
    if usable or size:  # otherwise nothing would use the decoded images
        kw: dict[str, Any] = {"wavelet_size": size, "batch_size": batch_size, "progress": say, "protocol": protocol}
        priv = extract(private, usable, upscale_factor=None, **kw)
        rel = extract(released, usable, upscale_factor=upscale[0] if upscale else None, **kw)

    plot_data: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    released_by_index = {str(r.get("index", i)): str(r.get("text", "")) for i, r in enumerate(released_rows)}
    for name in chosen:
        say(f"computing {name}")
        if name in ("fid", "fd-dinov2", "fd-clip"):
            role = {"fid": "inception", "fd-dinov2": "dinov2", "fd-clip": "clip"}[name]
            results[name] = frechet_result(name, extractors[role], priv, rel)
        elif name == "precision-recall":
            results[name] = precision_recall_result(extractors[pr_space], priv, rel, k, plot_data)
        elif name == "clip-score":
            results[name] = clip_score_result(
                extractors["clip"],
                text_tower,
                text_reason,
                priv,
                rel,
                {str(r.get("relpath")): r["caption"] for r in private_rows},
                released_by_index,
            )
        elif name == "wavelet":
            results[name] = wavelet_result(size, size_reason, priv, rel, upscale)
        else:
            results[name] = text_result(
                run,
                cfg,
                text_model,
                device,
                [r["caption"] for r in private_rows],
                [t for t in released_by_index.values() if t],
                plot_data,
                say,
            )

    report: dict[str, Any] = {
        "not_dp": True,
        "warning": NOT_DP_WARNING,
        "run_dir": str(run.root),
        "private_dir": str(private_root) if private_root else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics_requested": chosen,
        "samples": {
            "private_images": len(priv.keys),
            "private_images_available": private.total,
            "private_images_unreadable": len(priv.unreadable),
            "released_images": len(rel.keys),
            "released_images_available": released.total,
            "private_captions": len(private_rows),
            "released_descriptions": len(released_rows),
            "max_images": max_images,
            "subset_seed": (seed if protocol == "paper" else SUBSET_SEED) if max_images is not None else None,
        },
        "protocol": protocol_section(protocol, reference_size, seed),
        "run": {
            "preset": cfg.preset,
            "voting": cfg.voting,
            "image_model": cfg.image_model,
            "render_size": cfg.render_size,
            "upscaler": cfg.upscaler,
            "upscale": cfg.upscale,
            "epsilon": epsilon(run),
        },
        "metrics": results,
        "metrics_by_round": read_round_metrics(run),
        "versions": versions(),
    }
    report = jsonable(report)
    run.ensure_private()
    json_path = run.private / "evaluation.json"
    html_path = run.private / "evaluation.html"
    report["outputs"] = {"json": str(json_path), "html": str(html_path)}
    from private_evolution.files import atomic_write_json, atomic_write_text

    atomic_write_json(json_path, report)
    atomic_write_text(html_path, render_html(report, plot_data))
    for extractor in usable:
        close = getattr(extractor.embedder, "close", None)
        if callable(close):
            close()
    return report


def epsilon(run: RunDirectory) -> Any:
    path = run.release / "privacy.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("epsilon")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("spti", "numpy", "scipy", "torch", "transformers", "sentence-transformers", "PyWavelets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
