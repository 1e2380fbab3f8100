"""Text encoders: the CLIP text tower (CLIP score) and the sentence embedder (text FD)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.errors import SptiError
from spti.evaluate.common import DEFAULT_CLIP, DEFAULT_TEXT_MODEL
from spti.rundir import RunDirectory

if TYPE_CHECKING:
    from spti.config import RunConfig


class CLIPTextTower:
    """CLIP text embeddings (projected) from a full CLIP checkpoint: the text half of CLIP score."""

    def __init__(self, model: str, *, device: str) -> None:
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        from spti.backends.local._common import (
            load_pretrained,
            quiet_hf,
            require,
            resolve_device,
            transformers_dtype_kwargs,
        )

        torch = require("torch")
        config = load_pretrained(AutoConfig.from_pretrained, model, "CLIP model")
        if config.model_type != "clip":
            raise SptiError(
                f"clip-score needs a full CLIP checkpoint (text and image towers); '{model}' is a "
                f"{config.model_type!r} model: pass --clip-model with e.g. {DEFAULT_CLIP}"
            )
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "CLIP tokenizer")
        # transformers 5 builds an empty tokenizer from a folder without vocabulary files
        probe = self.tokenizer("a photo", add_special_tokens=False)["input_ids"]
        if len(self.tokenizer) <= 2 or not probe or all(t == self.tokenizer.unk_token_id for t in probe):
            raise SptiError(f"'{model}' has no usable CLIP tokenizer (vocab.json/merges.txt): clip-score needs one")
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        self.device = resolve_device(device)
        with quiet_hf():
            self.model = load_pretrained(
                CLIPTextModelWithProjection.from_pretrained,
                model,
                "CLIP text model",
                config=text_config,
                **transformers_dtype_kwargs(torch.float32),
            )
        self.model.to(self.device).eval()
        limits = [self.tokenizer.model_max_length, text_config.max_position_embeddings]
        self.max_length = int(min(x for x in limits if isinstance(x, int) and x > 0))
        self._torch = torch

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,  # CLIP reads 77 tokens; longer descriptions are cut, as at render time
                max_length=self.max_length,
                return_tensors="pt",
            )
            with self._torch.inference_mode():
                emb = self.model(**{k: v.to(self.device) for k, v in enc.items()}).text_embeds
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _local(model: str) -> str:
    """``model`` as something that loads without the network when it can (see :func:`resolve_model`)."""
    from spti.evaluate.extract import resolve_model

    source, reason = resolve_model(model, "sentence-transformers model", "--text-model")
    if reason is not None:
        raise SptiError(reason)
    assert source is not None
    return source


def text_embedder(run: RunDirectory, cfg: RunConfig, text_model: str | None, device: str) -> tuple[Any, str]:
    """A local sentence embedder: ``text_model``, else the run's own embedding model.

    Evaluation never sends private captions to a hosted provider: a run that embedded text through
    an OpenAI-compatible API is evaluated with a local model instead (named in the result). A model
    that is neither local nor cached while offline raises :class:`SptiError` at once.
    """
    if text_model:
        from spti.backends.local.text import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(_local(text_model), device=device), text_model
    if cfg.model_spec("text_embedding").provider != "local":
        from spti.backends.local.text import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(_local(DEFAULT_TEXT_MODEL), device=device), (
            f"{DEFAULT_TEXT_MODEL} (local; the run's hosted {cfg.embedding_model} is not sent private captions)"
        )
    from spti.backends.factory import Models

    local_cfg = dataclasses.replace(cfg, device=device)
    if cfg.embedding_model != "tiny":  # "tiny" is built on the fly, offline
        local_cfg = dataclasses.replace(local_cfg, embedding_model=_local(cfg.embedding_model))
    return Models(local_cfg, run.state).text_embedder, cfg.embedding_model
