"""Local text backends on Hugging Face models: image captioning, chat generation, sentence embeddings.

- :class:`HFCaptioner`: a vision-language model through ``AutoProcessor`` + ``AutoModelForImageTextToText``
  and the processor's chat template (SmolVLM, Qwen2.5-VL, Llava, …), or a BLIP captioner.
- :class:`HFTextGenerator`: an instruction-tuned causal LM through its tokenizer's chat template.
- :class:`SentenceTransformerEmbedder`: a sentence-transformers model.

Each takes a Hugging Face id or a local directory saved with ``save_pretrained``; both go through
:func:`~spti.backends.local._common.load_pretrained`, so an unreachable hub gives one clear error.
torch and transformers are imported in the constructors, never when this module is imported.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.backends.base import DEFAULT_CAPTION_PROMPT, ChatMessage, Conversation
from spti.backends.local._common import (
    batched,
    load_pretrained,
    require,
    resolve_device,
    resolve_dtype,
    split_gguf,
    transformers_dtype_kwargs,
)
from spti.errors import SptiError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

__all__ = ["HFCaptioner", "HFTextGenerator", "SentenceTransformerEmbedder"]

# Captioning models that take no instruction: they describe the image unprompted, and a prompt would be
# read as the beginning of the caption (BLIP) rather than as a request.
_UNPROMPTED_CAPTIONERS = frozenset({"blip"})


def _pad_left(tokenizer: Any, model: str) -> None:
    """Left padding for batched generation, with a pad token where the model ships none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Many released LMs ship no pad token. Pad positions are masked out, so any id works; EOS (or
        # UNK) avoids growing the embedding matrix.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise SptiError(f"the tokenizer of '{model}' has neither a pad, an EOS nor an UNK token")


def _load_for_inference(
    loader: Any, model: str, what: str, device: str, dtype: Any, trust_remote_code: bool, **extra: Any
) -> Any:
    """``from_pretrained`` with device placement (on CUDA while loading), moved and set to eval."""
    loaded = load_pretrained(
        loader, model, what, trust_remote_code=trust_remote_code, **_placement_kwargs(device, dtype), **extra
    )
    if not device.startswith("cuda"):
        loaded.to(device)
    loaded.eval()
    return loaded


def _placement_kwargs(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Load straight onto the GPU (no full CPU copy of a 16 GB model); CPU/MPS models are moved after."""
    kwargs = transformers_dtype_kwargs(dtype)
    if device.startswith("cuda"):
        kwargs["device_map"] = device
    return kwargs


def _check_keys(keys: Sequence[str] | None, n: int) -> None:
    if keys is not None and len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for {n} items; pass one key per item or none")


def _clean(text: str) -> str | None:
    """An empty answer is a failed item (see :mod:`spti.backends.base`), not an empty description."""
    text = text.strip()
    return text or None


def batch_seed(seed: int, batch_index: int) -> int:
    """Independent, reproducible seeds per batch, so batch *b* does not depend on how many came before."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


@contextmanager
def seeded_generation(seed: int | None, device: str) -> Iterator[None]:
    """Seed torch for one ``generate`` call and restore the caller's global random state afterwards.

    ``transformers`` samples from the global torch generator; forking it keeps the seeded draws local to
    this call and leaves the rest of the program's randomness untouched.
    """
    import torch

    if seed is None:
        yield
        return
    dev = torch.device(device)
    # CPU draws come from the global generator (always forked); CUDA keeps one generator per device.
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _LocalModel:
    """Shared set-up: device and dtype resolution, batch size check."""

    def __init__(self, device: str | None, dtype: str | torch.dtype | None, batch_size: int) -> None:
        require("torch")
        require("transformers")
        if batch_size < 1:
            raise SptiError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size


class HFTextGenerator(_LocalModel):
    """Chat completion with a local causal LM (e.g. SmolLM2-360M-Instruct, Llama-3-8B-Instruct).

    ``model`` is a hub id, a directory, or a GGUF file: ``path/to/model.gguf`` or ``repo_id:file.gguf``
    (tokenizer, chat template and weights all come from the GGUF file; transformers de-quantises the
    weights to ``dtype``, so memory is that of the unquantised model; needs the ``gguf`` package).

    Conversations are rendered with the tokenizer's chat template (``add_generation_prompt=True``), sorted
    by length and batched with LEFT padding, so every row's last prompt token sits next to its first new
    token (right padding would make a decoder-only model continue after pad tokens). Sampling uses
    ``temperature`` and ``top_p`` only (no top-k, as in the OpenAI API); ``temperature == 0`` is greedy.
    With a ``seed``, each batch seeds its own generator, so a call is reproducible for the same inputs and
    batch size. Only the new text is returned; an empty answer is ``None``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(device, dtype, batch_size)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = str(model)
        source, gguf_file = split_gguf(model)
        extra: dict[str, Any] = {}
        if gguf_file is not None:
            require("gguf")
            extra["gguf_file"] = gguf_file
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, source, "tokenizer", trust_remote_code=trust_remote_code, **extra
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise SptiError(f"the tokenizer of '{model}' has no chat template; use an instruction-tuned (chat) model")
        _pad_left(self.tokenizer, self.model_name)
        self.model = _load_for_inference(
            AutoModelForCausalLM.from_pretrained,
            source,
            "language model",
            self.device,
            self.dtype,
            trust_remote_code,
            **extra,
        )

    # -- prompt rendering -------------------------------------------------------------------
    def render(self, conversation: Conversation) -> str:
        """The chat-template text of one conversation, ending with the assistant's turn opener."""
        messages = [dict(m) for m in conversation]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            # Some templates (Gemma, Mistral v1) refuse a system turn: fold it into the first user turn.
            if not messages or messages[0].get("role") != "system" or "system" not in str(exc).lower():
                raise
            return self.tokenizer.apply_chat_template(
                _fold_system(messages), add_generation_prompt=True, tokenize=False
            )

    def prepare(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of one batch (left-padded), on the model's device.

        Public so that tests and audits can check what the model is given.
        """
        return self._encode([self.render(c) for c in conversations])

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        # Templates that write BOS themselves must not get a second one from the tokenizer.
        bos = tok.bos_token
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        enc = tok(list(texts), padding=True, add_special_tokens=add_special, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        import torch

        _check_keys(keys, len(conversations))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts = [self.render(c) for c in conversations]
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))  # little padding per batch
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
            if temperature > 0
            else {"do_sample": False}
        )
        results: list[str | None] = [None] * len(texts)
        for b, idx in enumerate(batched(order, self.batch_size)):
            inputs = self._encode([texts[i] for i in idx])
            with (
                seeded_generation(None if seed is None else batch_seed(seed, b), self.device),
                torch.inference_mode(),
            ):
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(idx, decoded, strict=True):
                results[i] = _clean(text)
        return results


def _fold_system(messages: list[ChatMessage]) -> list[ChatMessage]:
    system, rest = messages[0], messages[1:]
    if rest and rest[0].get("role") == "user" and isinstance(rest[0].get("content"), str):
        return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system["content"]}, *rest]


class HFCaptioner(_LocalModel):
    """Captions with a local vision-language model, one image per prompt.

    Each image gets its own conversation (``[image, prompt]`` in one user turn), rendered and tokenised by
    the processor's chat template; several conversations share a forward pass (LEFT-padded), but no
    prompt ever contains a second image, which is what the privacy analysis assumes of captioning.
    Decoding is greedy unless ``do_sample`` is set; the prompt is cut from the output. BLIP captioners
    (no chat template, no instructions) caption unprompted and ignore ``prompt``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        system_prompt: str | None = None,
        do_sample: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(device, dtype, batch_size)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_name = str(model)
        self.system_prompt = system_prompt
        self.do_sample = do_sample
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, model, "captioning processor", trust_remote_code=trust_remote_code
        )
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise SptiError(f"'{model}' has no tokenizer in its processor; it is not an image-to-text model")
        _pad_left(self.tokenizer, model)
        self.model = _load_for_inference(
            AutoModelForImageTextToText.from_pretrained,
            model,
            "captioning model",
            self.device,
            self.dtype,
            trust_remote_code,
        )
        self.unprompted = self.model.config.model_type in _UNPROMPTED_CAPTIONERS
        self._takes_processor_kwargs = (
            "processor_kwargs" in inspect.signature(self.processor.apply_chat_template).parameters
        )
        if not self.unprompted and not getattr(self.processor, "chat_template", None):
            raise SptiError(
                f"the processor of '{model}' has no chat template; use an instruction-tuned vision-language "
                "model (e.g. HuggingFaceTB/SmolVLM-256M-Instruct) or a BLIP captioner"
            )

    def conversation(self, image: Image, prompt: str) -> list[ChatMessage]:
        """The single-image conversation that captions ``image``."""
        messages: list[ChatMessage] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append(
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}
        )
        return messages

    def prepare(self, images: Sequence[Image], prompt: str = DEFAULT_CAPTION_PROMPT) -> Any:
        """The model inputs for one batch of images (one conversation per image), on the model's device.

        Public so that tests and audits can check what a caption request contains.
        """
        import torch

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if self.unprompted:
            inputs = self.processor(images=rgb, return_tensors="pt")
        else:
            padding = {"padding": True, "padding_side": "left"}
            # transformers 5 wants processor arguments in ``processor_kwargs``; 4.x took them as keywords.
            extra = {"processor_kwargs": padding} if self._takes_processor_kwargs else padding
            inputs = self.processor.apply_chat_template(
                [self.conversation(im, prompt) for im in rgb],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                **extra,
            )
        inputs = inputs.to(self.device)
        for name, value in inputs.items():
            if torch.is_floating_point(value):  # pixel values follow the model's dtype (fp16 on GPU)
                inputs[name] = value.to(self.dtype)
        return inputs

    def caption(
        self,
        images: Sequence[Image],
        *,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        max_new_tokens: int = 77,
        keys: Sequence[str] | None = None,
    ) -> list[str | None]:
        import torch

        _check_keys(keys, len(images))
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        results: list[str | None] = []
        for chunk in batched(list(images), self.batch_size):
            inputs = self.prepare(chunk, prompt)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=self.do_sample)
            if "input_ids" in inputs and not self.unprompted:
                # Decoder-only VLMs return prompt + answer; keep the answer.
                out = out[:, inputs["input_ids"].shape[1] :]
            results.extend(_clean(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True))
        return results


class SentenceTransformerEmbedder:
    """Sentence embeddings (float32, n × d) from a sentence-transformers model (MiniLM, sentence-t5, …).

    ``normalize=True`` returns unit-length rows, the space where text votes compare by cosine distance.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        require("torch")
        st = require("sentence_transformers")
        if batch_size < 1:
            raise SptiError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = str(model)
        self.device = resolve_device(device)
        # Embeddings feed nearest-neighbour votes: fp32 by default everywhere, half precision only on request.
        self.dtype = resolve_dtype("fp32" if dtype in (None, "auto") else dtype, self.device)
        self.batch_size = batch_size
        self.normalize = normalize
        self.model = load_pretrained(
            st.SentenceTransformer,
            model,
            "sentence embedding model",
            device=self.device,
            trust_remote_code=trust_remote_code,
        )
        if self.model.dtype != self.dtype:
            self.model.to(self.dtype)
        self.model.eval()

    @property
    def dimension(self) -> int:
        """Length of one embedding."""
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get()
        return int(dim) if dim is not None else int(self.embed(["."]).shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)
