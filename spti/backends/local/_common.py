"""Shared helpers of the local backends: device and dtype choice, model loading with clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
        f"Download it on a connected machine (`hf download {model}`) and point HF_HOME at that "
        "cache, or pass a local directory saved with save_pretrained. Offline, set HF_HUB_OFFLINE=1 to skip "
        "the network retries."
    )
    if exc is not None:
        hint += f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return ModelNotFoundError(hint)


VERBOSE_ENV = "SPTI_VERBOSE"  # set by ``spti --verbose``: library logs and loading bars are shown again


def verbose_libraries() -> bool:
    """Whether the user asked to see the model libraries' own logs (``spti --verbose``, ``SPTI_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_libraries() -> None:
    """Silence transformers / diffusers chatter for the rest of the process, unless :func:`verbose_libraries`.

    Their logs drop to errors (no "Token indices sequence length is longer…", "the current text
    generation call has exceeded the model's predefined maximum length", CLIP truncation notices,
    "Loading weights" / "Writing model shards" bars), and their deprecation FutureWarnings are hidden.
    Hub download bars stay as they were (transformers' switch would turn them off too), so a download
    still shows its progress. spti's own warnings go through its reporter and are never touched.
    Idempotent and cheap; called where spti loads a local model.
    """
    if verbose_libraries():
        return
    import importlib
    import warnings

    hub_bars_off: bool | None = None
    try:
        from huggingface_hub.utils import are_progress_bars_disabled

        hub_bars_off = are_progress_bars_disabled()
    except ImportError:
        pass
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            lib = importlib.import_module(name)
        except ImportError:
            continue
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    if hub_bars_off is False:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    for module in ("diffusers", "transformers", "sentence_transformers"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
    # diffusers' deprecate() points its FutureWarning at the caller (stacklevel): match its wording too
    warnings.filterwarnings("ignore", message=r".*(is|are) deprecated and will be removed", category=FutureWarning)


def load_pretrained(load: Callable[..., T], model: str | os.PathLike[str], what: str, **kwargs: Any) -> T:
    """Call ``load(model, **kwargs)`` (a ``from_pretrained``) and turn 'not found' into one clear error.

    When the Hugging Face hub cannot be used (offline mode, or its host does not answer), the hub
    client's offline mode is switched on first (:func:`spti.models_check.use_offline_mode`): a cached
    model then loads without a network call and a missing one fails at once, never after minutes of
    retries. The libraries' loading chatter is silenced (:func:`quiet_libraries`).
    """
    from spti.models_check import use_offline_mode

    model = str(model)
    quiet_libraries()
    if not Path(model).expanduser().exists():
        use_offline_mode()
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


def split_gguf(model: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``(directory or repo id, GGUF file name)`` of a model spec; ``(spec, None)`` when it names no GGUF file.

    Accepted: a local ``path/to/model.gguf``; ``repo_id:file.gguf`` (a file in a Hugging Face repository, or
    in a local directory); anything else is returned unchanged. transformers loads GGUF through
    ``from_pretrained(directory_or_repo, gguf_file=name)`` and de-quantises the weights.
    """
    spec = str(model)
    if not spec.lower().endswith(".gguf"):
        return spec, None
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    head, sep, tail = spec.rpartition(":")
    # "C:/models/x.gguf" is a Windows path, not repo "C" + file
    if sep and head and tail and not (len(head) == 1 and tail[:1] in "\\/"):
        return head, tail
    if spec.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"GGUF file '{spec}' does not exist")
    parts = spec.split("/")
    if len(parts) >= 3:  # "org/repo/sub/file.gguf": a file inside a hub repository
        return "/".join(parts[:2]), "/".join(parts[2:])
    raise SptiError(
        f"cannot tell where the GGUF file '{spec}' is: pass a local path to the .gguf file or "
        "REPO_ID:FILE.gguf (e.g. HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q8_0.gguf)"
    )


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` where supported, else ``torch_dtype``.

    Recent diffusers deprecate ``torch_dtype``; older ones (>= 0.31, our floor) know only that name
    and would silently ignore ``dtype``, loading fp32 weights.
    """
    try:
        from diffusers.utils import deprecation_utils

        supports_dtype = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        supports_dtype = False
    return {"dtype": dtype} if supports_dtype else {"torch_dtype": dtype}


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype keyword of transformers' ``from_pretrained``: ``dtype`` from 4.56 on, else ``torch_dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_weights_file(path: str | Path, what: str, where: str) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch ``.pth`` without executing pickled code.

    ``.pth`` files go through ``torch.load(weights_only=True)`` (no arbitrary unpickling) with
    ``mmap`` so a large file is not copied into memory twice; files written by old torch versions
    cannot be memory-mapped and are read normally.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise SptiError(f"{what} weights file '{path}' does not exist; download it from {where} and pass its path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise SptiError(f"{what} weights file '{path}' is not a readable safetensors file: {exc}") from exc
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SptiError(
            f"{what} weights file '{path}' could not be read as a torch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from exc
    if not isinstance(data, Mapping):
        raise SptiError(f"{what} weights file '{path}' does not hold a state dict")
    return dict(data)


@contextmanager
def quiet_hf(*, logs: bool = True) -> Iterator[None]:
    """Hide transformers/diffusers progress bars (and, with ``logs``, their warnings) for a block.

    For loads and saves whose chatter is expected and useless to a user (a partial checkpoint
    loaded on purpose, tiny test models); hub download bars are not affected. Settings are
    restored afterwards, also for a library that is not installed.
    """
    import importlib

    saved: list[tuple[Any, int, bool]] = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            lib = importlib.import_module(name)
        except ImportError:
            continue
        saved.append((lib, lib.get_verbosity(), lib.is_progress_bar_enabled()))
        lib.disable_progress_bar()
        if logs:
            lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
