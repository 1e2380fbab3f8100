"""Text-to-image (and image-to-image variation) with diffusers, for rendering candidates and releases.

One :class:`DiffusersImageGenerator` wraps ``AutoPipelineForText2Image`` (SD-Turbo, SDXL-Turbo,
SDXL-base, SD 1.x/2.x, or any local directory saved with ``save_pretrained``) and, on the first
``vary`` call, ``AutoPipelineForImage2Image.from_pipe`` built from the same components, so the
weights are held once.

Determinism: every image gets its own CPU ``torch.Generator`` seeded from its own seed. The initial
noise therefore depends only on that seed (not on batch-mates, batch size or device), which is what
lets a resumed run or a cache re-render exactly the image it rendered before. Images from the same
seed and prompt agree across batch compositions up to floating-point kernel differences.

The safety checker is never loaded: it is a second CLIP model (about 1.2 GB) and it replaces
flagged images with black squares, which would then be embedded and voted on like any other
candidate and silently bias the DP histogram. Filter released images afterwards if needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spti.backends.local._common import (
    batched,
    diffusers_dtype_kwargs,
    load_pretrained,
    quiet_hf,
    require,
    resolve_device,
    resolve_dtype,
)
from spti.errors import SptiError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

# (substring of the model id or class name, steps, guidance): first match wins. Turbo models are
# distilled for guidance-free sampling in 1–4 steps; SDXL-Turbo at 4 steps is the SPTI setting,
# SD-Turbo's model card uses 1 step.
FAMILY_DEFAULTS: tuple[tuple[str, int, float], ...] = (
    ("sdxl-turbo", 4, 0.0),
    ("sd-turbo", 1, 0.0),
    ("turbo", 4, 0.0),
    ("xl", 30, 5.0),
)
FALLBACK_DEFAULTS: tuple[int, float] = (30, 7.5)
SIZE_MULTIPLE = 8  # Stable Diffusion pipelines reject sizes that are not multiples of 8


def family_defaults(model: str, pipeline_class: str = "") -> tuple[int, float]:
    """Default (steps, guidance) for a model id and its pipeline class name."""
    names = (Path(str(model)).name.lower(), str(model).lower(), pipeline_class.lower())
    for needle, steps, guidance in FAMILY_DEFAULTS:
        if any(needle in name for name in names):
            return steps, guidance
    return FALLBACK_DEFAULTS


def _round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def _fit(image: Image, width: int, height: int) -> Image:
    """RGB, at exactly the requested size (the pipeline works on multiples of 8)."""
    from PIL import Image as PILImage

    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), PILImage.Resampling.LANCZOS)
    return image


def pipeline_native_size(pipe: Any, fallback: int = 512) -> int:
    """``default_sample_size × vae_scale_factor`` (what diffusers uses when no height is given).

    SD 1.x/2.x pipelines have no ``default_sample_size``: their denoiser's ``config.sample_size`` is it.
    """
    sample = getattr(pipe, "default_sample_size", None)
    if not sample:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample, list | tuple):
        sample = sample[0]
    scale = getattr(pipe, "vae_scale_factor", None) or 8
    if not sample:
        return fallback
    return int(sample) * int(scale)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: its noise depends on its own seed only, on every device."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]


def img2img_steps(steps: int, strength: float) -> int:
    """Raise ``steps`` until ``int(steps * strength) >= 1``.

    Image-to-image pipelines run only the last ``int(steps * strength)`` denoising steps; with
    Turbo's 1–4 steps and strength 0.5 that can be zero, which diffusers rejects.
    """
    steps = max(1, steps)
    while int(steps * strength) < 1:
        steps += 1
    return steps


class DiffusersImageGenerator:
    """``ImageGenerator`` on a diffusers text-to-image pipeline, batched and seeded per image.

    Args:
        model: Hugging Face id or local pipeline directory.
        device, dtype: ``auto`` gives CUDA with fp16 when available, else CPU fp32.
        batch_size: images per pipeline call.
        steps, guidance: overrides of the per-family defaults (:data:`FAMILY_DEFAULTS`);
            per-call arguments override both.
        variant: weight variant to load (e.g. ``"fp16"``, where the repository has one).
        tiny_autoencoder: path or id of an ``AutoencoderTiny`` (e.g. TAESD / TAESDXL) used instead of
            the full VAE: much faster decodes, slightly softer images. Off by default.
        channels_last: put the denoiser and VAE in channels-last memory format (often faster on GPU).
        compile: ``torch.compile`` the denoiser; pays off only for long runs at a fixed size.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 8,
        steps: int | None = None,
        guidance: float | None = None,
        variant: str | None = None,
        tiny_autoencoder: str | Path | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        torch = require("torch")
        with quiet_hf():  # importing the pipelines makes transformers advise installing torchvision: don't
            diffusers = require("diffusers")
            auto_text2image = diffusers.AutoPipelineForText2Image
            diffusers.AutoPipelineForImage2Image  # noqa: B018 (import it now, quietly)
        if batch_size < 1:
            raise SptiError(f"batch size must be >= 1, got {batch_size}")
        self.model = str(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        dtype_kwargs = diffusers_dtype_kwargs(self.dtype)

        config = load_pretrained(diffusers.DiffusionPipeline.load_config, self.model, "image model")
        kwargs: dict[str, Any] = dict(dtype_kwargs)
        if "safety_checker" in config:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if variant is not None:
            kwargs["variant"] = variant
        if tiny_autoencoder is not None:
            kwargs["vae"] = load_pretrained(
                diffusers.AutoencoderTiny.from_pretrained, tiny_autoencoder, "tiny autoencoder", **dtype_kwargs
            )
        try:
            with quiet_hf(logs=False):  # the per-component loading bars; hub downloads still show theirs
                pipe = load_pretrained(auto_text2image.from_pretrained, self.model, "image model", **kwargs)
        except ValueError as exc:
            if "AutoPipeline can't find" in str(exc):
                raise SptiError(
                    f"image model '{self.model}' ({config.get('_class_name')}) is not a text-to-image pipeline"
                ) from exc
            raise
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if channels_last:
            for module in (denoiser, getattr(pipe, "vae", None)):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if compile and denoiser is not None:
            denoiser.compile()
        self.pipe = pipe
        self._img2img: Any = None
        self.truncated_prompts = 0  # prompts cut to the text encoder's token limit, over every call
        default_steps, default_guidance = family_defaults(self.model, type(pipe).__name__)
        self.steps = steps if steps is not None else default_steps
        self.guidance = guidance if guidance is not None else default_guidance

    @property
    def native_size(self) -> int:
        """The side the pipeline draws at when given no size: its denoiser's sample size × the VAE's scale.

        SDXL-Turbo and SD-Turbo: 512; SDXL-base: 1024; the tiny test pipeline: 32. This is the size the
        SPTI authors render vote candidates at (they call the pipeline without a size).
        """
        return pipeline_native_size(self.pipe)

    def _tokenizers(self) -> list[Any]:
        """The pipeline's CLIP tokenizers (SDXL has two); T5-style encoders with long limits are left alone."""
        out = []
        for name in ("tokenizer", "tokenizer_2"):
            tok = getattr(self.pipe, name, None)
            limit = getattr(tok, "model_max_length", None)
            if tok is not None and isinstance(limit, int) and 0 < limit <= 1024:
                out.append(tok)
        return out

    @property
    def prompt_token_limit(self) -> int | None:
        """Tokens the text encoder reads (77 for CLIP, start and end tokens included); ``None``: no limit known."""
        limits = [tok.model_max_length for tok in self._tokenizers()]
        return min(limits) if limits else None

    def _fits(self, text: str, tokenizers: Sequence[Any]) -> bool:
        return all(
            len(tok(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
            <= tok.model_max_length
            for tok in tokenizers
        )

    def fit_prompt(self, text: str) -> tuple[str, bool]:
        """``(prompt, cut)``: ``text`` as the text encoder will read it, cut at a word boundary when it
        is longer than the encoder's token limit (counted with the pipeline's own tokenizers).

        The pipeline would otherwise drop the tail mid-word, with a warning per batch; cutting here
        keeps whole words and lets the run count what was cut (:attr:`truncated_prompts`).
        """
        tokenizers = self._tokenizers()
        if not tokenizers or self._fits(text, tokenizers):
            return text, False
        words = text.split()
        lo, hi = 0, len(words)  # the most words that fit: lo fits (0 words trivially), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._fits(" ".join(words[:mid]), tokenizers):
                lo = mid
            else:
                hi = mid
        if lo > 0:
            return " ".join(words[:lo]).rstrip(" ,;:-"), True
        tok = tokenizers[0]  # one word longer than the limit: cut its tokens
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][: tok.model_max_length - 2]
        return tok.decode(ids).strip(), True

    def fit_prompts(self, prompts: Sequence[str]) -> list[str]:
        """:meth:`fit_prompt` of each prompt; every cut one adds to :attr:`truncated_prompts`."""
        out = []
        for text in prompts:
            fitted, cut = self.fit_prompt(text)
            self.truncated_prompts += int(cut)
            out.append(fitted)
        return out

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many of ``prompts`` are longer than the text encoder reads (nothing is drawn or counted)."""
        tokenizers = self._tokenizers()
        return sum(not self._fits(t, tokenizers) for t in prompts) if tokenizers else 0

    @property
    def img2img(self) -> Any:
        """The image-to-image pipeline, sharing every component with the text-to-image one."""
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            except ValueError as exc:
                raise SptiError(f"image model '{self.model}' has no image-to-image variant: {exc}") from exc
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    @staticmethod
    def _seeds(seeds: Sequence[int] | None, n: int) -> list[int]:
        """Seeds default to 0..n-1: deterministic, so a re-run without seeds repeats itself."""
        if seeds is None:
            return list(range(n))
        if len(seeds) != n:
            raise ValueError(f"got {n} prompts but {len(seeds)} seeds")
        return [int(s) for s in seeds]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
    ) -> list[Image]:
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        prompts = self.fit_prompts(prompts)
        all_seeds = self._seeds(seeds, len(prompts))
        steps = self.steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        run_w, run_h = _round_up(width), _round_up(height)
        out: list[Image] = []
        for idx in batched(range(len(prompts)), self.batch_size):
            result = self.pipe(
                prompt=[prompts[i] for i in idx],
                negative_prompt=[negative_prompt] * len(idx) if negative_prompt else None,
                num_inference_steps=max(1, steps),
                guidance_scale=guidance,
                width=run_w,
                height=run_h,
                generator=_generators([all_seeds[i] for i in idx]),
                output_type="pil",
            )
            out.extend(_fit(im, width, height) for im in result.images)
        return out

    def vary(
        self,
        images: Sequence[Image],
        prompts: Sequence[str],
        *,
        strength: float = 0.5,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[Image]:
        """Image-to-image: keep ``1 - strength`` of each input and re-draw the rest towards its prompt.

        Outputs have the size of their inputs. Inputs of different sizes are processed in
        separate batches (a pipeline batch needs one size).
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        all_seeds = self._seeds(seeds, len(images))
        prompts = self.fit_prompts(prompts)
        run_steps = img2img_steps(self.steps if steps is None else steps, strength)
        guidance = self.guidance if guidance is None else guidance
        pipe = self.img2img
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        out: list[Image | None] = [None] * len(images)
        for (w, h), indices in by_size.items():
            run_w, run_h = _round_up(w), _round_up(h)
            for idx in batched(indices, self.batch_size):
                result = pipe(
                    prompt=[prompts[i] for i in idx],
                    image=[_fit(images[i], run_w, run_h) for i in idx],
                    strength=strength,
                    num_inference_steps=run_steps,
                    guidance_scale=guidance,
                    generator=_generators([all_seeds[i] for i in idx]),
                    output_type="pil",
                )
                for i, im in zip(idx, result.images, strict=True):
                    out[i] = _fit(im, w, h)
        return [im for im in out if im is not None]

    def close(self) -> None:
        """Drop the pipelines and return cached accelerator memory."""
        import gc

        import torch

        self._img2img = None
        self.pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
