"""Reading a private image folder safely.

Private folders in the wild hold corrupt and truncated files, non-images, empty files, 16-bit, CMYK,
palette and alpha images, EXIF-rotated photos, decompression bombs, nested folders, symlinks and
hidden files. The scan turns every such file into one :class:`SkippedFile` (named, with a short
reason, counted) and never crashes; only problems the user must fix (a missing folder, no valid
image, images outside any per-person sub-folder with folder-level privacy units) stop the run with a
one-line :class:`~spti.errors.SptiError`.

Decisions that matter for the DP guarantee:

- **One file, one vote.** The same file reached twice (a hard link, or a followed symlink) is kept
  once; otherwise one image would silently count twice and the sensitivity analysis would be wrong.
  With folder units, a file reached from two different units is refused: kept for one of them, it
  would stay in the data when the other person is removed.
- **Symlinks are not followed by default.** A link can point at private data outside the folder the
  user chose; with ``follow_symlinks=True`` only links that resolve inside the folder are followed.
- **Privacy units come from the folder layout only** (the first path component for ``"folder"``),
  never from image content, so the unit assignment is a public function of the file tree.

Extensions: the content decides the format, never the name, and only a short list of decoders is
ever used (JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF, PPM, and HEIF when a plugin provides it), so a
file claiming ``.jpg`` cannot reach a rarely-used Pillow decoder or Ghostscript (EPS). Files with
an extension in :data:`IMAGE_EXTENSIONS` are tried with that list; files with another (or no)
extension are *sniffed* with the formats that carry a strong magic number: an exported photo named
``IMG_0001`` or ``photo.jpg_original`` is kept, while a text, PDF, JSON or sidecar file is skipped
as "not an image".
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from spti.errors import SptiError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PrivacyUnit",
    "PrivateFolder",
    "PrivateImage",
    "SkippedFile",
    "check_output_location",
    "load_image",
    "scan_private_folder",
]

PrivacyUnit = Literal["image", "folder"]

#: Pillow's own default limit; a larger image is treated as a decompression bomb and never decoded.
DEFAULT_MAX_PIXELS = 89_478_485

#: Lower-case extensions treated as images. ``.gif`` and other animations use their first frame.
#: ``.heic``/``.heif`` are listed so that iPhone photos are reported as "unsupported image format"
#: (with the fix) rather than as "not an image" when Pillow has no HEIF plugin.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".webp",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".gif",
        ".avif",
        ".heic",
        ".heif",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)

# The decoders a private file may reach. Pillow knows ~40 formats; some are rarely exercised and
# EPS would hand the file to Ghostscript, so content that merely *claims* an image extension is
# only ever parsed as one of these (HEIF when a plugin such as pillow-heif registered it).
_DECODE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "AVIF", "PPM", "HEIF")
# Formats with a strong magic number, used to sniff files whose extension is not an image one.
_SNIFF_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF")

_HIGH_BIT_16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# EXIF orientation → the transposition that undoes it (the table ImageOps.exif_transpose uses).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow's limit is a module global; it is only ever raised (never lowered) and always restored.
_PIL_LIMIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivateImage:
    """One readable private image.

    ``relpath`` (not ``path``) is what the run records: it is stable when the folder moves, and it
    is how privacy units are derived, so the unit of an image is a public function of the layout.
    """

    path: Path
    relpath: str
    unit: str
    width: int
    height: int


@dataclass(frozen=True)
class SkippedFile:
    """A file (or hidden/unreadable folder) left out of the run, and why, so the user can fix it."""

    relpath: str
    reason: str

    @property
    def category(self) -> str:
        """The reason without its details (``"truncated or corrupt image"``), for counting."""
        return _reason_category(self.reason)


@dataclass
class PrivateFolder:
    """The outcome of :func:`scan_private_folder`: the images that vote and the files that do not."""

    root: Path
    privacy_unit: PrivacyUnit
    images: list[PrivateImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        """How many privacy units hold at least one valid image: the N of the DP analysis."""
        return len({im.unit for im in self.images})

    def units(self) -> list[str]:
        """The privacy-unit id of each image, aligned with :attr:`images` (what the votes group by)."""
        return [im.unit for im in self.images]

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts for logs and the run manifest (no image content, only counts)."""
        by_reason = Counter(s.category for s in self.skipped)
        return {
            "root": str(self.root),
            "privacy_unit": self.privacy_unit,
            "images": len(self.images),
            "units": self.num_units,
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------
class _UnreadableError(Exception):
    """Internal: a file that cannot be used, with the one-line reason shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Candidate:
    relpath: str
    path: Path
    via_symlink: bool
    file_id: tuple[int, int] | None  # (st_dev, st_ino) of the target; None where the filesystem has none
    size: int


def scan_private_folder(
    root: str | Path,
    *,
    privacy_unit: PrivacyUnit = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    follow_symlinks: bool = False,
    verify: bool = True,
    on_skip: Callable[[SkippedFile], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PrivateFolder:
    """Find every usable image under ``root`` (recursively, in sorted order) and its privacy unit.

    Args:
        root: the private folder.
        privacy_unit: ``"image"`` (one image is one unit) or ``"folder"`` (each top-level
            sub-folder is one unit, e.g. all images of one person: user-level DP).
        max_pixels: images with more pixels are skipped as decompression bombs. The size is read
            from the header, so such a file is never decoded.
        follow_symlinks: follow links that resolve inside ``root`` (links leading outside are
            always skipped: they could expose private data the user did not choose).
        verify: decode each image once (and convert it as :func:`load_image` would), so a truncated
            file is skipped now instead of failing mid-run. With ``False`` only headers are read
            (a PNG whose EXIF block follows its pixel data is still decoded, for its orientation).
        on_skip: called once per skipped file, as soon as it is found (e.g. to print a line).
        progress: called after each examined file with the number examined so far.

    Raises:
        SptiError: the folder is missing or is a file, holds no valid image, or (folder units) has
            images directly in ``root``.
    """
    if privacy_unit not in ("image", "folder"):
        raise SptiError(f"privacy unit must be 'image' or 'folder', not {privacy_unit!r}")
    if max_pixels < 1:
        raise SptiError(f"max_pixels must be a positive number of pixels, not {max_pixels}")
    given = Path(root).expanduser()
    if not given.exists():
        hint = " (it is a broken symlink)" if given.is_symlink() else ""
        raise SptiError(f"private folder {given} does not exist{hint}; pass the folder that holds the private images")
    if not given.is_dir():
        raise SptiError(f"private folder {given} is a file, not a folder; pass the folder that holds the images")
    base = given.resolve()

    skipped: list[SkippedFile] = []

    def skip(relpath: str, reason: str) -> None:
        item = SkippedFile(relpath, reason)
        skipped.append(item)
        if on_skip is not None:
            on_skip(item)

    candidates = list(_walk(base, follow_symlinks=follow_symlinks, skip=skip))
    preferred = _preferred_copies(candidates)
    if privacy_unit == "folder":
        _check_one_unit_per_file(base, candidates, preferred)

    images: list[PrivateImage] = []
    for count, cand in enumerate(sorted(candidates, key=lambda c: c.relpath), start=1):
        keeper = preferred.get(cand.file_id) if cand.file_id is not None else None
        if keeper is not None and keeper != cand.relpath:
            skip(cand.relpath, f"duplicate: same file as {keeper} (hard link or symlink)")
        elif cand.size == 0:
            skip(cand.relpath, "empty file")
        else:
            try:
                width, height = _inspect(cand.path, max_pixels=max_pixels, verify=verify)
            except _UnreadableError as exc:
                skip(cand.relpath, exc.reason)
            else:
                unit = cand.relpath if privacy_unit == "image" else cand.relpath.split("/", 1)[0]
                images.append(PrivateImage(cand.path, cand.relpath, unit, width, height))
        if progress is not None:
            progress(count)

    images.sort(key=lambda im: im.relpath)
    skipped.sort(key=lambda s: s.relpath)
    if not images:
        raise SptiError(_no_image_message(base, skipped))
    if privacy_unit == "folder":
        loose = [im.relpath for im in images if "/" not in im.relpath]
        if loose:
            raise SptiError(
                f"{len(loose)} image(s) sit directly in {base} (e.g. {loose[0]}) and belong to no privacy unit; "
                "move them into a sub-folder per person or use --privacy-unit image"
            )
    return PrivateFolder(root=base, privacy_unit=privacy_unit, images=images, skipped=skipped)


def _walk(base: Path, *, follow_symlinks: bool, skip: Callable[[str, str], None]) -> Iterator[_Candidate]:
    """Yield regular files under ``base`` in sorted order; report everything else through ``skip``."""
    base_stat = base.stat()
    visited: set[tuple[int, int]] = {(base_stat.st_dev, base_stat.st_ino)}

    def walk(folder: Path, prefix: str, via_symlink: bool) -> Iterator[_Candidate]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise SptiError(f"cannot read private folder {base}: {_describe(exc)}; check its permissions") from exc
            skip(prefix.rstrip("/"), f"unreadable folder ({_describe(exc)})")
            return
        for entry in entries:
            relpath = prefix + entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                skip(relpath, f"unreadable ({_describe(exc)})")
                continue
            if entry.name.startswith("."):
                skip(relpath, "hidden folder" if is_dir else "hidden file")
                continue
            target = Path(entry.path)
            if is_link:
                if not follow_symlinks:
                    skip(relpath, "symlink (not followed)")
                    continue
                try:
                    resolved = target.resolve(strict=True)
                except (OSError, RuntimeError):  # RuntimeError: symlink loop on Python < 3.13
                    skip(relpath, "broken symlink or symlink loop")
                    continue
                if not resolved.is_relative_to(base):
                    skip(relpath, "symlink pointing outside the folder (not followed)")
                    continue
                if resolved.is_dir():
                    st = resolved.stat()
                    if (st.st_dev, st.st_ino) in visited:
                        skip(relpath, "symlink to a folder already scanned (a loop or a second path)")
                        continue
                    visited.add((st.st_dev, st.st_ino))
                    yield from walk(target, relpath + "/", True)
                    continue
                try:
                    st = resolved.stat()
                except OSError as exc:
                    skip(relpath, f"unreadable ({_describe(exc)})")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skip(relpath, "not a regular file (device, pipe or socket)")
                    continue
                yield _Candidate(relpath, target, True, _file_id(st), st.st_size)
            elif is_dir:
                try:
                    st = entry.stat(follow_symlinks=False)
                    visited.add((st.st_dev, st.st_ino))
                except OSError:
                    pass
                yield from walk(target, relpath + "/", via_symlink)
            else:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    skip(relpath, f"unreadable ({_describe(exc)})")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    # Opening a FIFO would block the scan forever; devices are never images.
                    skip(relpath, "not a regular file (device, pipe or socket)")
                    continue
                yield _Candidate(relpath, target, via_symlink, _file_id(st), st.st_size)

    yield from walk(base, "", False)


def _file_id(st: os.stat_result) -> tuple[int, int] | None:
    # Some network/FUSE filesystems report inode 0 for every file: no identity then, never dedupe.
    return (st.st_dev, st.st_ino) if st.st_ino else None


def _preferred_copies(candidates: list[_Candidate]) -> dict[tuple[int, int], str]:
    """For each file reached more than once, the path that keeps it: the first one not via a link.

    Preferring the real location keeps a folder-level unit assignment independent of where
    someone happened to put a link to the file.
    """
    best: dict[tuple[int, int], _Candidate] = {}
    for cand in sorted(candidates, key=lambda c: (c.via_symlink, c.relpath)):
        if cand.file_id is not None and cand.file_id not in best:
            best[cand.file_id] = cand
    return {key: cand.relpath for key, cand in best.items()}


def _folder_unit(relpath: str) -> str:
    return relpath.split("/", 1)[0]


def _check_one_unit_per_file(base: Path, candidates: list[_Candidate], preferred: dict[tuple[int, int], str]) -> None:
    """Refuse a file reachable from two folder units (a hard link or a followed symlink).

    Keeping it once would give it to one unit only, so removing the other person would leave one
    of their images in the data: the add/remove-one-unit guarantee would not hold for them.
    """
    for cand in sorted(candidates, key=lambda c: c.relpath):
        keeper = preferred.get(cand.file_id) if cand.file_id is not None else None
        if keeper is not None and _folder_unit(keeper) != _folder_unit(cand.relpath):
            raise SptiError(
                f"{base / cand.relpath} is the same file as {base / keeper} (privacy units "
                f"{_folder_unit(cand.relpath)!r} and {_folder_unit(keeper)!r}); a file may belong to one privacy "
                "unit only: copy it or remove one link"
            )


def _no_image_message(base: Path, skipped: list[SkippedFile]) -> str:
    if not skipped:
        detail = "the folder is empty"
    else:
        top = Counter(s.category for s in skipped).most_common(3)
        reasons = ", ".join(f"{n} {cat}" for cat, n in top)
        detail = f"{len(skipped)} file(s) skipped ({reasons})"
    kinds = "JPEG, PNG, WebP, GIF, BMP or TIFF"
    return f"no valid image in {base}: {detail}; put {kinds} images there (sub-folders are fine)"


def _reason_category(reason: str) -> str:
    for sep in (" (", ":"):
        head, found, _ = reason.partition(sep)
        if found:
            reason = head
    return reason.strip()


def _describe(exc: BaseException) -> str:
    """``ClassName: message`` on one short line (file names in messages can hold newlines)."""
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Opening and decoding
# --------------------------------------------------------------------------------------------
@contextmanager
def _open_checked(path: Path, *, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``path`` lazily (header only) and refuse it before decoding if it has too many pixels."""
    ext = path.suffix.lower()
    formats = _available(_DECODE_FORMATS if ext in IMAGE_EXTENSIONS else _SNIFF_FORMATS)
    img = _open_header(path, max_pixels=max_pixels, formats=formats, ext=ext)
    try:
        width, height = img.size
        pixels = max(1, width) * max(1, height)
        if pixels > max_pixels:
            raise _UnreadableError(f"decompression bomb: {pixels} pixels > limit {max_pixels}")
        yield img
    finally:
        img.close()


def _open_header(path: Path, *, max_pixels: int, formats: tuple[str, ...], ext: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel check (with the caller's limit) replaces Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return Image.open(path, formats=formats)
            except Image.DecompressionBombError as exc:
                claimed = _claimed_pixels(exc)
                if claimed is not None and claimed > max_pixels:
                    raise _UnreadableError(f"decompression bomb: {claimed} pixels > limit {max_pixels}") from None
                # The caller allows more than Pillow does: read the header again under the caller's
                # limit (nothing is decoded here), then put Pillow's global limit back.
                with _pil_pixel_limit(max_pixels):
                    return Image.open(path, formats=formats)
    except _UnreadableError:
        raise
    except UnidentifiedImageError:
        if ext in {".heic", ".heif", ".avif"}:
            raise _UnreadableError(
                f"unsupported image format ({ext}: this Pillow cannot decode it; convert it to JPEG or PNG)"
            ) from None
        if ext in IMAGE_EXTENSIONS:
            raise _UnreadableError(f"not an image (unrecognised content for a {ext} file)") from None
        raise _UnreadableError("not an image") from None
    except PermissionError as exc:
        raise _UnreadableError(f"permission denied ({_describe(exc)})") from None
    except FileNotFoundError:
        raise _UnreadableError("file disappeared during the scan") from None
    except MemoryError:
        raise _UnreadableError("too large to read (MemoryError)") from None
    except Exception as exc:  # Pillow plugins raise many kinds on broken headers; none may stop a scan
        raise _UnreadableError(f"truncated or corrupt image ({_describe(exc)})") from None


def _claimed_pixels(exc: Exception) -> int | None:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


@contextmanager
def _pil_pixel_limit(limit: int) -> Iterator[None]:
    """Temporarily let Pillow open headers up to ``limit`` pixels, restoring its global afterwards."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow errors above twice its limit; keep a user's own None (no limit) as it is.
        if saved is not None and 2 * saved < limit:
            Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _available(formats: tuple[str, ...]) -> tuple[str, ...]:
    Image.init()  # registers the plugins (and any third-party ones already imported)
    return tuple(f for f in formats if f in Image.OPEN)


def _inspect(path: Path, *, max_pixels: int, verify: bool) -> tuple[int, int]:
    """Width and height after EXIF orientation; with ``verify`` also decode and convert once."""
    with _open_checked(path, max_pixels=max_pixels) as img:
        width, height = img.size  # from the header, before draft() below shrinks it
        if verify:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data"
                    # Decoding at reduced scale (JPEG) still reads every byte, so truncation is
                    # caught, at a fraction of the cost of a full-size decode of a large photo.
                    img.draft(None, (256, 256))
                    img.load()
                    _to_rgb(img)
            except MemoryError:
                raise _UnreadableError("too large to decode (MemoryError)") from None
            except Exception as exc:
                raise _UnreadableError(f"truncated or corrupt image ({_describe(exc)})") from None
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        return width, height


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1–8 (1 when absent or unreadable: a broken tag must not lose the image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            value = img.getexif().get(0x0112, 1)
        value = int(value)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, size: int | None = None) -> Image.Image:
    """Decode one private image as an 8-bit RGB image the models can take.

    EXIF orientation is applied (a phone photo is upright); 16-bit, 32-bit and float grayscale are
    scaled to 8 bits rather than clipped (Pillow's own ``convert`` clips 16-bit to white); CMYK is
    converted; transparency is composited onto white (what viewers show, rather than black); only
    the first frame of an animation is used. With ``size``, the shorter side is resized to ``size``
    (Lanczos) and the centre cropped to ``size``×``size``.

    Raises:
        SptiError: naming the file, when it cannot be read.
    """
    path = Path(path)
    if size is not None and size < 1:
        raise SptiError(f"image size must be a positive number of pixels, not {size}")
    try:
        with _open_checked(path, max_pixels=max_pixels) as img:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    if size is not None:
                        img.draft(None, (size, size))  # JPEG: decode at the smallest scale ≥ size
                    img.load()
                    rgb = _to_rgb(img)
                    orientation = _orientation(img)
            except MemoryError:
                raise _UnreadableError("too large to decode (MemoryError)") from None
            except Exception as exc:
                raise _UnreadableError(f"truncated or corrupt image ({_describe(exc)})") from None
    except _UnreadableError as exc:
        raise SptiError(f"cannot read image {path}: {exc.reason}; remove or replace the file") from None
    if orientation in _ORIENTATION_FIX:
        rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
    if size is not None:
        rgb = _fit_square(rgb, size)
    return rgb


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes (see :func:`load_image` for the choices)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _HIGH_BIT_16 or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _gray_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth gray values to 0–255 by their nominal range.

    16-bit data (``I;16*``, and ``I`` whose values fit in 0–65535, which is how Pillow stores most
    16-bit files) are divided by 257 so 65535 → 255. Float data in 0–1 are multiplied by 255, in
    0–255 are kept. Anything else (signed or wider ranges) is stretched from its min to its max,
    as no nominal range is known.
    """
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if mode in _HIGH_BIT_16 or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = values
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (Lanczos), then crop the centre ``size``×``size``."""
    width, height = img.size
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------------------------
# Output location
# --------------------------------------------------------------------------------------------
def check_output_location(private_root: str | Path, output: str | Path) -> None:
    """Refuse an output folder inside the private folder, or a private folder inside the output.

    An output inside the private folder would mix private captions and released images with the
    private data (and a later scan would read the run's own files as private images); a private
    folder inside the output could be deleted or published with the run. Symlinks are resolved,
    and on case-insensitive filesystems the same folder is recognised by identity, not spelling.
    """
    private = Path(private_root).expanduser().resolve()
    out = Path(output).expanduser().resolve()
    if _is_within(out, private):
        raise SptiError(
            f"output folder {out} is inside the private folder {private}; "
            "choose an output folder outside it so run files never mix with private data"
        )
    if _is_within(private, out):
        raise SptiError(
            f"private folder {private} is inside the output folder {out}; "
            "choose an output folder that does not contain the private data"
        )


def _is_within(child: Path, parent: Path) -> bool:
    """True if ``child`` is ``parent`` or below it (by path, or by identity of existing folders)."""
    if child == parent or child.is_relative_to(parent):
        return True
    if not parent.exists():
        return False
    for ancestor in (child, *child.parents):
        if ancestor.exists():
            try:
                if os.path.samefile(ancestor, parent):
                    return True
            except OSError:
                continue
    return False
