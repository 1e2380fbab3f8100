"""A small, procedurally drawn "private" image folder: cartoon faces, one sub-folder per person.

Tests, the offline ``smoke`` preset and the examples need a private folder that is free to ship
(no real person), deterministic (same bytes for the same seed), tiny, and structured like real
user data: each person has stable traits (skin, hair, eyes, background, glasses) and each of their
images varies the pose, expression and lighting, so folder-level privacy units are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["write_example_folder"]

_SKIN = [(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 20, 20), (90, 56, 37), (165, 107, 70), (230, 200, 120), (200, 80, 40), (150, 150, 150)]
_EYES = [(60, 40, 20), (50, 90, 160), (60, 120, 70), (40, 40, 40)]
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges with few colours (small PNGs)


@dataclass(frozen=True)
class _Person:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]
    background: tuple[int, int, int]
    hair_style: int  # 0 short, 1 long, 2 bald
    face_aspect: float  # height / width of the face oval
    glasses: bool


def _person(rng: np.random.Generator) -> _Person:
    hue_rgb = rng.integers(60, 230, size=3)
    return _Person(
        skin=_SKIN[int(rng.integers(len(_SKIN)))],
        hair=_HAIR[int(rng.integers(len(_HAIR)))],
        eyes=_EYES[int(rng.integers(len(_EYES)))],
        background=(int(hue_rgb[0]), int(hue_rgb[1]), int(hue_rgb[2])),
        hair_style=int(rng.integers(3)),
        face_aspect=float(rng.uniform(1.05, 1.35)),
        glasses=bool(rng.random() < 0.35),
    )


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, round(c * factor))) for c in colour)
    return (r, g, b)


def _draw_face(person: _Person, rng: np.random.Generator, size: int) -> Image.Image:
    s = size * _SUPERSAMPLE
    light = float(rng.uniform(0.85, 1.15))  # per-image lighting
    canvas = Image.new("RGB", (s, s), _shade(person.background, light))
    draw = ImageDraw.Draw(canvas)

    # Shoulders, then the head: position and size jitter per image (the "pose").
    cx = s / 2 + rng.uniform(-0.06, 0.06) * s
    cy = s / 2 + rng.uniform(-0.04, 0.04) * s
    half_w = s * rng.uniform(0.24, 0.28)
    half_h = half_w * person.face_aspect
    shirt = _shade(person.background, 0.55)
    draw.ellipse((cx - 0.45 * s, cy + 0.75 * half_h, cx + 0.45 * s, cy + 1.9 * half_h), fill=shirt)

    skin = _shade(person.skin, light)
    hair = _shade(person.hair, light)
    if person.hair_style == 1:  # long hair behind the face
        draw.rounded_rectangle(
            (cx - 1.2 * half_w, cy - 1.1 * half_h, cx + 1.2 * half_w, cy + 0.9 * half_h), radius=s // 8, fill=hair
        )
    draw.ellipse((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=skin)
    if person.hair_style in (0, 1):  # hair cap on top
        draw.chord((cx - 1.05 * half_w, cy - 1.12 * half_h, cx + 1.05 * half_w, cy + 0.2 * half_h), 180, 360, fill=hair)

    # Eyes (the gaze shifts a little), optional glasses, nose and mouth (the "expression").
    eye_dy = -0.12 * half_h
    eye_dx = 0.42 * half_w
    eye_r = 0.13 * half_w
    gaze = rng.uniform(-0.3, 0.3) * eye_r
    for side in (-1, 1):
        ex, ey = cx + side * eye_dx, cy + eye_dy
        draw.ellipse((ex - eye_r, ey - 0.7 * eye_r, ex + eye_r, ey + 0.7 * eye_r), fill=(250, 250, 250))
        draw.ellipse(
            (ex + gaze - 0.5 * eye_r, ey - 0.5 * eye_r, ex + gaze + 0.5 * eye_r, ey + 0.5 * eye_r), fill=person.eyes
        )
        if person.glasses:
            g = 1.7 * eye_r
            draw.ellipse((ex - g, ey - g, ex + g, ey + g), outline=(30, 30, 30), width=max(1, s // 64))
    nose = _shade(person.skin, 0.8 * light)
    draw.line((cx, cy, cx - 0.08 * half_w, cy + 0.25 * half_h), fill=nose, width=max(1, s // 64))

    mouth_y = cy + 0.5 * half_h
    mouth_w = half_w * rng.uniform(0.3, 0.5)
    expression = int(rng.integers(3))
    lips = (150, 50, 60)
    if expression == 0:  # smile
        draw.arc(
            (cx - mouth_w, mouth_y - 0.5 * mouth_w, cx + mouth_w, mouth_y + 0.5 * mouth_w),
            20,
            160,
            fill=lips,
            width=s // 48,
        )
    elif expression == 1:  # neutral
        draw.line((cx - mouth_w, mouth_y, cx + mouth_w, mouth_y), fill=lips, width=s // 48)
    else:  # open mouth
        draw.ellipse(
            (cx - 0.4 * mouth_w, mouth_y - 0.3 * mouth_w, cx + 0.4 * mouth_w, mouth_y + 0.4 * mouth_w), fill=lips
        )
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def write_example_folder(
    path: str | Path, *, num_people: int = 6, images_per_person: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """Write ``num_people`` sub-folders (``person_01``, …) of ``images_per_person`` PNG faces each.

    The same arguments always give the same files (byte for byte), so runs over the folder are
    reproducible. Existing files of the same names are overwritten; other files are left alone.

    Returns:
        The folder, as an absolute path.
    """
    if num_people < 1 or images_per_person < 1:
        raise ValueError("num_people and images_per_person must be at least 1")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, not {size}")
    root = Path(path).expanduser().absolute()
    for p in range(num_people):
        person = _person(np.random.default_rng([seed, p]))
        folder = root / f"person_{p + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_person):
            image = _draw_face(person, np.random.default_rng([seed, p, i + 1]), size)
            # Fixed encoder settings and no metadata, so the bytes depend only on the pixels.
            image.save(folder / f"{i + 1:03d}.png", format="PNG", optimize=True)
    return root
