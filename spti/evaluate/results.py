"""One result dictionary per metric, from the extracted features: numbers, sample counts, notes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from spti import metrics as spm
from spti.errors import SptiError
from spti.evaluate.common import WAVELET, WAVELET_LEVELS, Progress, unavailable
from spti.evaluate.extract import Extracted, Extractor
from spti.evaluate.text import CLIPTextTower, text_embedder
from spti.rundir import RunDirectory

if TYPE_CHECKING:
    from spti.config import RunConfig


def small_sample_note(n: int, m: int, dim: int) -> str | None:
    if min(n, m) <= dim:
        return (
            f"fewer samples than feature dimensions ({min(n, m)} ≤ {dim}): the covariances are rank-deficient "
            "and the distance is biased upward; compare it only with values at the same sample sizes"
        )
    return None


def frechet_result(name: str, ext: Extractor, priv: Extracted, rel: Extracted) -> dict[str, Any]:
    a, b = priv.features.get(ext.role), rel.features.get(ext.role)
    info: dict[str, Any] = {
        "extractor": ext.description,
        "n_private": 0 if a is None else len(a),
        "n_released": 0 if b is None else len(b),
    }
    if ext.reason is not None:
        return unavailable(ext.reason, **info)
    assert a is not None and b is not None
    if min(len(a), len(b)) < 2:
        return unavailable("needs at least 2 private and 2 released images", **info)
    notes = [n for n in (small_sample_note(len(a), len(b), a.shape[1]),) if n]
    if name == "fid" and min(len(a), len(b)) < 10_000:
        notes.append("published FIDs use ≥ 10,000 images per side; small sets give larger values")
    return {
        "status": "ok",
        "value": spm.frechet_distance_features(a, b),
        **info,
        "feature_dim": a.shape[1],
        "notes": notes,
    }


def quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {k: float(v) for k, v in zip(("min", "p5", "median", "p95", "max"), q, strict=True)}


def precision_recall_result(
    ext: Extractor, priv: Extracted, rel: Extracted, k: int, plot_data: dict[str, Any]
) -> dict[str, Any]:
    a, b = priv.features.get(ext.role), rel.features.get(ext.role)
    info: dict[str, Any] = {
        "extractor": ext.description,
        "n_private": 0 if a is None else len(a),
        "n_released": 0 if b is None else len(b),
        "k": k,
    }
    if ext.reason is not None:
        return unavailable(ext.reason, **info)
    assert a is not None and b is not None
    if min(len(a), len(b)) <= k:
        return unavailable(f"k={k} needs more than {k} private and {k} released images", **info)
    pr = spm.precision_recall(a, b, k=k)
    released_nn = spm.nearest_neighbour_distances(b, a)
    private_nn = spm.nearest_neighbour_distances(a, a, exclude_self=True)
    closest = float(released_nn.min())
    typical = float(np.median(private_nn))
    plot_data["nn"] = (released_nn, private_nn)
    return {
        "status": "ok",
        "precision": pr.precision,
        "recall": pr.recall,
        **info,
        "nearest_neighbour": {
            "released_to_private": quantiles(released_nn),
            "private_to_private": quantiles(private_nn),
            "closest_over_typical": closest / typical if typical > 0 else None,
            "released_closer_than_closest_private_pair": int((released_nn < private_nn.min()).sum()),
            "explains": (
                "distance from each released image to its nearest private image, against the distance "
                "between private images and their nearest other private image; a released image much "
                "closer to a private image than private images are to each other may be a near-copy"
            ),
        },
    }


def clip_score_result(
    ext: Extractor,
    text_tower: CLIPTextTower | None,
    text_reason: str | None,
    priv: Extracted,
    rel: Extracted,
    private_captions: dict[str, str],
    released_texts: dict[str, str],
) -> dict[str, Any]:
    info: dict[str, Any] = {"extractor": ext.description.replace("image embeddings", "image and text embeddings")}
    reason = ext.reason or text_reason
    pairs = [(i, released_texts[key]) for i, key in enumerate(rel.keys) if key in released_texts]
    info.update(n_released=len(pairs))
    if reason is not None or text_tower is None:
        return unavailable(reason or "CLIP text model unavailable", **info)
    if not pairs:
        return unavailable("no released image has a matching description in release/captions.jsonl", **info)
    image_feats = rel.features[ext.role][[i for i, _ in pairs]]
    result: dict[str, Any] = {
        "status": "ok",
        "value": spm.clip_score(image_feats, text_tower.embed([t for _, t in pairs])),
        **info,
        "pairs": "released image ↔ the description it was rendered from",
    }
    private_pairs = [(i, private_captions[key]) for i, key in enumerate(priv.keys) if key in private_captions]
    result["n_private"] = len(private_pairs)
    if private_pairs:
        feats = priv.features[ext.role][[i for i, _ in private_pairs]]
        result["private_reference"] = spm.clip_score(feats, text_tower.embed([t for _, t in private_pairs]))
        result["private_reference_pairs"] = "private image ↔ its caption (how faithful the captions are)"
    return result


def wavelet_result(
    size: int | None,
    size_reason: str | None,
    priv: Extracted,
    rel: Extracted,
    upscale: tuple[int, str] | None,
) -> dict[str, Any]:
    extractor = f"{WAVELET} DWT energy fractions, {WAVELET_LEVELS} levels, grayscale, zero-mean"
    info: dict[str, Any] = {
        "extractor": extractor + (f", at {size}×{size} (centre crop, Lanczos)" if size else ""),
        "n_private": len(priv.spectra),
        "n_released": len(rel.spectra),
    }
    if size is None or not priv.spectra or not rel.spectra:
        return unavailable(size_reason or "no images to analyse", **info)
    private = spm.WaveletSpectrum.from_fractions(priv.spectra, wavelet=WAVELET, levels=WAVELET_LEVELS)
    released = spm.WaveletSpectrum.from_fractions(rel.spectra, wavelet=WAVELET, levels=WAVELET_LEVELS)
    result: dict[str, Any] = {
        "status": "ok",
        "value": private.total_variation(released),
        "value_is": "total-variation distance between the mean spectra (0 = same energy split, 1 = disjoint)",
        **info,
        "analysis_size": size,
        "private": private.as_dict(),
        "released": released.as_dict(),
    }
    if upscale is not None:
        factor, name = upscale
        if rel.model_spectra:
            model = spm.WaveletSpectrum.from_fractions(rel.model_spectra, wavelet=WAVELET, levels=WAVELET_LEVELS)
            lanczos = spm.WaveletSpectrum.from_fractions(rel.lanczos_spectra, wavelet=WAVELET, levels=WAVELET_LEVELS)
            fine_model, fine_lanczos = model.by_level()["L1"], lanczos.by_level()["L1"]
            result["upscaler"] = {
                "upscaler": name,
                "factor": factor,
                "n": model.n,
                "compared": (
                    f"released images at full size vs the same images downscaled ×{factor} and "
                    "re-upscaled with Lanczos: the detail the upscaler adds beyond resampling"
                ),
                "model": model.as_dict(),
                "lanczos": lanczos.as_dict(),
                "total_variation": model.total_variation(lanczos),
                "finest_level_ratio": fine_model / fine_lanczos if fine_lanczos > 0 else None,
                "notes": ["the run's upscaler is Lanczos itself: this is a self-check"] if name == "lanczos" else [],
            }
        else:
            result["upscaler"] = unavailable(f"released images are too small for a ×{factor} round trip")
    return result


def text_result(
    run: RunDirectory,
    cfg: RunConfig,
    text_model: str | None,
    device: str,
    private_captions: list[str],
    released_texts: list[str],
    plot_data: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    stats = {"private": spm.text_stats(private_captions), "released": spm.text_stats(released_texts)}
    plot_data["text_lengths"] = (
        [len(spm.tokenize_words(t)) for t in private_captions],
        [len(spm.tokenize_words(t)) for t in released_texts],
    )
    info: dict[str, Any] = {"n_private": len(private_captions), "n_released": len(released_texts)}
    if not private_captions:
        return unavailable(
            "no private captions (image-voting runs caption nothing): only released text statistics",
            extractor="none",
            **info,
            text_stats=stats,
        )
    if min(len(private_captions), len(released_texts)) < 2:
        return unavailable("needs at least 2 private captions and 2 released descriptions", **info, text_stats=stats)
    progress("embedding private captions and released descriptions")
    from spti.backends.local._common import quiet_hf

    try:
        with quiet_hf(logs=False):
            embedder, name = text_embedder(run, cfg, text_model, device)
    except SptiError as exc:
        return unavailable(str(exc), extractor=text_model or cfg.embedding_model, **info, text_stats=stats)
    try:
        a, b = embedder.embed(private_captions), embedder.embed(released_texts)
    finally:
        close = getattr(embedder, "close", None)
        if callable(close):
            close()
    notes = [n for n in (small_sample_note(len(a), len(b), a.shape[1]),) if n]
    return {
        "status": "ok",
        "value": spm.frechet_distance_features(a, b),
        "extractor": f"sentence embeddings ({name}, {a.shape[1]}-d, L2-normalised)",
        **info,
        "feature_dim": int(a.shape[1]),
        "notes": notes,
        "text_stats": stats,
    }
