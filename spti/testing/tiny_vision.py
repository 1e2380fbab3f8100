"""Tiny randomly-initialised vision models, built from configs and saved to disk, fully offline.

Each builder writes a directory (or weights file) that loads through exactly the same
``from_pretrained`` / file-loading path as the real model it stands in for, in about a second on a
CPU. The tests, the benchmarks and the offline ``smoke`` preset use them. Their outputs are noise:
they prove plumbing (shapes, sizes, seeding, batching, file formats), not quality.

Weights are drawn under a forked, fixed-seed torch RNG, so a build is reproducible and does not
disturb the caller's random state.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from spti.backends.local._common import quiet_hf

F = TypeVar("F", bound=Callable[..., Any])

MAX_PROMPT_TOKENS = 77
TINY_TEXT_WIDTH = 16
_TINY_TEXT = """a photo of the bedroom with bed and window light wall room white blue red green dark bright
wooden floor lamp large small cozy modern old face person woman man smiling portrait hair eyes in on at"""
TINY_WORDS = tuple(_TINY_TEXT.split())


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _quietly(build: F) -> F:
    """Run a builder with transformers/diffusers progress bars and warnings off (they are noise here)."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet_hf():
            return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE: printable Latin-1 bytes map to themselves,
    the others to code points from 256 upwards, so every byte has a visible, non-space symbol."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_clip_tokenizer_files(path: str | Path) -> tuple[Path, Path, int]:
    """Write a small byte-level BPE vocabulary in the CLIP format (vocab.json, merges.txt).

    Every byte and every byte-at-word-end (``</w>``) is a token, so any text tokenizes; a few
    merges build whole tokens for :data:`TINY_WORDS`. Returns the two paths and the vocab size.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens: list[str] = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in dict.fromkeys(TINY_WORDS):
        # merge left to right: w + o → wo, wo + r → wor, …, the last symbol carries </w>
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            pair = (current, sym)
            current = current + sym
            if current not in seen:
                merges.append(pair)
                tokens.append(current)
                seen.add(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab_path, merges_path = path / "vocab.json", path / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path, len(vocab)


def _clip_tokenizer(workdir: Path) -> Any:
    """Load the written files the way a hub checkpoint's tokenizer folder is loaded."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(workdir)
    return CLIPTokenizer.from_pretrained(str(workdir), model_max_length=MAX_PROMPT_TOKENS)


def _image_processor(name: str, **kwargs: Any) -> Any:
    """The PIL-backend image processor (transformers >= 5 names it ``…Pil``; torchvision is not installed)."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def _clip_text_config(vocab_size: int, bos: int, eos: int, *, projection_dim: int = TINY_TEXT_WIDTH) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=2 * TINY_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _text_parts(workdir: Path, *, with_projection: bool = False) -> tuple[Any, Any]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer(workdir)
    config = _clip_text_config(
        len(tokenizer), tokenizer.convert_tokens_to_ids("<|startoftext|>"), tokenizer.eos_token_id
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return tokenizer, model.eval()


def _tiny_vae(levels: int = 2, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    channels = (8, 16, 16, 16)[:levels]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    ).eval()


def _tiny_unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs).eval()


def _few_step_scheduler() -> Any:
    """Euler with trailing timesteps (as SD-Turbo uses): starts from pure noise even at 1 step."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )


