"""``spti evaluate``: how close the release is to the private data, for the data owner only.

Every number here is computed from the private images and captions *outside* any DP mechanism.
The results are therefore NOT differentially private: they are written under ``run/private/``
(``evaluation.json``, ``evaluation.html``), every output says so, and nothing is written to
``run/release/`` (whose ``report.html`` must stay free of non-DP numbers). Sharing an FID is
usually harmless in practice, but it is a statistic of the private set and no guarantee covers it.

Metrics (each reports its sample counts and the feature extractor next to its number):

- ``fid``: Fréchet distance in FID Inception-v3 pool3 space (2048-d, 299² bilinear, float64
  statistics). Needs the published weights file; never computed with anything else.
- ``fd-dinov2`` / ``fd-clip``: the same distance in DINOv2 CLS / CLIP image-embedding space.
- ``precision-recall``: improved precision/recall (k-NN manifolds) plus nearest-neighbour distances
  from each released image to the private set (a copy check), in DINOv2 space by default.
- ``clip-score``: how well each released image shows its released description (CLIP text ↔ image),
  with the private images ↔ their captions as a reference when captions exist.
- ``wavelet``: wavelet energy spectra of private vs released images at a common size; when the run
  upscaled, also model-upscaled vs a Lanczos upscale of the same images at full size.
- ``text-fd``: Fréchet distance between private-caption and released-description sentence
  embeddings, with length/vocabulary statistics of both.

Models are loaded from local files or the Hugging Face cache only as the rest of spti does; a metric
whose model cannot be loaded is reported as unavailable with the reason, the others still run.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti import metrics as spm
from spti.errors import SptiError
from spti.rundir import RunDirectory

if TYPE_CHECKING:
    from PIL.Image import Image

    from spti.config import RunConfig

__all__ = ["METRICS", "NOT_DP_WARNING", "evaluate_run", "parse_metrics"]

METRICS: tuple[str, ...] = ("fid", "fd-dinov2", "fd-clip", "precision-recall", "clip-score", "wavelet", "text-fd")
IMAGE_METRICS = frozenset({"fid", "fd-dinov2", "fd-clip", "precision-recall", "clip-score", "wavelet"})

NOT_DP_WARNING = (
    "NOT differentially private: these results are computed from the private images and captions "
    "outside the DP mechanism. They are for the data owner only; do not share or publish them."
)
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINOV2 = "facebook/dinov2-small"
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

WAVELET = "haar"
WAVELET_LEVELS = 4
WAVELET_MAX_SIZE = 256  # common analysis size cap: enough for 4 levels, cheap to transform
SUBSET_SEED = 0  # --max-images picks a fixed pseudo-random subset, the same on every call

Progress = Callable[[str], None]


def parse_metrics(value: str | Iterable[str] | None) -> list[str]:
    """Metric names from a comma list (or a sequence); ``None`` or ``"all"`` means every metric."""
    if value is None:
        return list(METRICS)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [m.strip().lower() for m in items if m.strip()]
    if not names or names == ["all"]:
        return list(METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise SptiError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)} (comma-separated)")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# What is evaluated
# --------------------------------------------------------------------------------------------
@dataclass
class _ImageSet:
    """Image files and the key that pairs each with its text (private relpath / released index)."""

    label: str
    paths: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    total: int = 0  # before --max-images

    def subset(self, max_images: int | None) -> _ImageSet:
        self.total = len(self.paths)
        if max_images is None or len(self.paths) <= max_images:
            return self
        pick = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(self.paths), size=max_images, replace=False))
        return _ImageSet(self.label, [self.paths[i] for i in pick], [self.keys[i] for i in pick], self.total)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows; a torn last line (a run killed mid-write) is ignored, as the pipeline does."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _private_images(run: RunDirectory, cfg: RunConfig, private_dir: Path | None) -> tuple[_ImageSet, Path]:
    if private_dir is not None:
        from spti.data import scan_private_folder

        folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit, verify=False)  # type: ignore[arg-type]
        images = _ImageSet("private", [im.path for im in folder.images], [im.relpath for im in folder.images])
        return images, folder.root
    manifest_path = run.private / "manifest.json"
    if not manifest_path.exists():
        raise SptiError(f"{run.root} records no private folder (no private/manifest.json); pass --private PRIVATE_DIR")
    manifest = json.loads(manifest_path.read_text())
    root = Path(manifest["root"])
    if not root.is_dir():
        raise SptiError(
            f"the private folder this run used ({root}) no longer exists; pass its new location with --private"
        )
    relpaths = [im["relpath"] for im in manifest.get("images", [])]
    present = [r for r in relpaths if (root / r).is_file()]
    if not present:
        raise SptiError(f"none of the {len(relpaths)} private images of this run is in {root}; pass --private")
    return _ImageSet("private", [root / r for r in present], present), root


def _released_images(run: RunDirectory) -> _ImageSet:
    paths = sorted((run.release / "images").glob("*.png"))
    return _ImageSet("released", paths, [p.stem.lstrip("0") or "0" for p in paths])


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------
@dataclass
class _Extractor:
    """One image feature space: the embedder (``None`` when it could not be loaded) and its description."""

    role: str
    description: str
    embedder: Any = None
    reason: str | None = None
    dim: int | None = None


def _inception_reason(weights: str | Path | None) -> str | None:
    """Why FID cannot be computed, or ``None`` when a weights file is there to try."""
    source = (
        f"download {INCEPTION_FILE} from https://github.com/mseitzer/pytorch-fid/releases "
        "(release 'fid_weights') and pass --inception-weights PATH"
    )
    if not weights:
        return f"no FID Inception-v3 weights given: {source}"
    if not Path(weights).expanduser().is_file():
        return f"FID Inception-v3 weights file {weights} does not exist: {source}"
    return None


def _load_extractors(
    roles: Iterable[str],
    *,
    inception_weights: str | Path | None,
    clip_model: str,
    dinov2_model: str,
    device: str,
    batch_size: int,
    progress: Progress,
) -> dict[str, _Extractor]:
    from spti.backends.factory import build_image_embedder

    out: dict[str, _Extractor] = {}
    for role in roles:
        if role == "inception":
            ext = _Extractor(role, "FID Inception-v3 pool3 (2048-d, 299² bilinear)")
            ext.reason = _inception_reason(inception_weights)
            spec = f"inception:{Path(str(inception_weights)).expanduser()}" if ext.reason is None else ""
            if ext.reason is None:
                ext.description += f", weights {Path(str(inception_weights)).name}"
        elif role == "dinov2":
            ext = _Extractor(role, f"DINOv2 CLS features ({dinov2_model})")
            spec = f"dinov2:{dinov2_model}"
        elif role == "clip":
            ext = _Extractor(role, f"CLIP image embeddings ({clip_model}, L2-normalised)")
            spec = f"clip:{clip_model}"
        else:  # pragma: no cover - roles come from this module
            raise ValueError(role)
        if ext.reason is None:
            progress(f"loading {ext.description}")
            try:
                ext.embedder = build_image_embedder(spec, device=device, batch_size=batch_size)
                ext.dim = int(getattr(ext.embedder, "dim", 0)) or None
                if ext.dim and role != "inception":
                    ext.description = ext.description.replace(")", f", {ext.dim}-d)", 1)
            except SptiError as exc:
                ext.reason = str(exc)
        out[role] = ext
    return out


@dataclass
class _Extracted:
    """What one pass over an image set produced."""

    keys: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    spectra: list[np.ndarray] = field(default_factory=list)
    model_spectra: list[np.ndarray] = field(default_factory=list)
    lanczos_spectra: list[np.ndarray] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _lanczos_round_trip(image: Image, factor: int) -> Image:
    """Downscale by ``factor`` and back up with Lanczos: what a plain resampling upscale would give."""
    from PIL import Image as PILImage

    w, h = image.size
    small = image.resize((max(1, w // factor), max(1, h // factor)), PILImage.Resampling.LANCZOS)
    return small.resize((w, h), PILImage.Resampling.LANCZOS)


def _extract(
    images: _ImageSet,
    extractors: Sequence[_Extractor],
    *,
    wavelet_size: int | None,
    upscale_factor: int | None,
    batch_size: int,
    progress: Progress,
) -> _Extracted:
    """One pass over the files: every feature space and spectrum from each decoded batch.

    One pass (rather than one per extractor) because decoding large private photos costs as much
    as a small model's forward pass; nothing but the current batch is held in memory.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    from spti.data import load_image

    out = _Extracted()
    chunks: dict[str, list[np.ndarray]] = {e.role: [] for e in extractors}
    progress(f"{images.label} images: {len(images.paths)}")
    for start in range(0, len(images.paths), batch_size):
        batch: list[Image] = []
        for path, key in zip(
            images.paths[start : start + batch_size], images.keys[start : start + batch_size], strict=True
        ):
            try:
                batch.append(load_image(path))
                out.keys.append(key)
            except SptiError:
                out.unreadable.append(key)
        if not batch:
            continue
        for ext in extractors:
            chunks[ext.role].append(np.asarray(ext.embedder.embed(batch), dtype=np.float32))
        for im in batch:
            if wavelet_size:
                fitted = ImageOps.fit(im, (wavelet_size, wavelet_size), PILImage.Resampling.LANCZOS)
                out.spectra.append(spm.image_energy_fractions(fitted, wavelet=WAVELET, levels=WAVELET_LEVELS))
            if upscale_factor and min(im.size) >= upscale_factor * 2**WAVELET_LEVELS:
                out.model_spectra.append(spm.image_energy_fractions(im, wavelet=WAVELET, levels=WAVELET_LEVELS))
                out.lanczos_spectra.append(
                    spm.image_energy_fractions(
                        _lanczos_round_trip(im, upscale_factor), wavelet=WAVELET, levels=WAVELET_LEVELS
                    )
                )
    for role, parts in chunks.items():
        out.features[role] = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return out


