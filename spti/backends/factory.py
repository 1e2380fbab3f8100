"""Build the models a run needs from its configuration, lazily (only what a stage uses is loaded).

Model names are Hugging Face ids or local directories (``provider = "local"``), model names of an
OpenAI-compatible server (``provider = "openai"``), or ``"tiny"``: a tiny randomly-initialised model
built on the fly into the run's state folder (the offline ``smoke`` preset; its outputs are noise).
The image embedder is named by a spec: ``wavelet``, ``clip[:ID]``, ``dinov2[:ID]`` or
``inception:PATH`` (FID Inception-v3 weights file).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spti.errors import SptiError

if TYPE_CHECKING:
    from spti.backends.base import (
        Captioner,
        ImageEmbedder,
        ImageGenerator,
        TextEmbedder,
        TextGenerator,
        Upscaler,
    )
    from spti.config import RunConfig
    from spti.rundir import RunDirectory

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINOV2 = "facebook/dinov2-small"


class Models:
    """The run's models, each built on first use. ``endpoints`` records where private data went.

    ``run`` is the run directory: tiny models are built in its ``state/``, and the hosted
    provider's request cache lives in its ``private/`` (it holds captions of private images
    verbatim and embeddings of private captions). A plain folder instead of a run directory is
    taken as the state folder, and then nothing is cached (there is no private folder to put it in).
    """

    def __init__(self, config: RunConfig, run: RunDirectory | str | Path) -> None:
        from spti.rundir import RunDirectory

        self.cfg = config
        if isinstance(run, RunDirectory):
            self.state_dir = run.state
            self.private_dir: Path | None = run.private
        else:
            self.state_dir = Path(run)
            self.private_dir = None
        self.endpoints: dict[str, str] = {}

    # -- helpers ---------------------------------------------------------------------------
    @property
    def tiny_dir(self) -> Path:
        """Where tiny models are built: the run's state, or ``$SPTI_TINY_MODEL_DIR`` to share them."""
        shared = os.environ.get("SPTI_TINY_MODEL_DIR")
        return Path(shared) if shared else self.state_dir / "tiny_models"

    def _tiny(self, kind: str) -> Path:
        from spti.testing import tiny_text, tiny_vision

        builders = {
            "vlm": tiny_text.build_tiny_vlm,
            "lm": tiny_text.build_tiny_chat_lm,
            "sentence": tiny_text.build_tiny_sentence_transformer,
            "sd": tiny_vision.build_tiny_sd_pipeline,
        }
        import torch

        # Tiny models are many small ops: a second thread only waits on the first, and on a busy
        # 2-core machine it made the smoke run several times slower.
        torch.set_num_threads(1)
        path = self.tiny_dir / kind
        if not (path / ".complete").exists():
            import shutil

            shutil.rmtree(path, ignore_errors=True)  # a half-built model from an interrupted build
            builders[kind](path)
            (path / ".complete").write_text("ok")
        return path

    def _local_kwargs(self) -> dict[str, Any]:
        return {"device": self.cfg.device, "dtype": self.cfg.dtype, "batch_size": self.cfg.batch_size}

    @property
    def request_cache_path(self) -> Path | None:
        """``RUN_DIR/private/requests.sqlite``: answers hold private captions, so never in ``state/``."""
        return self.private_dir / "requests.sqlite" if self.private_dir is not None else None

    @cached_property
    def openai_backend(self) -> Any:
        """One client for every hosted model: one connection pool, shared rate limits, one usage report."""
        from spti.backends.openai_api import OpenAIBackend

        return OpenAIBackend(
            base_url=self.cfg.base_url,
            cache_path=self.request_cache_path,
            max_concurrency=self.cfg.concurrency,
            requests_per_minute=self.cfg.requests_per_minute,
            tokens_per_minute=self.cfg.tokens_per_minute,
        )

    def _openai(self) -> dict[str, Any]:
        return {"backend": self.openai_backend}

    def openai_host(self) -> str:
        from spti.backends.openai_api import describe_endpoint

        return describe_endpoint(self.cfg.base_url)

    # -- the six models --------------------------------------------------------------------
    @cached_property
    def captioner(self) -> Captioner:
        cfg = self.cfg
        if cfg.provider == "openai":
            from spti.backends.openai_api import OpenAICaptioner

            self.endpoints["caption"] = self.openai_host()
            return OpenAICaptioner(cfg.caption_model, **self._openai())
        from spti.backends.local.text import HFCaptioner

        self.endpoints["caption"] = "local"
        model = self._tiny("vlm") if cfg.caption_model == "tiny" else cfg.caption_model
        return HFCaptioner(str(model), **self._local_kwargs())

    @cached_property
    def llm(self) -> TextGenerator:
        cfg = self.cfg
        if cfg.provider == "openai":
            from spti.backends.openai_api import OpenAITextGenerator

            return OpenAITextGenerator(cfg.llm_model, **self._openai())
        from spti.backends.local.text import HFTextGenerator

        model = self._tiny("lm") if cfg.llm_model == "tiny" else cfg.llm_model
        return HFTextGenerator(str(model), **self._local_kwargs())

    @cached_property
    def text_embedder(self) -> TextEmbedder:
        cfg = self.cfg
        if cfg.provider == "openai":
            from spti.backends.openai_api import OpenAITextEmbedder

            self.endpoints["text_embedding"] = self.openai_host()
            return OpenAITextEmbedder(cfg.embedding_model, **self._openai())
        from spti.backends.local.text import SentenceTransformerEmbedder

        self.endpoints["text_embedding"] = "local"
        model = self._tiny("sentence") if cfg.embedding_model == "tiny" else cfg.embedding_model
        return SentenceTransformerEmbedder(str(model), device=cfg.device, batch_size=max(cfg.batch_size, 32))

    def _image_generator(self, name: str) -> ImageGenerator:
        cfg = self.cfg
        if cfg.provider == "openai" and name != "tiny":
            from spti.backends.openai_api import OpenAIImageGenerator

            return OpenAIImageGenerator(name, **self._openai())
        from spti.backends.local.images import DiffusersImageGenerator

        model = self._tiny("sd") if name == "tiny" else name
        return DiffusersImageGenerator(str(model), **self._local_kwargs())

    @cached_property
    def image_generator(self) -> ImageGenerator:
        """The vote generator (image voting renders every candidate with it), and by default the release one."""
        return self._image_generator(self.cfg.image_model)

    @cached_property
    def release_image_generator(self) -> ImageGenerator:
        """The generator of released images: ``release_model`` (e.g. SDXL-base at 1024² while SDXL-Turbo
        votes), built on first use; the vote generator itself when the two are the same model."""
        if not self.cfg.separate_release_model:
            return self.image_generator
        return self._image_generator(self.cfg.release_model_name)

    @cached_property
    def image_embedder(self) -> ImageEmbedder:
        """Image features are always computed locally: private images never leave the machine here."""
        self.endpoints["image_features"] = "local"
        return build_image_embedder(self.cfg.image_embedder, device=self.cfg.device, batch_size=self.cfg.batch_size)

    @cached_property
    def upscaler(self) -> Upscaler | None:
        cfg = self.cfg
        if cfg.upscaler == "none" or cfg.upscale == 1:
            return None
        from spti.backends.local import upscale

        if cfg.upscaler == "lanczos":
            return upscale.LanczosUpscaler(scale=cfg.upscale)
        if cfg.upscaler == "realesrgan":
            return upscale.RealESRGANUpscaler(str(cfg.upscaler_model), scale=cfg.upscale, device=cfg.device)
        return upscale.DiffusersX4Upscaler(
            cfg.upscaler_model or "stabilityai/stable-diffusion-x4-upscaler",
            scale=cfg.upscale,
            device=cfg.device,
            dtype=cfg.dtype,
        )

    def usage(self) -> dict[str, Any]:
        """Requests, tokens and estimated cost of the hosted models used so far."""
        backend = self.__dict__.get("openai_backend")
        return backend.usage() if backend is not None else {}

    def close(self) -> None:
        backend = self.__dict__.pop("openai_backend", None)
        for model in {id(m): m for m in self.__dict__.values()}.values():  # a shared generator closes once
            close = getattr(model, "close", None)
            if callable(close):
                close()
        if backend is not None:
            backend.close()


def build_image_embedder(spec: str, *, device: str = "auto", batch_size: int = 16) -> ImageEmbedder:
    """An image feature extractor from a spec: ``wavelet``, ``clip[:ID]``, ``dinov2[:ID]``, ``inception:PATH``."""
    from spti.backends.local import features

    name, _, arg = spec.partition(":")
    if name == "wavelet":
        return features.WaveletEmbedder()
    kwargs = {"device": device, "batch_size": max(batch_size, 16)}
    if name == "clip":
        return features.CLIPImageEmbedder(arg or DEFAULT_CLIP, **kwargs)
    if name == "dinov2":
        return features.DINOv2Embedder(arg or DEFAULT_DINOV2, **kwargs)
    if name == "inception":
        if not arg:
            raise SptiError(
                "image embedder 'inception' needs its weights: --image-embedder inception:/path/to/"
                "pt_inception-2015-12-05-6726825d.pth (the FID Inception-v3 weights)"
            )
        return features.InceptionV3Embedder(arg, **kwargs)
    raise SptiError(f"unknown image embedder {spec!r}: use wavelet, clip[:ID], dinov2[:ID] or inception:PATH")
