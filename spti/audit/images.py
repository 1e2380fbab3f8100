"""Loading released and private images once, batch by batch, into features and pixel thumbnails."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.audit.settings import IMAGE_SUFFIXES, AuditSettings
from spti.errors import SptiError

if TYPE_CHECKING:
    from PIL.Image import Image

    from spti.backends.base import ImageEmbedder
    from spti.rundir import RunDirectory


# --------------------------------------------------------------------------------------------
# Loading and embedding images
# --------------------------------------------------------------------------------------------
@dataclass
class _ImageSet:
    """Images of one side of the audit: names, privacy units, features per space, pixel thumbnails."""

    names: list[str]
    paths: list[Path]
    units: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.names)


def _pixel_signature(image: Image, size: int) -> np.ndarray:
    from PIL import Image as PILImage

    gray = image.convert("L").resize((size, size), PILImage.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def _embed_images(
    names: Sequence[str],
    paths: Sequence[Path],
    units: Sequence[str],
    embedders: dict[str, ImageEmbedder],
    settings: AuditSettings,
    reporter: Any,
    label: str,
) -> _ImageSet:
    """Load each image once (batch by batch) and keep only its features and thumbnail.

    Holding 30k decoded images would not fit in memory; features and 1 KB thumbnails do. An
    unreadable file is reported and left out rather than stopping an audit that is otherwise fine.
    """
    from spti.data import load_image

    kept_names: list[str] = []
    kept_paths: list[Path] = []
    kept_units: list[str] = []
    feats: dict[str, list[np.ndarray]] = {spec: [] for spec in embedders}
    pixels: list[np.ndarray] = []
    step = max(16, settings.batch_size)
    with reporter.progress(f"audit: {label} images", len(paths)) as advance:
        for start in range(0, len(paths), step):
            batch: list[Image] = []
            for name, path, unit in zip(
                names[start : start + step], paths[start : start + step], units[start : start + step], strict=True
            ):
                try:
                    batch.append(load_image(path, size=settings.image_size))
                except SptiError as exc:
                    reporter.warn(f"audit: {exc}")
                    continue
                kept_names.append(name)
                kept_paths.append(Path(path))
                kept_units.append(unit)
            if batch:
                for spec, embedder in embedders.items():
                    feats[spec].append(np.asarray(embedder.embed(batch), dtype=np.float32))
                pixels.extend(_pixel_signature(im, settings.pixel_size) for im in batch)
            advance(min(step, len(paths) - start))
    out = _ImageSet(kept_names, kept_paths, kept_units)
    for spec, chunks in feats.items():
        out.features[spec] = (
            np.concatenate(chunks) if chunks else np.zeros((0, getattr(embedders[spec], "dim", 1)), np.float32)
        )
    size = settings.pixel_size
    out.pixels = np.stack(pixels) if pixels else np.zeros((0, size, size), dtype=np.uint8)
    return out


def _build_embedders(settings: AuditSettings, skipped: dict[str, str] | None = None) -> dict[str, ImageEmbedder]:
    """The feature spaces of the audit. With ``skipped`` (a dict to fill), a space whose model is a
    hub id that is not cached while the hub cannot be used is left out at once, its reason recorded
    there, instead of failing the audit (or retrying for a minute); the others still run."""
    from spti.backends.factory import build_image_embedder
    from spti.models_check import image_features_offline_reason

    out: dict[str, ImageEmbedder] = {}
    for spec in settings.features:
        reason = image_features_offline_reason(spec) if skipped is not None else None
        if reason is not None:
            assert skipped is not None
            skipped[spec] = reason
            continue
        out[spec] = build_image_embedder(spec, device=settings.device, batch_size=settings.batch_size)
    return out


def _released_images(run: RunDirectory) -> list[Path]:
    folder = run.release / "images"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resolve_private_dir(run: RunDirectory, private_dir: str | Path | None) -> Path:
    """The private folder to audit against: the one given, else the one the run's manifest records."""
    if private_dir is None:
        manifest = run.private / "manifest.json"
        if not manifest.exists():
            raise SptiError(f"{run.root} records no private folder (no private/manifest.json); pass --private DIR")
        private_dir = json.loads(manifest.read_text())["root"]
    path = Path(private_dir).expanduser()
    if not path.exists():
        raise SptiError(f"private folder {path} does not exist; pass --private with the folder the run was made from")
    if not path.is_dir():
        raise SptiError(f"{path} is not a folder; pass --private with the folder of private images")
    return path.resolve()


def _private_entries(run: RunDirectory, private_dir: Path, reporter: Any) -> list[tuple[str, str]]:
    """(relpath, privacy unit) of the private images the run used, located under ``private_dir``.

    The manifest is the list of images that voted, with their units; a run without one (made from
    bring-your-own captions, say) has the folder scanned with the run's privacy unit instead.
    """
    manifest = run.private / "manifest.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text()).get("images", [])
        present = [(r["relpath"], str(r["unit"])) for r in rows if (private_dir / r["relpath"]).is_file()]
        if rows and not present:
            raise SptiError(
                f"{private_dir} does not hold the images of this run (e.g. {rows[0]['relpath']}); "
                "pass --private with the folder the run was made from"
            )
        if len(present) < len(rows):
            reporter.warn(f"audit: {len(rows) - len(present)} private images of the run are missing from {private_dir}")
        if present:
            return present
    from spti.data import scan_private_folder

    cfg = run.load_config()
    folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit)  # type: ignore[arg-type]
    return [(im.relpath, im.unit) for im in folder.images]