def _header_min_side(path: Path) -> int | None:
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            return min(im.size)
    except Exception:
        return None


def _wavelet_size(private: _ImageSet, released: _ImageSet) -> tuple[int | None, str | None]:
    """The common analysis size: no larger than the released images or the typical private image.

    Bands mean frequencies relative to the image size, so both sets are compared at one size;
    choosing it no larger than either set avoids inventing empty fine bands by upsampling.
    Sizes come from file headers (no decoding).
    """
    released_sides = [s for s in (_header_min_side(p) for p in released.paths[:8]) if s]
    private_sides = [s for s in (_header_min_side(p) for p in private.paths) if s]
    if not released_sides or not private_sides:
        return None, "no readable images on one side"
    size = min(WAVELET_MAX_SIZE, min(released_sides), int(np.median(private_sides)))
    step = 2**WAVELET_LEVELS
    size -= size % step
    if size < 2 * step:
        return None, f"images are too small for a {WAVELET_LEVELS}-level wavelet spectrum (need ≥ {2 * step} px)"
    return size, None


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------
class _CLIPTextTower:
    """CLIP text embeddings (projected) from a full CLIP checkpoint: the text half of CLIP score."""

    def __init__(self, model: str, *, device: str) -> None:
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        from spti.backends.local._common import (
            load_pretrained,
            quiet_hf,
            require,
            resolve_device,
            transformers_dtype_kwargs,
        )

        torch = require("torch")
        config = load_pretrained(AutoConfig.from_pretrained, model, "CLIP model")
        if config.model_type != "clip":
            raise SptiError(
                f"clip-score needs a full CLIP checkpoint (text and image towers); '{model}' is a "
                f"{config.model_type!r} model: pass --clip-model with e.g. {DEFAULT_CLIP}"
            )
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "CLIP tokenizer")
        # transformers 5 builds an empty tokenizer from a folder without vocabulary files
        probe = self.tokenizer("a photo", add_special_tokens=False)["input_ids"]
        if len(self.tokenizer) <= 2 or not probe or all(t == self.tokenizer.unk_token_id for t in probe):
            raise SptiError(f"'{model}' has no usable CLIP tokenizer (vocab.json/merges.txt): clip-score needs one")
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        self.device = resolve_device(device)
        with quiet_hf():
            self.model = load_pretrained(
                CLIPTextModelWithProjection.from_pretrained,
                model,
                "CLIP text model",
                config=text_config,
                **transformers_dtype_kwargs(torch.float32),
            )
        self.model.to(self.device).eval()
        limits = [self.tokenizer.model_max_length, text_config.max_position_embeddings]
        self.max_length = int(min(x for x in limits if isinstance(x, int) and x > 0))
        self._torch = torch

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,  # CLIP reads 77 tokens; longer descriptions are cut, as at render time
                max_length=self.max_length,
                return_tensors="pt",
            )
            with self._torch.inference_mode():
                emb = self.model(**{k: v.to(self.device) for k, v in enc.items()}).text_embeds
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _text_embedder(run: RunDirectory, cfg: RunConfig, text_model: str | None, device: str) -> tuple[Any, str]:
    """A local sentence embedder: ``text_model``, else the run's own embedding model.

    Evaluation never sends private captions to a hosted provider: a run that embedded text through
    an OpenAI-compatible API is evaluated with a local model instead (named in the result).
    """
    if text_model:
        from spti.backends.local.text import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(text_model, device=device), text_model
    if cfg.provider != "local":
        from spti.backends.local.text import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(DEFAULT_TEXT_MODEL, device=device), (
            f"{DEFAULT_TEXT_MODEL} (local; the run's hosted {cfg.embedding_model} is not sent private captions)"
        )
    from spti.backends.factory import Models

    local_cfg = dataclasses.replace(cfg, device=device)
    return Models(local_cfg, run.state).text_embedder, cfg.embedding_model


