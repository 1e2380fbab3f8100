"""Voting spaces of PE over descriptions (``private_evolution`` Embedders).

``TextVoteSpace`` embeds descriptions with a sentence embedder (private captions vote there);
``RenderedVoteSpace`` renders each description and embeds the picture with an image feature
extractor (private images vote there), caching features by content hash so no description is
rendered twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spti.backends.base import ImageEmbedder, ImageGenerator, TextEmbedder


class TextVoteSpace:
    """Descriptions → L2-normalised sentence embeddings (text voting)."""

    def __init__(self, embedder: TextEmbedder, *, batch_size: int = 256) -> None:
        self.embedder = embedder
        self.batch_size = batch_size

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        parts = [
            np.asarray(self.embedder.embed(list(samples[i : i + self.batch_size])), dtype=np.float32)
            for i in range(0, len(samples), self.batch_size)
        ]
        emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        return normalize_rows(emb)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class FeatureCache:
    """Content-addressed float32 vectors in SQLite (WAL): renders are never recomputed on resume.

    Keys are hashes of everything that decides a vector (see :meth:`RenderedVoteSpace.key`), so a
    changed setting misses the cache instead of reading a stale feature.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only like everything outside release/ (SQLite gives its -wal/-shm files the same mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(f"SELECT key, data FROM features WHERE key IN ({marks})", chunk):
                    out[key] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (key, data) VALUES (?, ?)",
                [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def render_seed(text: str, seed: int, index: int = 0) -> int:
    """Seed of a description's rendering: same text, same picture (and cache hit) in every round.

    ``index`` numbers the renders of one description when it is rendered several times (``vote_seeds``);
    render 0 has the seed a single render always had.
    """
    spec = f"{seed}\x00{text}" if index == 0 else f"{seed}\x00{index}\x00{text}"
    digest = hashlib.sha256(spec.encode()).digest()
    return int.from_bytes(digest[:4], "little")


# Candidates are shrunk to the feature extractor's input as the SPTI authors shrink SDXL-Turbo's 512²
# renders to 256²: clean-fid's PIL bicubic on float channels, then rounded back to 8 bits.
FEATURE_RESIZE = "clean-bicubic"
VOTE_RENDER_SPEC = "spec.json"


def feature_input(image: Any, size: int | None) -> Any:
    """``image`` at ``size``² for the feature extractor (unchanged when it already is, or ``size`` is None)."""
    from PIL import Image as PILImage

    from spti.backends.local.features import clean_fid_resize

    image = image if image.mode == "RGB" else image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    pixels = clean_fid_resize(np.asarray(image), size)
    return PILImage.fromarray(np.clip(np.around(pixels), 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class VoteRenderSpec:
    """Everything that decides the pixels of a vote render (and so the name of its PNG).

    ``model`` names the generator, ``size`` is the side it drew at, ``steps``/``guidance`` are the
    values it used (resolved: never ``None`` for a diffusers generator), ``seed`` is the run's public
    seed (each render's own seed is :func:`render_seed` of it) and ``num_seeds`` the renders per text.
    """

    model: str
    size: int
    steps: int | None
    guidance: float | None
    seed: int
    num_seeds: int = 1

    def render_key(self, text: str, index: int = 0) -> str:
        """Content address of render ``index`` of ``text``: ``state/vote_renders/<key>.png``."""
        spec = (
            f"render|{self.model}|{self.size}|{self.steps}|{self.guidance}|{render_seed(text, self.seed, index)}|{text}"
        )
        return hashlib.sha256(spec.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": self.size,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "num_seeds": self.num_seeds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VoteRenderSpec:
        return cls(
            model=str(d["model"]),
            size=int(d["size"]),
            steps=None if d.get("steps") is None else int(d["steps"]),
            guidance=None if d.get("guidance") is None else float(d["guidance"]),
            seed=int(d["seed"]),
            num_seeds=int(d.get("num_seeds", 1)),
        )

    @classmethod
    def load(cls, render_dir: str | Path) -> VoteRenderSpec | None:
        """The spec recorded beside a folder of vote renders, or ``None`` when there is none."""
        path = Path(render_dir) / VOTE_RENDER_SPEC
        if not path.exists():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            return None


def native_size(generator: Any, fallback: int) -> int:
    """The generator's native side (diffusers: ``default_sample_size × vae_scale_factor``), else ``fallback``."""
    size = getattr(generator, "native_size", None)
    return int(size) if isinstance(size, int) and size > 0 else fallback


class RenderedVoteSpace:
    """Descriptions → rendered images → image features (image voting), cached by content hash.

    Each description is rendered ``num_seeds`` times (seeds from its text: :func:`render_seed`) at
    ``size`` pixels, ``"native"`` meaning the generator's own size (SDXL-Turbo: 512², as the SPTI authors
    render); each render is resized to ``feature_size``² (:func:`feature_input`; the private images are
    resized to the same side) and embedded, and a description's feature is the mean over its renders.
    Features are cached under :meth:`key`, which covers every setting that changes them.

    With ``render_dir``, the first render of each description is kept there as ``<render_key>.png``
    (public: it is drawn from a public text): the very image the private images voted for, which the
    render stage can release instead of drawing again. A cached feature whose render is missing is
    computed again from a fresh render, so a kept render always is the one its feature came from. After
    each call, renders of descriptions not in that call are removed (``prune``): PE releases descriptions
    of its last population only, and one round's renders are all that need keeping.
    """

    def __init__(
        self,
        generator: ImageGenerator,
        embedder: ImageEmbedder,
        *,
        size: int | str = "native",
        feature_size: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        num_seeds: int = 1,
        batch_size: int = 16,
        cache: FeatureCache | None = None,
        model: str = "",
        tag: str = "",
        render_dir: str | Path | None = None,
        prune: bool = True,
        fallback_size: int = 512,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        if size != "native" and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be 'native' or a positive number of pixels, got {size!r}")
        self.generator = generator
        self.embedder = embedder
        self.size = native_size(generator, fallback_size) if size == "native" else int(size)
        self.feature_size = feature_size
        # the values the generator really uses, so that the keys name them (None would hide a default)
        self.steps = steps if steps is not None else getattr(generator, "steps", None)
        self.guidance = guidance if guidance is not None else getattr(generator, "guidance", None)
        self.seed = seed
        self.num_seeds = num_seeds
        self.batch_size = batch_size
        self.cache = cache
        self.tag = tag
        self.spec = VoteRenderSpec(
            model=model, size=self.size, steps=self.steps, guidance=self.guidance, seed=seed, num_seeds=num_seeds
        )
        self.render_dir = Path(render_dir) if render_dir is not None else None
        self.prune = prune
        self.renders = 0
        self._progress = progress
        if self.render_dir is not None:
            from private_evolution.files import atomic_write_json

            self.render_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.render_dir / VOTE_RENDER_SPEC, self.spec.to_dict())

    def key(self, text: str) -> str:
        """Feature key: the renders (generator, size, steps, guidance, seeds), the resize and the extractor."""
        s = self.spec
        spec = (
            f"{s.model}|{self.tag}|{s.size}|{s.steps}|{s.guidance}|{s.seed}|seeds={s.num_seeds}|"
            f"features={self.feature_size}:{FEATURE_RESIZE}|{text}"
        )
        return hashlib.sha256(spec.encode()).hexdigest()

    def render_path(self, text: str) -> Path | None:
        """Where the first render of ``text`` is kept (``None`` without a render folder)."""
        if self.render_dir is None:
            return None
        return self.render_dir / f"{self.spec.render_key(text)}.png"

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        keys = [self.key(t) for t in samples]
        found = self.cache.get_many(sorted(set(keys))) if self.cache is not None else {}
        if self.render_dir is not None:
            for i, text in enumerate(samples):
                path = self.render_path(text)
                if keys[i] in found and path is not None and not path.exists():
                    del found[keys[i]]
        # unique missing texts only: duplicates in a population are rendered once
        unique: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found:
                unique.setdefault(k, i)
        order = list(unique.values())
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            texts = [samples[i] for i in idx]
            total: np.ndarray | None = None
            for j in range(self.num_seeds):
                images = self.generator.generate(
                    texts,
                    seeds=[render_seed(t, self.seed, j) for t in texts],
                    width=self.size,
                    height=self.size,
                    steps=self.steps,
                    guidance=self.guidance,
                )
                if j == 0 and self.render_dir is not None:
                    self._keep(texts, images)
                feats = np.asarray(
                    self.embedder.embed([feature_input(im, self.feature_size) for im in images]), dtype=np.float64
                )
                total = feats if total is None else total + feats
                self.renders += len(idx)
            assert total is not None
            mean = (total / self.num_seeds).astype(np.float32)
            new = {keys[i]: mean[j] for j, i in enumerate(idx)}
            found.update(new)
            if self.cache is not None:
                self.cache.put_many(new)
            if self._progress is not None:
                self._progress(len(idx))
        if self.render_dir is not None and self.prune:
            self._prune({self.spec.render_key(t) for t in samples})
        return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)

    def _keep(self, texts: Sequence[str], images: Sequence[Any]) -> None:
        import io

        from private_evolution.files import atomic_write_bytes

        for text, image in zip(texts, images, strict=True):
            path = self.render_path(text)
            assert path is not None
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())

    def _prune(self, keep: set[str]) -> None:
        assert self.render_dir is not None
        for path in self.render_dir.glob("*.png"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
