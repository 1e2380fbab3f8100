"""What is evaluated: the private and released image sets of a run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spti.errors import SptiError
from spti.evaluate.common import SUBSET_SEED
from spti.rundir import RunDirectory

if TYPE_CHECKING:
    from spti.config import RunConfig


@dataclass
class ImageSet:
    """Image files and the key that pairs each with its text (private relpath / released index)."""

    label: str
    paths: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    total: int = 0  # before --max-images

    def subset(self, max_images: int | None, *, seed: int = SUBSET_SEED) -> ImageSet:
        """At most ``max_images`` files, a pseudo-random draw fixed by ``seed`` (in file order)."""
        self.total = len(self.paths)
        if max_images is None or len(self.paths) <= max_images:
            return self
        pick = np.sort(np.random.default_rng(seed).choice(len(self.paths), size=max_images, replace=False))
        return ImageSet(self.label, [self.paths[i] for i in pick], [self.keys[i] for i in pick], self.total)


def private_images(run: RunDirectory, cfg: RunConfig, private_dir: Path | None) -> tuple[ImageSet, Path]:
    if private_dir is not None:
        from spti.data import scan_private_folder

        folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit, verify=False)  # type: ignore[arg-type]
        images = ImageSet("private", [im.path for im in folder.images], [im.relpath for im in folder.images])
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
    return ImageSet("private", [root / r for r in present], present), root


def released_images(run: RunDirectory) -> ImageSet:
    paths = sorted((run.release / "images").glob("*.png"))
    return ImageSet("released", paths, [p.stem.lstrip("0") or "0" for p in paths])