# --------------------------------------------------------------------------------------------
# Metric results
# --------------------------------------------------------------------------------------------
def _unavailable(reason: str, **info: Any) -> dict[str, Any]:
    return {"status": "unavailable", "reason": reason, **info}


def _small_sample_note(n: int, m: int, dim: int) -> str | None:
    if min(n, m) <= dim:
        return (
            f"fewer samples than feature dimensions ({min(n, m)} ≤ {dim}): the covariances are rank-deficient "
            "and the distance is biased upward; compare it only with values at the same sample sizes"
        )
    return None


def _frechet_result(name: str, ext: _Extractor, priv: _Extracted, rel: _Extracted) -> dict[str, Any]:
    a, b = priv.features.get(ext.role), rel.features.get(ext.role)
    info: dict[str, Any] = {
        "extractor": ext.description,
        "n_private": 0 if a is None else len(a),
        "n_released": 0 if b is None else len(b),
    }
    if ext.reason is not None:
        return _unavailable(ext.reason, **info)
    assert a is not None and b is not None
    if min(len(a), len(b)) < 2:
        return _unavailable("needs at least 2 private and 2 released images", **info)
    notes = [n for n in (_small_sample_note(len(a), len(b), a.shape[1]),) if n]
    if name == "fid" and min(len(a), len(b)) < 10_000:
        notes.append("published FIDs use ≥ 10,000 images per side; small sets give larger values")
    return {
        "status": "ok",
        "value": spm.frechet_distance_features(a, b),
        **info,
        "feature_dim": a.shape[1],
        "notes": notes,
    }


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {k: float(v) for k, v in zip(("min", "p5", "median", "p95", "max"), q, strict=True)}


