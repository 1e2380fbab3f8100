"""Shared helpers of the local backends: device and dtype choice, model loading with clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from spti.errors import ModelNotFoundError, SptiError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def require(module: str, extra: str = "local") -> Any:
    """Import an optional dependency or explain which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SptiError(
            f"this backend needs the Python package '{module.split('.')[0]}': pip install 'spti[{extra}]'"
        ) from exc


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"`` → ``cuda`` when available, else ``mps``, else ``cpu``."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SptiError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/``"auto"`` → fp16 on CUDA (bf16 where supported and asked), fp32 on CPU/MPS."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise SptiError(f"unknown dtype {dtype!r}; use one of auto, fp32, fp16, bf16")
    return names[dtype]


def _looks_like_missing_model(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    needles = (
        "does not appear to have",
        "Can't load",
        "not a valid model identifier",
        "offline mode",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "Connection",
        "Max retries",
        "Temporary failure",
        "Name or service not known",
        "couldn't connect",
        "cannot find the requested files",
        "No such file",
        "404",
    )
    return isinstance(exc, OSError | FileNotFoundError) or any(n in text for n in needles)


def model_not_found(model: str, what: str, exc: BaseException | None = None) -> ModelNotFoundError:
    hint = (
        f"cannot load {what} '{model}': it is not a local directory and is not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and the hub is unreachable. "
        "Download it on a connected machine (huggingface-cli download MODEL) and point HF_HOME at that "
        "cache, or pass a local directory saved with save_pretrained."
    )
    if exc is not None:
        hint += f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return ModelNotFoundError(hint)


def load_pretrained(load: Callable[..., T], model: str | os.PathLike[str], what: str, **kwargs: Any) -> T:
    """Call ``load(model, **kwargs)`` (a ``from_pretrained``) and turn 'not found' into one clear error."""
    model = str(model)
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ModelNotFoundError(
            f"{what} path '{model}' does not exist; pass a directory saved with save_pretrained "
            "or a Hugging Face model id"
        )
    try:
        return load(model, **kwargs)
    except Exception as exc:
        if _looks_like_missing_model(exc):
            raise model_not_found(model, what, exc) from exc
        raise


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
