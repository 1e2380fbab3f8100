"""Reading a private folder: every kind of bad input is skipped with a reason, never a crash."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spti.data import (
    IMAGE_EXTENSIONS,
    PrivateFolder,
    SkippedFile,
    check_output_location,
    load_image,
    scan_private_folder,
)
from spti.errors import SptiError
from spti.testing.example_images import write_example_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "private_faces"

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Builders for the bad-input folder
# --------------------------------------------------------------------------------------------
def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kwargs)
    return path


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _halves(w: int, h: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), left)
    img.paste(right, (w // 2, 0, w, h))
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming huge dimensions, with (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _symlink(link: Path, target: str | Path) -> None:
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError) as exc:  # e.g. Windows without the privilege
        pytest.skip(f"symlinks unavailable: {exc}")


KEPT = [
    "alice/001.png",
    "alice/nested/deep/002.jpg",
    "alice/rotated.jpg",
    "bob/anim.gif",
    "bob/cmyk.jpg",
    "bob/gray16.png",
    "bob/palette.png",
    "bob/rgba.png",
    "dave/photo",
]

SKIPPED = {
    ".cache": "hidden folder",
    ".hidden.png": "hidden file",
    "carol/bomb.png": "decompression bomb: 200000000 pixels > limit 89478485",
    "carol/corrupt.png": "truncated or corrupt image",
    "carol/empty.png": "empty file",
    "carol/fake.jpg": "not an image",
    "carol/link_out.jpg": "symlink (not followed)",
    "carol/loop.jpg": "symlink (not followed)",
    "carol/notes.txt": "not an image",
    "carol/truncated.jpg": "truncated or corrupt image",
    "dave/readme.md": "not an image",
}


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    root = tmp_path / "private"
    # alice: a plain PNG, a JPEG deep in nested folders, an EXIF-rotated photo (orientation 6)
    _save(_noise(24, 16), root / "alice" / "001.png")
    _save(_noise(30, 20, seed=1), root / "alice" / "nested" / "deep" / "002.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(_halves(40, 20, RED, BLUE), root / "alice" / "rotated.jpg", "JPEG", exif=exif.tobytes(), quality=95)

    # bob: the awkward modes
    gray16 = Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16))
    assert gray16.mode.startswith("I;16")
    _save(gray16, root / "bob" / "gray16.png")
    _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), root / "bob" / "cmyk.jpg", quality=95)
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * (256 - 2) * 3)
    palette.paste(1, (2, 0, 4, 2))
    _save(palette, root / "bob" / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    _save(rgba, root / "bob" / "rgba.png")
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    _save(frames[0], root / "bob" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    # carol: nothing usable
    carol = root / "carol"
    carol.mkdir()
    jpeg = io.BytesIO()
    _noise(64, 64).save(jpeg, "JPEG")
    (carol / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (carol / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (carol / "fake.jpg").write_text("I am text wearing a .jpg extension\n")
    (carol / "empty.png").write_bytes(b"")
    (carol / "notes.txt").write_text("private notes, not an image\n")
    (carol / "bomb.png").write_bytes(_bomb_png(20_000, 10_000))
    outside = _save(_noise(8, 8), tmp_path / "elsewhere" / "secret.jpg")
    _symlink(carol / "link_out.jpg", outside)
    _symlink(carol / "loop.jpg", "loop.jpg")

    # dave: an image without extension (sniffed and kept) and a text file
    _save(_noise(10, 10), root / "dave" / "photo", "PNG")
    (root / "dave" / "readme.md").write_text("# hello\n")

    # hidden file and hidden folder (holding a valid image that must not be used)
    _save(_noise(8, 8), root / ".hidden.png")
    _save(_noise(8, 8), root / ".cache" / "thumb.png")
    return root


def _reasons(folder: PrivateFolder) -> dict[str, str]:
    return {s.relpath: s.reason for s in folder.skipped}


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------
def test_bad_folder_keeps_exactly_the_valid_images(bad_folder: Path) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    seen: list[SkippedFile] = []
    counts: list[int] = []
    folder = scan_private_folder(bad_folder, on_skip=seen.append, progress=counts.append)

    assert [im.relpath for im in folder.images] == KEPT
    assert all(im.path.is_absolute() and im.path.exists() for im in folder.images)
    reasons = _reasons(folder)
    assert set(reasons) == set(SKIPPED)
    for relpath, expected in SKIPPED.items():
        assert reasons[relpath].startswith(expected), (relpath, reasons[relpath])
    assert "OSError" in reasons["carol/truncated.jpg"]
    # one call per skipped file, nothing else
    assert sorted(s.relpath for s in seen) == sorted(SKIPPED)
    assert len(seen) == len(folder.skipped)
    assert counts == sorted(counts)
    assert counts[-1] == len(KEPT) + 7  # every regular file examined (not hidden ones, not links)
    assert pil_limit == Image.MAX_IMAGE_PIXELS


def test_sizes_are_after_exif_orientation(bad_folder: Path) -> None:
    folder = scan_private_folder(bad_folder)
    sizes = {im.relpath: (im.width, im.height) for im in folder.images}
    assert sizes["alice/rotated.jpg"] == (20, 40)
    assert sizes["alice/001.png"] == (24, 16)
    assert sizes["alice/nested/deep/002.jpg"] == (30, 20)
    assert sizes == {
        im.relpath: (im.width, im.height)
        for im in scan_private_folder(bad_folder, verify=False).images
        if im.relpath in sizes
    }


def test_units_for_both_privacy_modes(bad_folder: Path) -> None:
    per_image = scan_private_folder(bad_folder, privacy_unit="image")
    assert per_image.units() == KEPT
    assert per_image.num_units == len(KEPT)

    per_folder = scan_private_folder(bad_folder, privacy_unit="folder")
    assert per_folder.units() == [p.split("/")[0] for p in KEPT]
    assert per_folder.num_units == 3  # carol has no valid image, so no vote
    summary = per_folder.summary()
    assert summary["images"] == len(KEPT)
    assert summary["units"] == 3
    assert summary["skipped"] == len(SKIPPED)
    assert summary["privacy_unit"] == "folder"
    assert summary["skipped_by_reason"] == {
        "not an image": 3,
        "symlink": 2,
        "truncated or corrupt image": 2,
        "decompression bomb": 1,
        "empty file": 1,
        "hidden file": 1,
        "hidden folder": 1,
    }


def test_scan_is_deterministic(bad_folder: Path) -> None:
    first = scan_private_folder(bad_folder, privacy_unit="folder")
    second = scan_private_folder(bad_folder, privacy_unit="folder")
    assert first.images == second.images
    assert first.skipped == second.skipped


def test_small_pixel_limit_is_checked_before_decoding(bad_folder: Path) -> None:
    folder = scan_private_folder(bad_folder, max_pixels=300)
    reasons = _reasons(folder)
    assert reasons["alice/001.png"] == "decompression bomb: 384 pixels > limit 300"
    assert reasons["alice/rotated.jpg"] == "decompression bomb: 800 pixels > limit 300"
    assert "bob/gray16.png" in {im.relpath for im in folder.images}


def test_pixel_limit_above_pillows_is_honoured_and_restored(bad_folder: Path) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    # Header only (verify=False): the 200-Mpixel header is accepted under a larger limit.
    folder = scan_private_folder(bad_folder, max_pixels=300_000_000, verify=False)
    bomb = next(im for im in folder.images if im.relpath == "carol/bomb.png")
    assert (bomb.width, bomb.height) == (20_000, 10_000)
    assert pil_limit == Image.MAX_IMAGE_PIXELS


def test_follow_symlinks_only_inside_the_folder(bad_folder: Path) -> None:
    _symlink(bad_folder / "bob" / "again.png", "../alice/001.png")  # the same file twice
    _symlink(bad_folder / "alice" / "nested" / "up", "..")  # a folder loop
    _symlink(bad_folder / "dave" / "alias", "../alice/nested/deep")  # a folder already scanned
    _symlink(bad_folder / "alice" / "later", "../dave")  # a folder scanned again later
    os.link(bad_folder / "alice" / "001.png", bad_folder / "dave" / "hard.png")

    default = scan_private_folder(bad_folder)
    assert _reasons(default)["bob/again.png"] == "symlink (not followed)"
    assert _reasons(default)["dave/hard.png"] == "duplicate: same file as alice/001.png (hard link or symlink)"

    folder = scan_private_folder(bad_folder, follow_symlinks=True, privacy_unit="image")
    reasons = _reasons(folder)
    assert reasons["carol/link_out.jpg"] == "symlink pointing outside the folder (not followed)"
    assert reasons["carol/loop.jpg"] == "broken symlink or symlink loop"
    assert reasons["alice/nested/up"] == "symlink to a folder already scanned (a loop or a second path)"
    assert reasons["dave/alias"] == reasons["alice/nested/up"]
    # each file votes once, from its real location
    assert reasons["bob/again.png"].startswith("duplicate: same file as alice/001.png")
    assert reasons["dave/hard.png"].startswith("duplicate: same file as alice/001.png")
    assert reasons["alice/later/photo"] == "duplicate: same file as dave/photo (hard link or symlink)"
    assert reasons["alice/later/hard.png"].startswith("duplicate: same file as alice/001.png")
    assert [im.relpath for im in folder.images] == KEPT
    # with folder units these links put one file in several units: refused (see below)
    with pytest.raises(SptiError, match="a file may belong to one privacy unit only"):
        scan_private_folder(bad_folder, follow_symlinks=True, privacy_unit="folder")


def _two_people(tmp_path: Path) -> Path:
    root = write_example_folder(tmp_path / "private", num_people=2, images_per_person=2, size=16)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "person_01/001.png",
        "person_01/002.png",
        "person_02/001.png",
        "person_02/002.png",
    ]
    return root


def test_folder_units_refuse_a_hard_link_across_units(tmp_path: Path) -> None:
    """Removing one person must remove all of their images: a file shared by two units cannot vote."""
    root = _two_people(tmp_path)
    os.link(root / "person_01" / "001.png", root / "person_02" / "shared.png")
    with pytest.raises(SptiError) as info:
        scan_private_folder(root, privacy_unit="folder")
    message = str(info.value)
    assert "\n" not in message
    assert f"{root / 'person_02' / 'shared.png'} is the same file as {root / 'person_01' / '001.png'}" in message
    assert message.endswith("a file may belong to one privacy unit only: copy it or remove one link")
    # under image units the link is simply the same image twice: kept once
    folder = scan_private_folder(root, privacy_unit="image")
    assert len(folder.images) == 4
    assert _reasons(folder)["person_02/shared.png"].startswith("duplicate: same file as person_01/001.png")


def test_folder_units_refuse_a_followed_symlink_across_units(tmp_path: Path) -> None:
    root = _two_people(tmp_path)
    _symlink(root / "person_02" / "alias.png", "../person_01/002.png")
    assert len(scan_private_folder(root, privacy_unit="folder").images) == 4  # not followed: no conflict
    with pytest.raises(SptiError, match=r"alias\.png is the same file as .*person_01/002\.png"):
        scan_private_folder(root, privacy_unit="folder", follow_symlinks=True)


def test_folder_units_keep_a_second_link_within_one_unit_once(tmp_path: Path) -> None:
    root = _two_people(tmp_path)
    os.link(root / "person_01" / "001.png", root / "person_01" / "again.png")
    _symlink(root / "person_02" / "same.png", "002.png")
    folder = scan_private_folder(root, privacy_unit="folder", follow_symlinks=True)
    assert [im.relpath for im in folder.images] == [
        "person_01/001.png",
        "person_01/002.png",
        "person_02/001.png",
        "person_02/002.png",
    ]
    assert folder.num_units == 2
    assert _reasons(folder) == {
        "person_01/again.png": "duplicate: same file as person_01/001.png (hard link or symlink)",
        "person_02/same.png": "duplicate: same file as person_02/002.png (hard link or symlink)",
    }


def test_special_files_are_skipped_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    root = tmp_path / "private"
    _save(_noise(8, 8), root / "ok.png")
    os.mkfifo(root / "pipe.jpg")
    folder = scan_private_folder(root)
    assert _reasons(folder) == {"pipe.jpg": "not a regular file (device, pipe or socket)"}


def test_extensions_are_lowercase_and_cover_the_common_formats() -> None:
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= IMAGE_EXTENSIONS
    assert ".txt" not in IMAGE_EXTENSIONS


def test_upper_case_extension_and_unsupported_heic(tmp_path: Path) -> None:
    root = tmp_path / "private"
    _save(_noise(8, 8), root / "IMG_0001.JPG", "JPEG")
    (root / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32)
    folder = scan_private_folder(root)
    assert [im.relpath for im in folder.images] == ["IMG_0001.JPG"]
    reason = _reasons(folder)["IMG_0002.HEIC"]
    assert reason.startswith("unsupported image format") or reason.startswith("truncated or corrupt")


# --------------------------------------------------------------------------------------------
# Errors that stop the run
# --------------------------------------------------------------------------------------------
def test_missing_folder_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(SptiError, match="does not exist"):
        scan_private_folder(tmp_path / "nope")
    a_file = tmp_path / "one.png"
    _save(_noise(4, 4), a_file)
    with pytest.raises(SptiError, match="is a file, not a folder"):
        scan_private_folder(a_file)


def test_no_valid_image_names_root_and_reasons(tmp_path: Path) -> None:
    root = tmp_path / "private"
    root.mkdir()
    with pytest.raises(SptiError, match=r"no valid image.*the folder is empty"):
        scan_private_folder(root)
    (root / "a.txt").write_text("x")
    (root / "b.txt").write_text("y")
    (root / "c.jpg").write_bytes(b"")
    with pytest.raises(SptiError) as info:
        scan_private_folder(root)
    message = str(info.value)
    assert "\n" not in message
    assert str(root.resolve()) in message
    assert "no valid image" in message
    assert "3 file(s) skipped (2 not an image, 1 empty file)" in message


def test_folder_units_refuse_images_at_the_root(tmp_path: Path) -> None:
    root = write_example_folder(tmp_path / "private", num_people=2, images_per_person=1, size=16)
    _save(_noise(8, 8), root / "stray.png")
    _save(_noise(8, 8), root / "stray2.png")
    assert scan_private_folder(root, privacy_unit="image").num_units == 4
    with pytest.raises(SptiError) as info:
        scan_private_folder(root, privacy_unit="folder")
    message = str(info.value)
    assert message.startswith("2 image(s) sit directly in")
    assert "move them into a sub-folder per person or use --privacy-unit image" in message


def test_bad_arguments(tmp_path: Path) -> None:
    root = write_example_folder(tmp_path / "private", num_people=1, images_per_person=1, size=16)
    with pytest.raises(SptiError, match="privacy unit"):
        scan_private_folder(root, privacy_unit="person")  # type: ignore[arg-type]
    with pytest.raises(SptiError, match="max_pixels"):
        scan_private_folder(root, max_pixels=0)


def test_output_location(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    check_output_location(private, tmp_path / "run")  # a sibling is fine
    check_output_location(private, tmp_path / "private-run")  # a shared name prefix is fine
    with pytest.raises(SptiError, match="inside the private folder"):
        check_output_location(private, private / "run")
    with pytest.raises(SptiError, match="inside the private folder"):
        check_output_location(private, private)
    with pytest.raises(SptiError, match="inside the output folder"):
        check_output_location(private, tmp_path)
    # a symlink that leads into the private folder is seen through
    _symlink(tmp_path / "innocent", private)
    with pytest.raises(SptiError, match="inside the private folder"):
        check_output_location(private, tmp_path / "innocent" / "run")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_sixteen_bit_gray_is_scaled_not_clipped(bad_folder: Path) -> None:
    arr = _pixels(load_image(bad_folder / "bob" / "gray16.png"))
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 128, 255, 1]
    assert (arr[..., 0] == arr[..., 2]).all()


def test_other_high_bit_depth_grays() -> None:
    from spti.data import _gray_to_uint8

    assert _gray_to_uint8(np.array([0, 32768, 65535]), "I").tolist() == [0, 128, 255]
    assert _gray_to_uint8(np.array([0.0, 0.5, 1.0]), "F").tolist() == [0, 128, 255]
    assert _gray_to_uint8(np.array([-10, 0, 10]), "I").tolist() == [0, 128, 255]
    assert _gray_to_uint8(np.array([np.nan, 1.0]), "F").tolist() == [0, 255]


def test_cmyk_becomes_rgb(bad_folder: Path) -> None:
    arr = _pixels(load_image(bad_folder / "bob" / "cmyk.jpg"))
    assert np.abs(arr - np.array(RED)).max() <= 12


def test_transparency_is_composited_on_white(bad_folder: Path) -> None:
    pal = _pixels(load_image(bad_folder / "bob" / "palette.png"))
    assert pal[0, 0].tolist() == list(WHITE)
    assert pal[0, 3].tolist() == list(GREEN)
    rgba = _pixels(load_image(bad_folder / "bob" / "rgba.png"))
    assert rgba[0, 0].tolist() == list(WHITE)
    assert np.abs(rgba[0, 1] - np.array([255, 127, 127])).max() <= 1


def test_animation_uses_the_first_frame(bad_folder: Path) -> None:
    arr = _pixels(load_image(bad_folder / "bob" / "anim.gif"))
    assert arr.shape == (8, 8, 3)
    assert np.abs(arr - np.array(RED)).max() <= 2


def test_exif_orientation_is_applied(bad_folder: Path) -> None:
    img = load_image(bad_folder / "alice" / "rotated.jpg")
    assert img.size == (20, 40)  # stored 40×20, shown rotated by 90°
    arr = _pixels(img)
    # stored left (red) half is shown on top, right (blue) half at the bottom
    assert np.abs(arr[5, 10] - np.array(RED)).max() <= 40
    assert np.abs(arr[35, 10] - np.array(BLUE)).max() <= 40


def test_resize_and_centre_crop(bad_folder: Path) -> None:
    img = load_image(bad_folder / "alice" / "rotated.jpg", size=16)
    assert img.size == (16, 16)
    arr = _pixels(img)
    assert arr[0, 8, 0] > arr[0, 8, 2]  # the top is still red
    assert arr[15, 8, 2] > arr[15, 8, 0]  # the bottom is still blue
    assert load_image(bad_folder / "bob" / "gray16.png", size=3).size == (3, 3)  # upscales tiny images


def test_load_errors_name_the_file(bad_folder: Path) -> None:
    for name, reason in [
        ("truncated.jpg", "truncated or corrupt image"),
        ("fake.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
    ]:
        path = bad_folder / "carol" / name
        with pytest.raises(SptiError, match=reason) as info:
            load_image(path)
        assert str(path) in str(info.value)
    with pytest.raises(SptiError, match="decompression bomb: 384 pixels > limit 100"):
        load_image(bad_folder / "alice" / "001.png", max_pixels=100)


# --------------------------------------------------------------------------------------------
# The generated example folder
# --------------------------------------------------------------------------------------------
def test_example_folder_is_deterministic_and_scans_cleanly(tmp_path: Path) -> None:
    a = write_example_folder(tmp_path / "a", num_people=3, images_per_person=2, size=32, seed=7)
    b = write_example_folder(tmp_path / "b", num_people=3, images_per_person=2, size=32, seed=7)
    c = write_example_folder(tmp_path / "c", num_people=3, images_per_person=2, size=32, seed=8)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    assert files == [f"person_0{p}/00{i}.png" for p in (1, 2, 3) for i in (1, 2)]
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert any(not np.array_equal(np.asarray(Image.open(a / r)), np.asarray(Image.open(c / r))) for r in files)
    folder = scan_private_folder(a, privacy_unit="folder")
    assert folder.skipped == []
    assert folder.num_units == 3
    assert {(im.width, im.height) for im in folder.images} == {(32, 32)}


def test_shipped_example_folder_matches_the_generator(tmp_path: Path) -> None:
    fresh = write_example_folder(tmp_path / "faces")  # the defaults make examples/private_faces
    shipped = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file())
    assert len(shipped) == 24
    assert sum((EXAMPLES / rel).stat().st_size for rel in shipped) < 200_000
    for rel in shipped:  # compare pixels, not bytes: PNG encoders differ between zlib builds
        assert np.array_equal(np.asarray(Image.open(EXAMPLES / rel)), np.asarray(Image.open(fresh / rel))), rel
    folder = scan_private_folder(EXAMPLES, privacy_unit="folder")
    assert (len(folder.images), folder.num_units, folder.skipped) == (24, 6, [])