@_quietly
def build_tiny_sd_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """A StableDiffusionPipeline (2-block UNet, 2-level VAE, 2-layer CLIP text encoder); no safety checker."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    with _seeded(seed):
        tokenizer, text_encoder = _text_parts(path / "_tokenizer_src")
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_tiny_unet(),
            scheduler=_few_step_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    _remove_tree(path / "_tokenizer_src")
    return path


@_quietly
def build_tiny_sdxl_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline: two CLIP text encoders (the second with projection), micro-conditioned UNet."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    time_dim = 4
    with _seeded(seed):
        tokenizer, text_encoder = _text_parts(path / "_tokenizer_src")
        tokenizer_2, text_encoder_2 = _text_parts(path / "_tokenizer_src", with_projection=True)
        unet = _tiny_unet(
            cross_attention_dim=2 * TINY_TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # six size/crop numbers, each embedded in time_dim, plus the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + TINY_TEXT_WIDTH,
            use_linear_projection=True,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_tiny_vae(force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_few_step_scheduler(),
            add_watermarker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    _remove_tree(path / "_tokenizer_src")
    return path


@_quietly
def build_tiny_x4_upscaler(path: str | Path, *, seed: int = 0) -> Path:
    """A StableDiffusionUpscalePipeline: the UNet sees latents + the noised low-res image (7 channels)
    and the noise level as a class label; the 3-level VAE decoder makes the output 4× larger."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    path = Path(path)
    with _seeded(seed):
        tokenizer, text_encoder = _text_parts(path / "_tokenizer_src")
        pipe = StableDiffusionUpscalePipeline(
            vae=_tiny_vae(levels=3, scaling_factor=0.08333),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_tiny_unet(in_channels=7, num_class_embeds=1000),
            low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear"),
            scheduler=DDIMScheduler(
                num_train_timesteps=1000, prediction_type="v_prediction", beta_schedule="scaled_linear", steps_offset=1
            ),
            max_noise_level=350,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    _remove_tree(path / "_tokenizer_src")
    return path


@_quietly
def build_tiny_autoencoder(path: str | Path, *, seed: int = 0) -> Path:
    """An ``AutoencoderTiny`` (TAESD-style) matching :func:`build_tiny_sd_pipeline`'s 2× latent grid."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    with _seeded(seed):
        vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=4,
        ).eval()
    vae.save_pretrained(path, safe_serialization=True)
    return path


class WeightFiles(NamedTuple):
    """The same weights in the two formats the loaders accept."""

    safetensors: Path
    pth: Path


def write_tiny_realesrgan_weights(
    path: str | Path, *, num_blocks: int = 1, scale: int = 4, num_feat: int = 16, num_grow_ch: int = 8, seed: int = 0
) -> WeightFiles:
    """A random RRDBNet saved as ``.safetensors`` (flat) and as ``.pth`` wrapped in ``{'params_ema': …}``,
    the layout of the published RealESRGAN_x4plus.pth. ``path`` is a directory."""
    import torch
    from safetensors.torch import save_file

    from spti.backends.local.upscale import build_rrdbnet

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = build_rrdbnet(scale=scale, num_feat=num_feat, num_block=num_blocks, num_grow_ch=num_grow_ch)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    stem = f"tiny_realesrgan_x{scale}_b{num_blocks}"
    files = WeightFiles(path / f"{stem}.safetensors", path / f"{stem}.pth")
    save_file(state, str(files.safetensors))
    torch.save({"params_ema": state}, files.pth)
    return files


@_quietly
def build_tiny_clip_vision(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A full (text + vision) CLIPModel checkpoint, like openai/clip-*, with a CLIP image processor."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=12,
    )
    with _seeded(seed):
        model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor = _image_processor(
        "CLIPImageProcessor", size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(path)
    return path


@_quietly
def build_tiny_dinov2(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A 2-layer Dinov2Model with the BiT image processor the real checkpoints use."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    config = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=image_size,
        patch_size=8,
    )
    with _seeded(seed):
        model = Dinov2Model(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor = _image_processor(
        "BitImageProcessor",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(path)
    return path


def write_tiny_inception_weights(path: str | Path, *, seed: int = 0) -> Path:
    """Random weights for :func:`spti.backends.local.features.build_fid_inception` (full size: the FID
    architecture is fixed). He-initialised convolutions and identity batch norms keep activations
    finite and non-trivial through the 94 layers. ``path`` is a ``.safetensors``/``.pth`` file, or a
    directory that receives ``fid_inception_random.safetensors``. Stored in fp16 (about 48 MB)."""
    import torch
    from safetensors.torch import save_file

    from spti.backends.local.features import build_fid_inception

    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "fid_inception_random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = build_fid_inception()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