def _precision_recall_result(
    ext: _Extractor, priv: _Extracted, rel: _Extracted, k: int, plot_data: dict[str, Any]
) -> dict[str, Any]:
    a, b = priv.features.get(ext.role), rel.features.get(ext.role)
    info: dict[str, Any] = {
        "extractor": ext.description,
        "n_private": 0 if a is None else len(a),
        "n_released": 0 if b is None else len(b),
        "k": k,
    }
    if ext.reason is not None:
        return _unavailable(ext.reason, **info)
    assert a is not None and b is not None
    if min(len(a), len(b)) <= k:
        return _unavailable(f"k={k} needs more than {k} private and {k} released images", **info)
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
            "released_to_private": _quantiles(released_nn),
            "private_to_private": _quantiles(private_nn),
            "closest_over_typical": closest / typical if typical > 0 else None,
            "released_closer_than_closest_private_pair": int((released_nn < private_nn.min()).sum()),
            "explains": (
                "distance from each released image to its nearest private image, against the distance "
                "between private images and their nearest other private image; a released image much "
                "closer to a private image than private images are to each other may be a near-copy"
            ),
        },
    }


def _clip_score_result(
    ext: _Extractor,
    text_tower: _CLIPTextTower | None,
    text_reason: str | None,
    priv: _Extracted,
    rel: _Extracted,
    private_captions: dict[str, str],
    released_texts: dict[str, str],
) -> dict[str, Any]:
    info: dict[str, Any] = {"extractor": ext.description.replace("image embeddings", "image and text embeddings")}
    reason = ext.reason or text_reason
    pairs = [(i, released_texts[key]) for i, key in enumerate(rel.keys) if key in released_texts]
    info.update(n_released=len(pairs))
    if reason is not None or text_tower is None:
        return _unavailable(reason or "CLIP text model unavailable", **info)
    if not pairs:
        return _unavailable("no released image has a matching description in release/captions.jsonl", **info)
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


