"""Local image backends on tiny random models, loaded through the same paths as real model ids.

Every model is built once per module into a temp dir (spti.testing.tiny_vision) and loaded with
``from_pretrained`` or the weights-file loaders; the images are noise, the plumbing is real.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("pywt")

from PIL import Image

from spti.backends import base
from spti.backends.local import features, images, upscale
from spti.errors import ModelNotFoundError, SptiError
from spti.testing import tiny_vision

SIZE = 32

pytestmark = [
    # raised inside diffusers/huggingface_hub internals, not by our code
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning"),
]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def noise_image(seed: int, width: int = SIZE, height: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- tiny models, built once ------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are all small ops: one thread is as fast, and immune to a busy second core
    (OpenMP workers waiting on a descheduled sibling slow small ops down many times over)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_vision")


@pytest.fixture(scope="module")
def sd_path(model_dir: Path) -> Path:
    return tiny_vision.build_tiny_sd_pipeline(model_dir / "sd")


@pytest.fixture(scope="module")
def sd_generator(sd_path: Path) -> images.DiffusersImageGenerator:
    return images.DiffusersImageGenerator(str(sd_path), device="cpu", batch_size=3, steps=1)


@pytest.fixture(scope="module")
def esrgan_files(model_dir: Path) -> tiny_vision.WeightFiles:
    return tiny_vision.write_tiny_realesrgan_weights(model_dir / "esrgan", num_blocks=1)


@pytest.fixture(scope="module")
def inception_files(model_dir: Path) -> tuple[Path, Path]:
    return (
        tiny_vision.write_tiny_inception_weights(model_dir / "inception"),
        tiny_vision.write_tiny_inception_weights(model_dir / "inception_pth" / "pt_inception.pth"),
    )


@pytest.fixture(scope="module")
def inception(inception_files: tuple[Path, Path]) -> features.InceptionV3Embedder:
    return features.InceptionV3Embedder(inception_files[0], device="cpu", batch_size=2)


# -- text-to-image and variation --------------------------------------------------------------
class TestDiffusersImageGenerator:
    def test_satisfies_protocol_and_makes_rgb_images_of_the_requested_size(self, sd_generator) -> None:
        assert isinstance(sd_generator, base.ImageGenerator)
        out = sd_generator.generate(["a bedroom", "a face"], seeds=[1, 2], width=SIZE, height=SIZE)
        assert [(im.size, im.mode) for im in out] == [((SIZE, SIZE), "RGB")] * 2
        odd = sd_generator.generate(["a room"], seeds=[3], width=30, height=20)
        assert odd[0].size == (30, 20)
        assert sd_generator.generate([]) == []

    def test_same_seed_same_image_and_different_seeds_differ(self, sd_generator) -> None:
        first = sd_generator.generate(["a room", "a room"], seeds=[7, 8], width=SIZE, height=SIZE)
        again = sd_generator.generate(["a room"], seeds=[7], width=SIZE, height=SIZE)
        assert np.array_equal(pixels(first[0]), pixels(again[0]))
        assert np.abs(pixels(first[0]) - pixels(first[1])).mean() > 5

    def test_an_image_does_not_depend_on_its_batch_mates(self, sd_generator) -> None:
        prompts, seeds = ["a bed", "a window", "a lamp", "a wall"], [11, 12, 13, 14]
        batched_out = sd_generator.generate(prompts, seeds=seeds, width=SIZE, height=SIZE)  # batches of 3 + 1
        alone = [
            sd_generator.generate([p], seeds=[s], width=SIZE, height=SIZE)[0]
            for p, s in zip(prompts, seeds, strict=True)
        ]
        for a, b in zip(batched_out, alone, strict=True):
            # equal up to float kernel differences between batch sizes (at most a level or two)
            assert np.abs(pixels(a) - pixels(b)).max() <= 2

    def test_seed_count_must_match(self, sd_generator) -> None:
        with pytest.raises(ValueError, match="seeds"):
            sd_generator.generate(["a", "b"], seeds=[1], width=SIZE, height=SIZE)

    def test_vary_keeps_each_input_size_and_is_seeded(self, sd_generator) -> None:
        inputs = [noise_image(0), noise_image(1, 40, 24), noise_image(2)]
        out = sd_generator.vary(inputs, ["a", "b", "c"], strength=0.5, seeds=[1, 2, 3], steps=1)
        assert [im.size for im in out] == [im.size for im in inputs]
        assert all(im.mode == "RGB" for im in out)
        again = sd_generator.vary(inputs[2:], ["c"], strength=0.5, seeds=[3], steps=1)
        assert np.abs(pixels(out[2]) - pixels(again[0])).max() <= 2
        with pytest.raises(ValueError, match="strength"):
            sd_generator.vary(inputs[:1], ["a"], strength=0.0)

    def test_img2img_steps_always_run_at_least_one_step(self) -> None:
        assert images.img2img_steps(1, 0.5) == 2
        assert images.img2img_steps(4, 0.5) == 4
        assert images.img2img_steps(1, 0.3) == 4
        assert all(int(images.img2img_steps(s, x) * x) >= 1 for s in (1, 2, 4) for x in (0.05, 0.1, 0.33, 0.7, 1.0))

    def test_family_defaults(self) -> None:
        assert images.family_defaults("stabilityai/sdxl-turbo") == (4, 0.0)
        assert images.family_defaults("stabilityai/sd-turbo") == (1, 0.0)
        assert images.family_defaults("stabilityai/stable-diffusion-xl-base-1.0") == (30, 5.0)
        assert images.family_defaults("/models/some-sd", "StableDiffusionXLPipeline")[1] == 5.0
        assert images.family_defaults("/models/some-sd", "StableDiffusionPipeline") == images.FALLBACK_DEFAULTS

    def test_optional_tiny_autoencoder_and_channels_last(self, model_dir: Path, sd_path: Path) -> None:
        autoencoder = tiny_vision.build_tiny_autoencoder(model_dir / "taesd")
        gen = images.DiffusersImageGenerator(
            str(sd_path), device="cpu", steps=1, tiny_autoencoder=autoencoder, channels_last=True
        )
        assert type(gen.pipe.vae).__name__ == "AutoencoderTiny"
        out = gen.generate(["a bedroom"], seeds=[1], width=SIZE, height=SIZE)
        assert out[0].size == (SIZE, SIZE)
        assert gen.vary(out, ["a bedroom"], seeds=[2])[0].size == (SIZE, SIZE)

    def test_tiny_sdxl_pipeline_through_the_auto_pipelines(self, model_dir: Path) -> None:
        path = tiny_vision.build_tiny_sdxl_pipeline(model_dir / "sdxl")
        gen = images.DiffusersImageGenerator(str(path), device="cpu", steps=1)
        assert type(gen.pipe).__name__ == "StableDiffusionXLPipeline"
        out = gen.generate(["a bedroom"], seeds=[5], width=SIZE, height=SIZE)
        assert out[0].size == (SIZE, SIZE)
        varied = gen.vary(out, ["a bedroom at night"], strength=0.6, seeds=[6])
        assert varied[0].size == (SIZE, SIZE)
        assert type(gen.img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
        assert gen.img2img.unet is gen.pipe.unet  # weights are shared, not copied


# -- upscalers ---------------------------------------------------------------------------------
class TestUpscalers:
    @pytest.mark.parametrize("scale", [2, 4])
    def test_lanczos(self, scale: int) -> None:
        up = upscale.LanczosUpscaler(scale=scale)
        assert isinstance(up, base.Upscaler)
        out = up.upscale([noise_image(0, 20, 12), noise_image(1).convert("L")])
        assert [im.size for im in out] == [(20 * scale, 12 * scale), (SIZE * scale, SIZE * scale)]
        assert all(im.mode == "RGB" for im in out)
        with pytest.raises(SptiError):
            upscale.LanczosUpscaler(scale=3)

    def test_realesrgan_both_formats_load_and_agree(self, esrgan_files) -> None:
        ims = [noise_image(0, 20, 12), noise_image(1)]
        outs = []
        for path in esrgan_files:
            up = upscale.RealESRGANUpscaler(path, device="cpu")
            assert isinstance(up, base.Upscaler)
            assert up.scale == up.native_scale == 4
            outs.append(up.upscale(ims))
        assert [im.size for im in outs[0]] == [(80, 48), (128, 128)]
        for a, b in zip(*outs, strict=True):
            assert np.array_equal(pixels(a), pixels(b))

    def test_realesrgan_x2_weights_and_x2_from_x4_weights(self, model_dir: Path, esrgan_files) -> None:
        x2 = tiny_vision.write_tiny_realesrgan_weights(model_dir / "esrgan_x2", num_blocks=2, scale=2)
        up = upscale.RealESRGANUpscaler(x2.pth, device="cpu")
        assert up.native_scale == up.scale == 2
        assert up.upscale([noise_image(0, 21, 13)])[0].size == (42, 26)  # odd sizes pad for the unshuffle
        down = upscale.RealESRGANUpscaler(esrgan_files.safetensors, scale=2, device="cpu")
        assert down.native_scale == 4
        assert down.upscale([noise_image(1, 20, 12)])[0].size == (40, 24)

    @pytest.mark.parametrize("native", [4, 2])
    def test_realesrgan_tiled_equals_untiled(self, model_dir: Path, native: int, monkeypatch) -> None:
        files = tiny_vision.write_tiny_realesrgan_weights(model_dir / f"esrgan_tile{native}", scale=native)
        image = noise_image(3, 45, 38)
        whole = upscale.RealESRGANUpscaler(files.safetensors, device="cpu", tile=None).upscale([image])[0]
        tiled_up = upscale.RealESRGANUpscaler(files.safetensors, device="cpu", tile=16, tile_overlap=24)
        calls = []
        run = tiled_up._run
        monkeypatch.setattr(tiled_up, "_run", lambda x: calls.append(x.shape) or run(x))
        tiled = tiled_up.upscale([image])[0]
        assert len(calls) == 9  # 3 × 3 tiles were really used
        assert tiled.size == whole.size == (45 * native, 38 * native)
        # the 1-block net sees about 20 px, less than the overlap: the seams are invisible
        assert np.abs(pixels(tiled) - pixels(whole)).max() <= 1

    def test_realesrgan_tiny_overlap_is_still_close(self, esrgan_files) -> None:
        image = noise_image(4, 40, 40)
        whole = upscale.RealESRGANUpscaler(esrgan_files.pth, device="cpu", tile=None).upscale([image])[0]
        tiled = upscale.RealESRGANUpscaler(esrgan_files.pth, device="cpu", tile=16, tile_overlap=4).upscale([image])[0]
        assert np.abs(pixels(tiled) - pixels(whole)).mean() < 8

    def test_realesrgan_bad_files_give_clear_errors(self, tmp_path: Path) -> None:
        with pytest.raises(SptiError, match=r"does not exist.*Real-ESRGAN/releases"):
            upscale.RealESRGANUpscaler(tmp_path / "missing.pth")
        junk = tmp_path / "junk.safetensors"
        junk.write_bytes(b"not a safetensors file")
        with pytest.raises(SptiError, match="safetensors"):
            upscale.RealESRGANUpscaler(junk)
        import torch

        other = tmp_path / "other.pth"
        torch.save({"params": {"body.0.weight": torch.zeros(3, 3, 3, 3)}}, other)
        with pytest.raises(SptiError, match="not an RRDBNet"):
            upscale.RealESRGANUpscaler(other)

    def test_realesrgan_reads_the_params_key_too(self, tmp_path: Path, esrgan_files) -> None:
        import torch

        state = torch.load(esrgan_files.pth, weights_only=True)["params_ema"]
        path = tmp_path / "params.pth"
        torch.save({"params": state}, path)
        assert upscale.RealESRGANUpscaler(path, device="cpu").native_scale == 4

    def test_sd_x4_upscaler_tiles_and_sizes(self, model_dir: Path) -> None:
        path = tiny_vision.build_tiny_x4_upscaler(model_dir / "x4")
        up = upscale.DiffusersX4Upscaler(str(path), device="cpu", steps=1, tile=16, tile_overlap=4, batch_size=4)
        assert isinstance(up, base.Upscaler) and up.scale == 4
        ims = [noise_image(0), noise_image(1, 22, 14)]
        out = up.upscale(ims, prompts=["a bedroom", "a face"])
        assert [im.size for im in out] == [(128, 128), (88, 56)]
        assert all(im.mode == "RGB" for im in out)
        alone = up.upscale(ims[1:], prompts=["a face"])[0]
        assert np.abs(pixels(alone) - pixels(out[1])).max() <= 2  # independent of batch-mates and position
        half = upscale.DiffusersX4Upscaler(str(path), device="cpu", steps=1, scale=2, tile=None)
        assert half.upscale([ims[1]])[0].size == (44, 28)
        with pytest.raises(ValueError, match="prompts"):
            up.upscale(ims, prompts=["only one"])

    def test_tile_helpers_cover_the_axis(self) -> None:
        for length, tile, overlap in ((100, 32, 8), (32, 32, 8), (33, 16, 4), (5, 16, 4)):
            starts = upscale.tile_starts(length, tile, overlap)
            covered = np.zeros(length, bool)
            for s in starts:
                covered[s : s + tile] = True
            assert covered.all() and starts[-1] + min(tile, length) == length
            windows = upscale.tile_windows(length, tile, overlap)
            assert windows[0][0] == 0 and windows[-1][1] == length
            assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))


# -- image embedders ---------------------------------------------------------------------------
class TestWaveletEmbedder:
    def test_shape_dtype_determinism(self) -> None:
        emb = features.WaveletEmbedder()
        assert isinstance(emb, base.ImageEmbedder)
        ims = [noise_image(0, 50, 40), noise_image(1, 64, 64).convert("RGBA")]
        a, b = emb.embed(ims), emb.embed(ims)
        assert a.shape == (2, 192) == (2, emb.dim) and a.dtype == np.float32
        assert np.array_equal(a, b)
        assert emb.embed([]).shape == (0, 192)
        gray = features.WaveletEmbedder(color="gray", size=32, level=2, wavelet="db2")
        assert gray.embed(ims).shape == (2, 64)

    def test_weight_free_haar_band_is_the_block_mean(self) -> None:
        emb = features.WaveletEmbedder(size=64, wavelet="haar", level=3)
        image = noise_image(5, 64, 64)
        blocks = np.asarray(image, np.float64).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3)) / 255.0
        expected = blocks.transpose(2, 0, 1).reshape(-1)
        assert np.allclose(emb.embed([image])[0], expected, atol=1e-5)

    @pytest.mark.parametrize("wavelet", ["haar", "db2"])
    def test_ignores_fine_detail_but_sees_coarse_changes(self, wavelet: str) -> None:
        emb = features.WaveletEmbedder(size=64, wavelet=wavelet, level=3)
        base_img = np.full((64, 64, 3), 128.0)
        checker = (np.indices((64, 64)).sum(axis=0) % 2 * 2 - 1)[..., None] * 40.0  # pixel-scale texture
        coarse = np.zeros_like(base_img)
        coarse[:32, :32] = 20.0  # a brighter quadrant: structure
        variants = [base_img, base_img + checker, base_img + coarse]
        feats = emb.embed([Image.fromarray(v.astype(np.uint8)) for v in variants])
        fine_dist = np.linalg.norm(feats[1] - feats[0])
        coarse_dist = np.linalg.norm(feats[2] - feats[0])
        # in pixel space the texture is the larger change; keeping detail bands would say the same
        assert np.linalg.norm(checker) > 2 * np.linalg.norm(coarse)
        assert fine_dist < 0.05 * coarse_dist

    def test_standardize_and_bad_settings(self) -> None:
        emb = features.WaveletEmbedder(standardize=True)
        feats = emb.embed([noise_image(0), noise_image(1)])
        assert np.allclose(feats.mean(axis=1), 0, atol=1e-5) and np.allclose(feats.std(axis=1), 1, atol=1e-3)
        with pytest.raises(SptiError, match="level"):
            features.WaveletEmbedder(size=16, level=6)
        with pytest.raises(SptiError, match="wavelet"):
            features.WaveletEmbedder(wavelet="nope")


class TestModelEmbedders:
    def test_clip_from_a_full_clip_checkpoint(self, model_dir: Path) -> None:
        path = tiny_vision.build_tiny_clip_vision(model_dir / "clip")
        emb = features.CLIPImageEmbedder(str(path), device="cpu", batch_size=2)
        assert isinstance(emb, base.ImageEmbedder)
        ims = [noise_image(0, 50, 40), noise_image(1), noise_image(2).convert("L")]
        feats = emb.embed(ims)
        assert feats.shape == (3, 12) == (3, emb.dim) and feats.dtype == np.float32
        assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
        assert np.allclose(emb.embed(ims[1:2])[0], feats[1], atol=1e-5)
        assert emb.embed([]).shape == (0, 12)

    def test_dinov2(self, model_dir: Path) -> None:
        path = tiny_vision.build_tiny_dinov2(model_dir / "dinov2")
        emb = features.DINOv2Embedder(str(path), device="cpu", batch_size=2)
        feats = emb.embed([noise_image(0, 50, 40), noise_image(1), noise_image(2)])
        assert feats.shape == (3, 16) and feats.dtype == np.float32 and np.isfinite(feats).all()
        assert np.allclose(emb.embed([noise_image(1)])[0], feats[1], atol=1e-5)

    def test_inception_gives_2048_d_pool_features(self, inception) -> None:
        assert isinstance(inception, base.ImageEmbedder)
        ims = [noise_image(0, 64, 48), noise_image(1), noise_image(2)]
        feats = inception.embed(ims)
        assert feats.shape == (3, 2048) and feats.dtype == np.float32
        assert np.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0
        assert np.allclose(inception.embed(ims[2:])[0], feats[2], atol=1e-4)

    def test_inception_pth_and_safetensors_agree(self, inception, inception_files) -> None:
        other = features.InceptionV3Embedder(inception_files[1], device="cpu")
        image = [noise_image(7)]
        assert np.allclose(other.embed(image), inception.embed(image), atol=1e-5)

    def test_inception_without_weights_says_where_to_get_them(self, tmp_path: Path) -> None:
        for missing in (None, "", tmp_path / "pt_inception.pth"):
            with pytest.raises(SptiError, match="pytorch-fid/releases") as info:
                features.InceptionV3Embedder(missing)
            assert "inception:" in str(info.value)

    def test_inception_rejects_other_state_dicts(self, tmp_path: Path, esrgan_files) -> None:
        with pytest.raises(SptiError, match="not an FID Inception-v3"):
            features.InceptionV3Embedder(esrgan_files.safetensors)


# -- missing models ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load",
    [
        images.DiffusersImageGenerator,
        upscale.DiffusersX4Upscaler,
        features.CLIPImageEmbedder,
        features.DINOv2Embedder,
    ],
)
@pytest.mark.parametrize("model", ["spti-tests-nobody/no-such-model", "/nonexistent/spti/model"])
def test_missing_models_raise_model_not_found(load, model: str, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError):
        load(model, device="cpu")
