"""Canaries planted into a copy of the private folder, the pipeline rerun twice, matches counted."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.audit.images import (
    _build_embedders,
    _embed_images,
    _ImageSet,
    _private_entries,
    _released_images,
    resolve_private_dir,
)
from spti.audit.nearest import _knn
from spti.audit.pixels import _pixel_search
from spti.audit.settings import (
    _CANARY_MARKER,
    CANARY_PREFIX,
    CANARY_RUN_OUTPUTS,
    AuditSettings,
    _jsonable,
    _QuietReporter,
)
from spti.errors import SptiError
from spti.rundir import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, RunDirectory, apply_modes

if TYPE_CHECKING:
    from PIL.Image import Image

    from spti.backends.base import ImageEmbedder
    from spti.config import RunConfig


# --------------------------------------------------------------------------------------------
# Canaries
# --------------------------------------------------------------------------------------------
_CANARY_PALETTE = np.array(
    [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 255),
        (255, 128, 0),
        (128, 0, 255),
    ],
    dtype=np.uint8,
)


def canary_image(index: int, *, size: int = 256, seed: int = 0) -> Image:
    """A canary: a 4×4 code of saturated colours under a black geometric overlay.

    Unlike any photograph (fully saturated flat blocks, hard edges), different for every index (8¹⁶
    colour codes), and coarse enough that low-frequency features (wavelet) and pixel thumbnails
    tell canaries apart as well as deep features do.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rng = np.random.default_rng([seed, 0xCA7A2, index])
    code = rng.integers(len(_CANARY_PALETTE), size=(4, 4))
    image = PILImage.fromarray(_CANARY_PALETTE[code]).resize((size, size), PILImage.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    width = max(1, size // 48)
    pattern = int(rng.integers(3))
    if pattern == 0:  # concentric rings
        step = size // int(rng.integers(5, 9))
        for r in range(step, size, step):
            c = size / 2
            draw.ellipse((c - r, c - r, c + r, c + r), outline=(0, 0, 0), width=width)
    elif pattern == 1:  # diagonal stripes
        step = size // int(rng.integers(5, 9))
        for x in range(-size, 2 * size, step):
            draw.line((x, 0, x + size, size), fill=(0, 0, 0), width=width)
    else:  # grid of diamonds
        step = size // int(rng.integers(3, 6))
        for cy in range(step // 2, size, step):
            for cx in range(step // 2, size, step):
                h = step // 3
                draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], outline=(0, 0, 0), width=width)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(255, 255, 255), width=max(2, size // 32))
    return image


def one_run_epsilon_lower_bound(guesses: int, correct: int, *, confidence: float = 0.95) -> float:
    """ε below which ``correct`` right membership guesses out of ``guesses`` would be too unlikely.

    Steinke, Nasr & Jagielski (2023), "Privacy auditing with one (1) training run": when each canary
    is planted with probability 1/2 and the mechanism is ε-DP, the number of correct guesses is
    dominated by Binomial(guesses, e^ε/(1+e^ε)). The bound is the largest ε whose tail probability
    of the observed count stays below 1 − confidence (δ is ignored: pure-ε form).
    """
    from scipy import stats

    if guesses <= 0 or correct <= 0:
        return 0.0
    alpha = 1.0 - confidence

    def tail(eps: float) -> float:
        return float(stats.binom.sf(correct - 1, guesses, 1.0 / (1.0 + math.exp(-eps))))

    if tail(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 50.0
    if tail(hi) <= alpha:
        return hi
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= alpha else (lo, mid)
    return lo


def _two_run_epsilon_lower_bound(tp: int, n_pos: int, fp: int, n_neg: int, delta: float, confidence: float) -> float:
    """ln((TPR_low − δ) / FPR_high) with Clopper–Pearson bounds: the classic two-dataset test."""
    from scipy import stats

    if n_pos == 0 or n_neg == 0 or tp == 0:
        return 0.0
    alpha = (1 - confidence) / 2
    tpr_lo = float(stats.beta.ppf(alpha, tp, n_pos - tp + 1))
    fpr_hi = float(stats.beta.ppf(1 - alpha, fp + 1, n_neg - fp)) if fp < n_neg else 1.0
    if tpr_lo - delta <= 0 or fpr_hi <= 0:
        return 0.0
    return max(0.0, math.log((tpr_lo - delta) / fpr_hi))


def _canary_matches(
    canaries: _ImageSet, released: _ImageSet, private: _ImageSet, s: AuditSettings
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which canaries a release matches, with the per-space thresholds and distances.

    A released image matches a canary in a feature space when it is closer to that canary than
    (a) any non-canary private image is to any canary, and (b) half the distance between the two
    closest canaries (so the match names one canary, not the canary style). Both come from
    canaries and private images only, never from the release being scored, so the threshold is the
    same for the planted run and the controls. Pixel-space NCC ≥ the near-duplicate threshold also
    counts.
    """
    matched = np.zeros(len(canaries), dtype=bool)
    detail: dict[str, Any] = {}
    for spec, feats in canaries.features.items():
        _, to_private = _knn(feats, private.features[spec], 1)
        _, to_canary = _knn(feats, feats, 2)
        inter = to_canary[:, 1] if to_canary.shape[1] > 1 else np.array([np.inf])
        threshold = float(min(to_private.min() if to_private.size else np.inf, 0.5 * inter.min()))
        idx, dist = _knn(feats, released.features[spec], 1)
        hit = dist[:, 0] < threshold if dist.size else np.zeros(len(canaries), bool)
        matched |= hit
        detail[spec] = {
            "threshold": threshold,
            "distances": dist[:, 0].tolist() if dist.size else [],
            "nearest_released": [released.names[i] for i in idx[:, 0]] if idx.size else [],
            "matched": hit.tolist(),
        }
    idx, ncc, _ = _pixel_search(canaries.pixels, released.pixels, max_shift=s.max_shift)
    hit = ncc >= s.ncc_threshold if len(released) else np.zeros(len(canaries), bool)
    matched |= hit
    detail["pixel"] = {
        "threshold": s.ncc_threshold,
        "ncc": ncc.tolist(),
        "nearest_released": [released.names[i] for i in idx] if len(released) else [],
        "matched": hit.tolist(),
    }
    return matched, detail


def _fmt_eps(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value or "?")


class CanaryRunDirectory(RunDirectory):
    """A canary rerun under ``private/canary_audit/``: more uses of the private data, not a release.

    Its DP outputs go to ``audit_outputs/`` (never a folder named ``release``), owner-only: the two
    reruns spend privacy again on the same people, so what they produce is not for sharing.
    """

    @property
    def release(self) -> Path:
        return self.root / CANARY_RUN_OUTPUTS

    def share_release(self) -> None:
        apply_modes(self.release, dir_mode=PRIVATE_DIR_MODE, file_mode=PRIVATE_FILE_MODE)


def _default_pipeline(cfg: RunConfig, private_dir: Path, run: RunDirectory, reporter: Any) -> Any:
    from spti.pipeline import synthesize

    return synthesize(cfg, private_dir, run, reporter)


def run_canary_audit(
    run_dir: str | Path,
    private_dir: str | Path | None,
    k: int,
    *,
    settings: AuditSettings | None = None,
    reporter: Any = None,
    pipeline: Callable[..., Any] | None = None,
    keep_copy: bool = False,
    _shared: tuple[dict[str, ImageEmbedder], _ImageSet] | None = None,
) -> dict[str, Any]:
    """Plant ``k`` canaries into a copy of the private folder, rerun the pipeline, count matches.

    Two runs, both with the run's saved configuration (same ε, iterations, voting, models, seed)
    under ``RUN_DIR/private/canary_audit/``: a control on the copy without canaries, then the same
    copy with the k planted canaries. ``2k`` canaries are drawn; which k are planted is random (public
    seed), the other k are held out. The user's folder is only read.

    ``pipeline(cfg, private_dir, run_directory, reporter)`` defaults to :func:`spti.pipeline.synthesize`;
    tests pass a deliberately leaky one to show the audit catches a leak.
    """
    from private_evolution.files import atomic_write_json

    s = (settings or AuditSettings()).validate()
    reporter = reporter or _QuietReporter()
    pipeline = pipeline or _default_pipeline
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise SptiError(f"--canaries {k}: use a number of canaries between 1 and 1000 (0 skips the canary audit)")
    run = RunDirectory(run_dir)
    cfg = run.load_config()
    private_root = resolve_private_dir(run, private_dir)
    entries = _private_entries(run, private_root, reporter)
    clash = [rel for rel, _ in entries if rel.split("/")[0].startswith(CANARY_PREFIX)]
    if clash:
        raise SptiError(f"private image {clash[0]} uses the canary name prefix {CANARY_PREFIX!r}; rename it")
    if any(cfg.model_spec(role).provider == "openai" for role in ("caption", "text_embedding")):
        reporter.warn(
            "canary audit: the pipeline runs twice more; private images and canaries are sent again to the "
            "hosted provider, at the cost of two full runs"
        )
    if any(cfg.model_spec(role).provider == "openai" for role in ("caption", "llm", "text_embedding", "image")):
        from spti.plan_cost import plan_run

        control, planted = plan_run(cfg, num_images=len(entries)), plan_run(cfg, num_images=len(entries) + k)
        reporter.warn(
            f"the canary audit reruns the pipeline twice: about {control.requests + planted.requests} requests, "
            f"~${control.cost_usd + planted.cost_usd:.2f}" + ("" if control.complete else " (a lower bound)")
        )

    work = run.ensure_private() / "canary_audit"
    if work.exists():
        if not (work / _CANARY_MARKER).exists():
            raise SptiError(f"{work} exists and was not made by spti audit; move it away")
        shutil.rmtree(work)
    work.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    (work / _CANARY_MARKER).write_text("made by spti audit; safe to delete\n")

    # the canaries: 2k drawn, k planted at random (the one-run audit needs the coin flips)
    order = np.random.default_rng([s.seed, 0xC0FFEE]).permutation(2 * k)
    planted = np.zeros(2 * k, dtype=bool)
    planted[order[:k]] = True
    canary_dir = work / "canaries"
    canary_dir.mkdir()
    canary_paths = []
    for i in range(2 * k):
        path = canary_dir / f"canary_{i:03d}_{'planted' if planted[i] else 'heldout'}.png"
        canary_image(i, size=max(64, cfg.voting_size), seed=s.seed).save(path, format="PNG")
        canary_paths.append(path)

    copy = work / "private_copy"
    reporter.info(f"canary audit: copying {len(entries)} private images to {copy}")
    for rel, _ in entries:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(private_root / rel, target)

    runs: dict[str, RunDirectory] = {}
    try:
        for name in ("control", "canaries"):
            if name == "canaries":
                for i in np.flatnonzero(planted):
                    folder = copy / f"{CANARY_PREFIX}{int(i):03d}"  # its own folder: one unit either way
                    folder.mkdir()
                    shutil.copyfile(canary_paths[i], folder / "canary.png")
            target = CanaryRunDirectory(work / f"run_{name}")
            target.create(cfg)
            reporter.info(f"canary audit: pipeline run '{name}' in {target.root}")
            pipeline(cfg, copy, target, reporter)
            runs[name] = target
    finally:
        if not keep_copy:
            shutil.rmtree(copy, ignore_errors=True)

    if _shared is not None:
        embedders, private = _shared
    else:
        embedders = _build_embedders(s)
        rels = [rel for rel, _ in entries]
        private = _embed_images(
            rels, [private_root / r for r in rels], [u for _, u in entries], embedders, s, reporter, "private"
        )
    names = [p.name for p in canary_paths]
    canaries = _embed_images(names, canary_paths, names, embedders, s, reporter, "canary")
    results: dict[str, Any] = {}
    for name, target in runs.items():
        paths = _released_images(target)
        released = _embed_images(
            [p.name for p in paths], paths, [p.name for p in paths], embedders, s, reporter, f"{name} run's released"
        )
        matched, detail = _canary_matches(canaries, released, private, s)
        results[name] = {"run_dir": str(target.root), "num_released": len(released), "matched": matched, **detail}

    in_canary_run = results["canaries"]["matched"]
    in_control = results["control"]["matched"]
    tp = int((in_canary_run & planted).sum())
    held = int((in_canary_run & ~planted).sum())
    ctrl = int((in_control & planted).sum())
    rate = tp / k
    baseline = max(held, ctrl) / k
    privacy_path = runs["canaries"].release / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {}
    delta = float(privacy.get("delta") or 0.0)
    guesses = int(in_canary_run.sum())
    one_run = one_run_epsilon_lower_bound(guesses, tp)
    two_run = _two_run_epsilon_lower_bound(tp, k, ctrl, k, delta, 0.95)
    min_k = math.ceil(math.log(0.05) / math.log(0.5))  # perfect separation needs 0.5^K < 0.05
    statement = (
        f"{tp}/{k} planted canaries were matched by a released sample, against {held}/{k} held-out canaries in "
        f"the same run and {ctrl}/{k} of the same canaries in a control run without them. "
        f"One-run audit: ε ≥ {one_run:.3g} at 95% confidence (claimed ε = {_fmt_eps(privacy.get('epsilon'))})."
    )
    if k < min_k:
        statement += (
            f" With K = {k}, even a perfect leak cannot prove ε > 0 at 95% confidence (needs K ≥ {min_k}): "
            "read the counts, not the bound."
        )
    elif one_run == 0.0 and tp <= held:
        statement += " No sign that planted canaries are released more often than unplanted ones."
    out = {
        "not_dp": True,
        "k": k,
        "num_canaries": 2 * k,
        "planted": [names[i] for i in np.flatnonzero(planted)],
        "held_out": [names[i] for i in np.flatnonzero(~planted)],
        "counts": {
            "planted_matched": tp,
            "held_out_matched": held,
            "control_matched": ctrl,
            "planted": k,
            "held_out": k,
        },
        "planted_match_rate": rate,
        "baseline_match_rate": baseline,
        "ratio": (rate / baseline) if baseline > 0 else None,
        "ratio_note": None if baseline > 0 else ("no canary matched" if tp == 0 else "no control matched: unbounded"),
        "epsilon_lower_bound_one_run": one_run,
        "epsilon_lower_bound_two_run": two_run,
        "epsilon_claimed": privacy.get("epsilon"),
        "delta": delta,
        "statement": statement,
        "threshold_rule": (
            "per feature space: closer to the canary than any private image is to any canary, and than half the "
            "distance between the two closest canaries; or pixel NCC >= the near-duplicate threshold"
        ),
        "canary_dir": str(canary_dir),
        "runs": {name: _jsonable(res) for name, res in results.items()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(work / "canary_audit.json", _jsonable(out))
    run.seal_private()  # the canary PNGs, copies and reruns: owner-only, like the rest of private/
    # thumbnails for the report: each canary with its nearest released image in the canaried run
    out["_pairs"] = [
        (
            canary_paths[i],
            runs["canaries"].release / "images" / results["canaries"]["pixel"]["nearest_released"][i]
            if results["canaries"]["pixel"]["nearest_released"]
            else None,
            bool(planted[i]),
            bool(in_canary_run[i]),
        )
        for i in range(2 * k)
    ]
    return out