def _wavelet_result(
    size: int | None,
    size_reason: str | None,
    priv: _Extracted,
    rel: _Extracted,
    upscale: tuple[int, str] | None,
) -> dict[str, Any]:
    extractor = f"{WAVELET} DWT energy fractions, {WAVELET_LEVELS} levels, grayscale, zero-mean"
    info: dict[str, Any] = {
        "extractor": extractor + (f", at {size}×{size} (centre crop, Lanczos)" if size else ""),
        "n_private": len(priv.spectra),
        "n_released": len(rel.spectra),
    }
    if size is None or not priv.spectra or not rel.spectra:
        return _unavailable(size_reason or "no images to analyse", **info)
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
            result["upscaler"] = _unavailable(f"released images are too small for a ×{factor} round trip")
    return result


def _text_result(
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
        return _unavailable(
            "no private captions (image-voting runs caption nothing): only released text statistics",
            extractor="none",
            **info,
            text_stats=stats,
        )
    if min(len(private_captions), len(released_texts)) < 2:
        return _unavailable("needs at least 2 private captions and 2 released descriptions", **info, text_stats=stats)
    progress("embedding private captions and released descriptions")
    from spti.backends.local._common import quiet_hf

    try:
        with quiet_hf(logs=False):
            embedder, name = _text_embedder(run, cfg, text_model, device)
    except SptiError as exc:
        return _unavailable(str(exc), extractor=text_model or cfg.embedding_model, **info, text_stats=stats)
    try:
        a, b = embedder.embed(private_captions), embedder.embed(released_texts)
    finally:
        close = getattr(embedder, "close", None)
        if callable(close):
            close()
    notes = [n for n in (_small_sample_note(len(a), len(b), a.shape[1]),) if n]
    return {
        "status": "ok",
        "value": spm.frechet_distance_features(a, b),
        "extractor": f"sentence embeddings ({name}, {a.shape[1]}-d, L2-normalised)",
        **info,
        "feature_dim": int(a.shape[1]),
        "notes": notes,
        "text_stats": stats,
    }


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """Evaluate a finished run against its private data; write ``private/evaluation.{json,html}``.

    ``metrics`` is a subset of :data:`METRICS` (a comma list or sequence). ``private_dir`` replaces
    the folder recorded in the run (e.g. a moved folder, or held-out images of the same people).
    ``max_images`` evaluates a fixed pseudo-random subset of each image set (quick checks).
    ``pr_space`` is the feature space of precision/recall: ``dinov2`` (default: it tracks human
    judgements of generated images better than Inception), ``clip`` or ``inception``.

    ``progress`` receives one short line per step (loading a model, a pass over the images).

    Returns the report that was written to ``evaluation.json``. It is NOT differentially private.
    """
    say: Progress = progress or (lambda _msg: None)
    chosen = parse_metrics(metrics)
    if max_images is not None and max_images < 2:
        raise SptiError(f"--max-images must be at least 2, got {max_images}")
    if pr_space not in ("dinov2", "clip", "inception"):
        raise SptiError(f"precision/recall space {pr_space!r}: use dinov2, clip or inception")
    run = RunDirectory(run_dir)
    cfg = run.load_config()
    released_rows = _read_rows(run.release / "captions.jsonl")
    released = _released_images(run)
    if not released_rows and not released.paths:
        raise SptiError(f"{run.root} has released nothing yet; finish the run (spti synthesize / evolve / render)")
    private_rows = [r for r in _read_rows(run.private / "captions.jsonl") if r.get("caption")]

    image_metrics = [m for m in chosen if m in IMAGE_METRICS]
    private = _ImageSet("private")
    private_root: Path | None = Path(private_dir).expanduser() if private_dir else None
    if image_metrics:
        private, private_root = _private_images(run, cfg, Path(private_dir) if private_dir else None)
    private = private.subset(max_images)
    released = released.subset(max_images)

    roles: dict[str, None] = {}
    for m in image_metrics:
        role = {"fid": "inception", "fd-dinov2": "dinov2", "fd-clip": "clip", "clip-score": "clip"}.get(m)
        if m == "precision-recall":
            role = pr_space
        if role:
            roles[role] = None
    extractors = _load_extractors(
        roles,
        inception_weights=inception_weights,
        clip_model=clip_model,
        dinov2_model=dinov2_model,
        device=device,
        batch_size=batch_size,
        progress=say,
    )
    text_tower, text_reason = None, None
    if "clip-score" in chosen and extractors["clip"].reason is None:
        try:
            text_tower = _CLIPTextTower(clip_model, device=device)
        except SptiError as exc:
            text_reason = str(exc)

    wavelet_size, size_reason = None, None
    upscale: tuple[int, str] | None = None
    if "wavelet" in chosen:
        wavelet_size, size_reason = _wavelet_size(private, released)
        if cfg.upscaler != "none" and cfg.upscale > 1:
            upscale = (cfg.upscale, cfg.upscaler)
    usable = [e for e in extractors.values() if e.embedder is not None]
    priv = rel = _Extracted()
    if usable or wavelet_size:  # otherwise nothing would use the decoded images
        kw: dict[str, Any] = {"wavelet_size": wavelet_size, "batch_size": batch_size, "progress": say}
        priv = _extract(private, usable, upscale_factor=None, **kw)
        rel = _extract(released, usable, upscale_factor=upscale[0] if upscale else None, **kw)

    plot_data: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    released_by_index = {str(r.get("index", i)): str(r.get("text", "")) for i, r in enumerate(released_rows)}
    for name in chosen:
        say(f"computing {name}")
        if name in ("fid", "fd-dinov2", "fd-clip"):
            role = {"fid": "inception", "fd-dinov2": "dinov2", "fd-clip": "clip"}[name]
            results[name] = _frechet_result(name, extractors[role], priv, rel)
        elif name == "precision-recall":
            results[name] = _precision_recall_result(extractors[pr_space], priv, rel, k, plot_data)
        elif name == "clip-score":
            results[name] = _clip_score_result(
                extractors["clip"],
                text_tower,
                text_reason,
                priv,
                rel,
                {str(r.get("relpath")): r["caption"] for r in private_rows},
                released_by_index,
            )
        elif name == "wavelet":
            results[name] = _wavelet_result(wavelet_size, size_reason, priv, rel, upscale)
        else:
            results[name] = _text_result(
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
            "subset_seed": SUBSET_SEED if max_images is not None else None,
        },
        "run": {
            "preset": cfg.preset,
            "voting": cfg.voting,
            "image_model": cfg.image_model,
            "render_size": cfg.render_size,
            "upscaler": cfg.upscaler,
            "upscale": cfg.upscale,
            "epsilon": _epsilon(run),
        },
        "metrics": results,
        "versions": _versions(),
    }
    report = _jsonable(report)
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


