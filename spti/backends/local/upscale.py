"""Public super-resolution of released images: Lanczos, Real-ESRGAN, and the Stable Diffusion ×4 upscaler.

Upscaling happens after the DP release and uses only public models, so it costs no privacy.

Why we ship our own small RRDBNet instead of ``spandrel``, ``realesrgan`` or ``basicsr``: all three
import ``torchvision``, and PyPI's torchvision wheels are built against one exact torch version; next
to our torch pin they fail at import time and cannot be installed. The network itself is small and
well described (ESRGAN, Wang et al. 2018; Real-ESRGAN, Wang et al. 2021): a first convolution, a
trunk of Residual-in-Residual Dense Blocks, two nearest-neighbour ×2 upsampling stages, and two
output convolutions. :class:`RRDBNet` is written from that description with the parameter names of
the published checkpoints, so ``RealESRGAN_x4plus.pth`` / ``RealESRGAN_x2plus.pth`` load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.backends.local._common import (
    batched,
    diffusers_dtype_kwargs,
    load_pretrained,
    load_weights_file,
    quiet_hf,
    require,
    resolve_device,
    resolve_dtype,
)
from spti.errors import SptiError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

REAL_ESRGAN_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases (RealESRGAN_x4plus.pth, RealESRGAN_x2plus.pth)"


def _check_scale(scale: int) -> int:
    if scale not in (2, 4):
        raise SptiError(f"upscale factor {scale}: use 2 or 4")
    return scale


def _to_rgb(image: Image) -> Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _lanczos(image: Image, width: int, height: int) -> Image:
    from PIL import Image as PILImage

    if image.size == (width, height):
        return image
    return image.resize((width, height), PILImage.Resampling.LANCZOS)


class LanczosUpscaler:
    """Lanczos resampling (PIL): the no-model baseline, fast, deterministic, adds no detail."""

    def __init__(self, scale: int = 4) -> None:
        self.scale = _check_scale(scale)

    def upscale(self, images: Sequence[Image], *, prompts: Sequence[str] | None = None) -> list[Image]:
        return [_lanczos(_to_rgb(im), im.width * self.scale, im.height * self.scale) for im in images]


# --------------------------------------------------------------------------------------------
# RRDBNet (ESRGAN generator), our own implementation with the published parameter names.
# --------------------------------------------------------------------------------------------
def _build_rrdbnet_classes() -> tuple[type, type, type]:
    """Define the torch modules lazily so that importing this file does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as nnf

    class ResidualDenseBlock(nn.Module):
        """Five 3×3 convolutions, each seeing the block input and every earlier output (dense links).

        The residual is scaled by 0.2 before it is added back: that damping is what lets a deep
        trunk train without batch normalisation, and the published weights assume it.
        """

        def __init__(self, num_feat: int, num_grow_ch: int) -> None:
            super().__init__()
            for i in range(4):
                setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch, 3, 1, 1))
            self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = [x]
            for i in range(4):
                conv = getattr(self, f"conv{i + 1}")
                features.append(nnf.leaky_relu(conv(torch.cat(features, 1)), 0.2))
            return x + 0.2 * self.conv5(torch.cat(features, 1))

    class RRDB(nn.Module):
        """Three dense blocks in sequence inside one more scaled residual ("residual in residual")."""

        def __init__(self, num_feat: int, num_grow_ch: int) -> None:
            super().__init__()
            self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
            self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
            self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))

    class RRDBNet(nn.Module):
        """ESRGAN/Real-ESRGAN generator; output is always 4× the (pixel-unshuffled) trunk resolution.

        ``scale`` 2 (or 1) folds 2×2 (or 4×4) pixel blocks into channels first (pixel-unshuffle), so
        the trunk runs at half (quarter) resolution and the fixed ×4 head lands at ×2 (×1). That is
        how the published x2 checkpoint works; its first convolution takes 12 channels.
        """

        def __init__(
            self,
            *,
            num_in_ch: int = 3,
            num_out_ch: int = 3,
            scale: int = 4,
            num_feat: int = 64,
            num_block: int = 23,
            num_grow_ch: int = 32,
        ) -> None:
            super().__init__()
            if scale not in (1, 2, 4):
                raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
            self.scale = scale
            self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
            self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
            self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
            self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.unshuffle > 1:
                x = nnf.pixel_unshuffle(x, self.unshuffle)
            feat = self.conv_first(x)
            feat = feat + self.conv_body(self.body(feat))
            for conv in (self.conv_up1, self.conv_up2):
                feat = nnf.leaky_relu(conv(nnf.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            return self.conv_last(nnf.leaky_relu(self.conv_hr(feat), 0.2))

    return ResidualDenseBlock, RRDB, RRDBNet


_RRDB_CLASSES: tuple[type, type, type] | None = None


def rrdbnet_class() -> type:
    """The :class:`RRDBNet` ``nn.Module`` class (built on first use so torch loads lazily)."""
    global _RRDB_CLASSES
    if _RRDB_CLASSES is None:
        _RRDB_CLASSES = _build_rrdbnet_classes()
    return _RRDB_CLASSES[2]


def build_rrdbnet(**kwargs: Any) -> torch.nn.Module:
    """An RRDBNet with the given hyper-parameters (``num_feat``, ``num_block``, ``num_grow_ch``, ``scale``)."""
    return rrdbnet_class()(**kwargs)


def _unwrap_esrgan_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Published checkpoints wrap the weights as ``{'params_ema': …}`` (or ``'params'``); EMA wins."""
    for key in ("params_ema", "params"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def rrdbnet_from_state_dict(state: Mapping[str, Any], source: str = "weights") -> torch.nn.Module:
    """Infer the RRDBNet hyper-parameters from tensor shapes and load the weights strictly."""
    state = _unwrap_esrgan_state(state)
    if "conv_first.weight" not in state or "body.0.rdb1.conv1.weight" not in state:
        hint = ""
        if any(k.startswith("body.") and "rdb" not in k for k in state):
            hint = " (it looks like an SRVGGNet 'compact' model such as realesr-general-x4v3, which is not supported)"
        raise SptiError(
            f"{source} is not an RRDBNet (Real-ESRGAN x4plus/x2plus) state dict{hint}; get RealESRGAN_x4plus.pth "
            f"from {REAL_ESRGAN_RELEASES}"
        )
    first = state["conv_first.weight"]
    num_feat, in_ch = int(first.shape[0]), int(first.shape[1])
    out_ch = int(state["conv_last.weight"].shape[0])
    scale = {out_ch: 4, 4 * out_ch: 2, 16 * out_ch: 1}.get(in_ch)
    if scale is None:
        raise SptiError(f"{source}: conv_first takes {in_ch} channels, which matches no Real-ESRGAN scale")
    num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    num_grow_ch = int(state["body.0.rdb1.conv1.weight"].shape[0])
    model = build_rrdbnet(
        num_in_ch=out_ch,
        num_out_ch=out_ch,
        scale=scale,
        num_feat=num_feat,
        num_block=num_block,
        num_grow_ch=num_grow_ch,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SptiError(f"{source} does not match the RRDBNet layout: {str(exc).splitlines()[0][:300]}") from exc
    return model.eval()


def tile_windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split ``[0, length)`` into cores of at most ``tile`` and windows extended by ``overlap``.

    Returns ``(core_start, core_end, window_start, window_end)``; the cores partition the axis, the
    windows are the cores padded by ``overlap`` on each side and clipped to the image.
    """
    count = max(1, math.ceil(length / tile))
    out = []
    for i in range(count):
        start, end = i * tile, min(length, (i + 1) * tile)
        out.append((start, end, max(0, start - overlap), min(length, end + overlap)))
    return out


class RealESRGANUpscaler:
    """Real-ESRGAN (RRDBNet) super-resolution from a local weights file; ×4 or ×2.

    ``weights`` is the published ``RealESRGAN_x4plus.pth`` (or ``_x2plus``; ``.pth`` or a
    ``.safetensors`` conversion). The native scale is read from the weights; when ``scale`` differs
    (e.g. ×2 from the x4plus weights) the network output is Lanczos-resized to the requested size.

    Large images are processed in tiles of ``tile`` input pixels, each computed from a window
    ``tile_overlap`` pixels wider on every side and cropped back, so GPU memory stays bounded.
    The network's receptive field is finite: once ``tile_overlap`` exceeds it (about 20 px for a
    1-block net; the 23-block published net reaches further, where the remaining difference is
    invisible) the tiled result equals the untiled one.
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        scale: int | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        tile: int | None = 512,
        tile_overlap: int = 32,
        batch_size: int = 4,
    ) -> None:
        require("torch")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        state = load_weights_file(weights, "Real-ESRGAN", REAL_ESRGAN_RELEASES)
        self.model = rrdbnet_from_state_dict(state, source=f"Real-ESRGAN weights '{weights}'")
        self.model.to(device=self.device, dtype=self.dtype)
        self.native_scale: int = self.model.scale
        self.scale = _check_scale(scale if scale is not None else self.native_scale)
        if tile is not None and tile < 16:
            raise SptiError(f"Real-ESRGAN tile size {tile} is too small; use >= 16 or None (no tiling)")
        self.tile = tile
        self.tile_overlap = max(0, int(tile_overlap))
        self.batch_size = batch_size

    def _to_tensor(self, images: Sequence[Image]) -> torch.Tensor:
        import torch

        arrays = np.stack([np.asarray(_to_rgb(im), dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Network on a CPU float32 batch; pads odd sizes for the pixel-unshuffle and crops back."""
        import torch
        from torch.nn import functional as nnf

        h, w = x.shape[-2:]
        multiple = self.model.unshuffle
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = nnf.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        with torch.inference_mode():
            y = self.model(x.to(self.device, self.dtype)).float().clamp_(0, 1).cpu()
        s = self.native_scale
        return y[..., : h * s, : w * s]

    def _upscale_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """One image (1×3×H×W), tiled when larger than ``tile``."""
        import torch

        h, w = x.shape[-2:]
        if self.tile is None or (h <= self.tile and w <= self.tile):
            return self._run(x)
        s = self.native_scale
        out = torch.empty((1, 3, h * s, w * s), dtype=torch.float32)
        m = self.model.unshuffle  # windows start on the pixel-unshuffle grid, as the whole image does
        for ys, ye, wys, wye in tile_windows(h, self.tile, self.tile_overlap):
            for xs, xe, wxs, wxe in tile_windows(w, self.tile, self.tile_overlap):
                wys, wxs = wys - wys % m, wxs - wxs % m
                y = self._run(x[..., wys:wye, wxs:wxe])
                oy, ox = (ys - wys) * s, (xs - wxs) * s
                out[..., ys * s : ye * s, xs * s : xe * s] = y[..., oy : oy + (ye - ys) * s, ox : ox + (xe - xs) * s]
        return out

    def _groups(self, images: Sequence[Image]) -> Iterator[list[int]]:
        """Indices of equal-size images that fit in one tile, in batches; big images alone."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        for (w, h), idx in by_size.items():
            fits = self.tile is None or (h <= self.tile and w <= self.tile)
            yield from (list(b) for b in batched(idx, self.batch_size if fits else 1))

    def upscale(self, images: Sequence[Image], *, prompts: Sequence[str] | None = None) -> list[Image]:
        from PIL import Image as PILImage

        out: list[Image | None] = [None] * len(images)
        for idx in self._groups(images):
            x = self._to_tensor([images[i] for i in idx])
            y = self._run(x) if len(idx) > 1 else self._upscale_tensor(x)
            arrays = (y.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
            for j, i in enumerate(idx):
                result = PILImage.fromarray(arrays[j])
                w, h = images[i].size
                out[i] = _lanczos(result, w * self.scale, h * self.scale)
        return [im for im in out if im is not None]


# --------------------------------------------------------------------------------------------
# Stable Diffusion ×4 upscaler
# --------------------------------------------------------------------------------------------
def _feather(length: int, before: int, after: int) -> np.ndarray:
    """Blend weights along one axis: linear ramps over the overlaps with neighbours, 1 elsewhere (never 0)."""
    weight = np.ones(length, dtype=np.float32)
    if before > 0:
        weight[:before] = np.arange(1, before + 1, dtype=np.float32) / (before + 1)
    if after > 0:
        weight[length - after :] = np.minimum(weight[length - after :], np.arange(after, 0, -1) / (after + 1))
    return weight


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles of ``tile`` px covering ``length``, neighbours sharing at least ``overlap`` px."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _overlaps(starts: Sequence[int], tile: int, i: int) -> tuple[int, int]:
    """Pixels tile ``i`` shares with the previous and the next tile along one axis."""
    before = starts[i - 1] + tile - starts[i] if i > 0 else 0
    after = starts[i] + tile - starts[i + 1] if i + 1 < len(starts) else 0
    return before, after


class DiffusersX4Upscaler:
    """``StableDiffusionUpscalePipeline`` (stabilityai/stable-diffusion-x4-upscaler), guided by the prompts.

    The released description of each image is its prompt, so the upscaler adds detail that agrees
    with the text. Images larger than ``tile`` are upscaled in overlapping equal tiles and blended
    with linear ramps: the pipeline's attention cost grows with the square of the pixel count, so a
    whole 512² input would be very slow and memory-hungry. Crops of equal size (tiles, or whole
    small images) are batched together. Every crop gets its own generator, seeded from ``seed``,
    the prompt, the crop's pixels and its tile index, so a result never depends on its batch-mates
    or on its position in the call. ``scale=2`` runs the ×4 model and Lanczos-downsamples by 2.
    ``steps`` defaults to 20 rather than the pipeline's 75, for speed; raise it for quality.
    The checkpoint ships no safety checker and none is loaded.
    """

    def __init__(
        self,
        model: str = "stabilityai/stable-diffusion-x4-upscaler",
        *,
        scale: int = 4,
        device: str | None = "auto",
        dtype: str | None = "auto",
        steps: int = 20,
        guidance: float = 7.5,
        noise_level: int = 20,
        negative_prompt: str | None = None,
        tile: int | None = 256,
        tile_overlap: int = 32,
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        with quiet_hf():  # importing the pipeline makes transformers advise installing torchvision: don't
            pipeline_class = require("diffusers").StableDiffusionUpscalePipeline
        self.scale = _check_scale(scale)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with quiet_hf(logs=False):
            self.pipe = load_pretrained(
                pipeline_class.from_pretrained, model, "x4 upscaler model", **diffusers_dtype_kwargs(self.dtype)
            )
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.noise_level = steps, guidance, noise_level
        self.negative_prompt = negative_prompt
        self.tile_overlap = max(0, int(tile_overlap))
        self.batch_size = batch_size
        self.seed = seed
        self.model_scale: int = int(self.pipe.vae_scale_factor)
        unet_levels = len(self.pipe.unet.config.block_out_channels) - 1
        # the VAE processor floors sizes to its factor and the UNet halves the latents per level
        self._multiple = math.lcm(2**unet_levels, self.model_scale)
        self.tile = None if tile is None else max(self._multiple, tile - tile % self._multiple)

    def _pad(self, image: Image) -> Image:
        """Pad by edge replication to a size the UNet and VAE accept (cropped off afterwards)."""
        from PIL import Image as PILImage

        w, h = image.size
        m = self._multiple
        pw, ph = math.ceil(w / m) * m, math.ceil(h / m) * m
        if (pw, ph) == (w, h):
            return image
        arr = np.pad(np.asarray(image), ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        return PILImage.fromarray(arr)

    def _crop_seed(self, crop: Image, prompt: str, tile_index: int) -> int:
        import hashlib

        digest = hashlib.sha256(f"{self.seed}|{tile_index}|{prompt}|{crop.size}".encode())
        digest.update(crop.tobytes())
        return int.from_bytes(digest.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

    def _run(self, crops: Sequence[Image], prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        import torch

        n = len(crops)
        result = self.pipe(
            prompt=list(prompts),
            image=list(crops),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            noise_level=self.noise_level,
            negative_prompt=[self.negative_prompt] * n if self.negative_prompt else None,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return [np.asarray(im, dtype=np.float32) for im in result]

    def upscale(self, images: Sequence[Image], *, prompts: Sequence[str] | None = None) -> list[Image]:
        from PIL import Image as PILImage

        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        texts = list(prompts) if prompts is not None else [""] * len(images)
        s = self.model_scale
        # plan: every image becomes equal-size crops; crops of one size share pipeline batches
        plans = []
        jobs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        crops: list[list[Image]] = []
        for i, image in enumerate(images):
            padded = self._pad(_to_rgb(image))
            pw, ph = padded.size
            tw, th = (pw, ph) if self.tile is None else (min(self.tile, pw), min(self.tile, ph))
            xs, ys = tile_starts(pw, tw, self.tile_overlap), tile_starts(ph, th, self.tile_overlap)
            plans.append((padded.size, (tw, th), xs, ys))
            crops.append([padded.crop((x, y, x + tw, y + th)) for y in ys for x in xs])
            jobs.setdefault((tw, th), []).extend((i, t) for t in range(len(crops[i])))
        results: dict[tuple[int, int], np.ndarray] = {}
        for job in jobs.values():
            for part in batched(job, self.batch_size):
                batch = [crops[i][t] for i, t in part]
                seeds = [self._crop_seed(crops[i][t], texts[i], t) for i, t in part]
                outs = self._run(batch, [texts[i] for i, _ in part], seeds)
                results.update(zip(part, outs, strict=True))
        out: list[Image] = []
        for i, image in enumerate(images):
            (pw, ph), (tw, th), xs, ys = plans[i]
            acc = np.zeros((ph * s, pw * s, 3), dtype=np.float32)
            norm = np.zeros((ph * s, pw * s, 1), dtype=np.float32)
            for t, (yi, xi) in enumerate((yi, xi) for yi in range(len(ys)) for xi in range(len(xs))):
                x, y = xs[xi], ys[yi]
                wx = _feather(tw * s, *(o * s for o in _overlaps(xs, tw, xi)))
                wy = _feather(th * s, *(o * s for o in _overlaps(ys, th, yi)))
                weight = (wy[:, None] * wx[None, :])[..., None]
                acc[y * s : (y + th) * s, x * s : (x + tw) * s] += results[(i, t)] * weight
                norm[y * s : (y + th) * s, x * s : (x + tw) * s] += weight
            w, h = image.size
            arr = (np.clip(acc / norm, 0, 1) * 255.0).round().astype(np.uint8)[: h * s, : w * s]
            out.append(_lanczos(PILImage.fromarray(arr), w * self.scale, h * self.scale))
        return out