def _epsilon(run: RunDirectory) -> Any:
    path = run.release / "privacy.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("epsilon")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("spti", "numpy", "scipy", "torch", "transformers", "sentence-transformers", "PyWavelets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (the writer refuses NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value


# --------------------------------------------------------------------------------------------
# The owner's page
# --------------------------------------------------------------------------------------------
def headline(result: dict[str, Any]) -> str:
    """One short cell for a metric: its number(s), or why there is none."""
    if result.get("status") != "ok":
        return f"unavailable: {result.get('reason', '')}"
    if "precision" in result:
        return f"precision {result['precision']:.3f}, recall {result['recall']:.3f} (k={result['k']})"
    text = f"{result['value']:.4g}"
    if "private_reference" in result:
        text += f" (private images ↔ captions: {result['private_reference']:.4g})"
    return text


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(report: dict[str, Any], plot_data: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, PNG data URI) per plot. ``Figure`` objects, not pyplot: no global backend is touched."""
    from matplotlib.figure import Figure

    figures: list[tuple[str, str]] = []
    metrics = report["metrics"]

    def spectrum_bars(title: str, series: list[tuple[str, dict[str, float]]]) -> None:
        bands = list(series[0][1])
        fig = Figure(figsize=(9, 3.2))
        ax = fig.subplots()
        width = 0.8 / len(series)
        x = np.arange(len(bands))
        for i, (label, fractions) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [fractions[b] for b in bands], width, label=label)
        ax.set_xticks(x, bands, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("energy fraction")
        ax.set_xlabel("band (coarse → fine)")
        ax.legend()
        figures.append((title, _png(fig)))

    wave = metrics.get("wavelet", {})
    if wave.get("status") == "ok":
        spectrum_bars(
            f"Wavelet energy spectrum at {wave['analysis_size']}², private vs released",
            [("private", wave["private"]["fractions"]), ("released", wave["released"]["fractions"])],
        )
        up = wave.get("upscaler", {})
        if up.get("model"):
            spectrum_bars(
                f"Released images at full size: {up['upscaler']} ×{up['factor']} vs a Lanczos round trip",
                [("Lanczos", up["lanczos"]["fractions"]), (up["upscaler"], up["model"]["fractions"])],
            )
    if "nn" in plot_data:
        released_nn, private_nn = plot_data["nn"]
        fig = Figure(figsize=(6, 3.2))
        ax = fig.subplots()
        bins = np.histogram_bin_edges(np.concatenate([released_nn, private_nn]), bins=20)
        ax.hist(private_nn, bins=bins, alpha=0.6, label="private → nearest other private")
        ax.hist(released_nn, bins=bins, alpha=0.6, label="released → nearest private")
        ax.set_xlabel(f"distance ({metrics['precision-recall']['extractor']})", fontsize=8)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        figures.append(("Nearest-neighbour distances (copy check)", _png(fig)))
        pr = metrics["precision-recall"]
        fig = Figure(figsize=(3.5, 3.2))
        ax = fig.subplots()
        ax.bar(["precision", "recall"], [pr["precision"], pr["recall"]], color=["tab:blue", "tab:orange"])
        ax.set_ylim(0, 1)
        figures.append((f"Improved precision / recall (k={pr['k']})", _png(fig)))
    if "text_lengths" in plot_data:
        private_len, released_len = plot_data["text_lengths"]
        fig = Figure(figsize=(6, 3.2))
        ax = fig.subplots()
        both = [*private_len, *released_len]
        bins = np.histogram_bin_edges(both, bins=min(20, max(1, len(set(both))))) if both else 10
        if private_len:
            ax.hist(private_len, bins=bins, alpha=0.6, label="private captions")
        if released_len:
            ax.hist(released_len, bins=bins, alpha=0.6, label="released descriptions")
        ax.set_xlabel("length (words)")
        ax.set_ylabel("texts")
        ax.legend(fontsize=8)
        figures.append(("Text lengths", _png(fig)))
    return figures


def render_html(report: dict[str, Any], plot_data: dict[str, Any] | None = None) -> str:
    """The owner-only page: a NOT-DP banner, the metrics table, the plots, and the text statistics."""
    esc = html.escape
    rows = []
    for name, result in report["metrics"].items():
        notes = [*result.get("notes", [])]
        if result.get("status") == "ok" and "nearest_neighbour" in result:
            ratio = result["nearest_neighbour"].get("closest_over_typical")
            if ratio is not None:
                notes.append(f"closest released/private pair at {ratio:.3g}× the median private NN distance")
        rows.append(
            "<tr>"
            f"<th>{esc(name)}</th><td>{esc(headline(result))}</td><td>{esc(str(result.get('extractor', '')))}</td>"
            f"<td>{esc(str(result.get('n_private', '')))}</td><td>{esc(str(result.get('n_released', '')))}</td>"
            f"<td>{esc('; '.join(notes))}</td></tr>"
        )
    try:
        figures = _figures(report, plot_data or {})
        plots = "".join(
            f'<figure><img src="{uri}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>'
            for title, uri in figures
        )
    except ImportError:
        plots = "<p>Plots need matplotlib: <code>pip install 'spti[eval]'</code>.</p>"
    text = report["metrics"].get("text-fd", {}).get("text_stats")
    text_table = ""
    if text:
        keys = ("n_texts", "total_words", "vocabulary_size", "type_token_ratio")

        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = [
            f"<tr><th>{esc(k)}</th>" + "".join(f"<td>{esc(fmt(text[s].get(k)))}</td>" for s in text) + "</tr>"
            for k in keys
        ]
        for stat in ("mean", "std", "median", "p95"):
            lines.append(
                f"<tr><th>words {stat}</th>"
                + "".join(f"<td>{esc(fmt((text[s].get('words') or {}).get(stat, '')))}</td>" for s in text)
                + "</tr>"
            )
        lines.append(
            "<tr><th>top words</th>"
            + "".join(f"<td>{esc(', '.join(f'{w} ({c})' for w, c in text[s]['top_words']))}</td>" for s in text)
            + "</tr>"
        )
        text_table = (
            "<h2>Text statistics</h2><table><tr><th></th>"
            + "".join(f"<th>{esc(s)}</th>" for s in text)
            + "</tr>"
            + "".join(lines)
            + "</table>"
        )
    samples = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in report["samples"].items() if v is not None
    )
    details = esc(json.dumps(report["metrics"], indent=1, ensure_ascii=False))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>spti evaluation (NOT differentially private)</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}}
.banner{{background:#fde8e8;border:3px solid #c00;color:#900;padding:1rem;font-weight:600}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.9rem}} th{{background:#f4f4f4}}
figure{{display:inline-block;margin:.5rem}} figure img{{max-width:100%}} figcaption{{font-size:.85rem}}
pre{{background:#f8f8f8;padding:1rem;overflow:auto;font-size:.75rem}}
</style></head><body>
<p class="banner">NOT DIFFERENTIALLY PRIVATE: OWNER ONLY. DO NOT SHARE. {esc(report["warning"])}</p>
<h1>Evaluation of {esc(report["run_dir"])}</h1>
<p>Created {esc(report["created_at"])}. Private images from {esc(str(report["private_dir"]))}.
The release itself (<code>release/</code>) is covered by the run's DP guarantee; these numbers are not.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>result</th><th>feature extractor</th><th>private n</th><th>released n</th>
<th>notes</th></tr>{"".join(rows)}</table>
<h2>Plots</h2>
{plots}
{text_table}
<h2>Samples</h2>
<table>{samples}</table>
<details><summary>All numbers (evaluation.json)</summary><pre>{details}</pre></details>
</body></html>
"""
