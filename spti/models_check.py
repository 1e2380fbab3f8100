"""Which models a run needs, whether each is on this machine, and how to fetch the missing ones.

Everything here works without the network: a Hugging Face id is looked up in the local cache
(``snapshot_download(local_files_only=True)`` / ``try_to_load_from_cache``), a path on disk, and a
hosted role needs nothing downloaded. Nothing imports torch or transformers, so a check takes well
under a second. Only :func:`download_missing` (``spti models download``) talks to the hub.

Offline handling: :func:`hub_offline` says whether the hub cannot be used (``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE``, or the hub's host refuses one TCP connection within 3 s), and
:func:`use_offline_mode` then turns on the hub client's offline mode for the whole process, so
loading a cached model never waits through the client's retry loop ("Retrying in 8s").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spti.config import RunConfig

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINOV2 = "facebook/dinov2-small"
DEFAULT_X4_UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
REAL_ESRGAN_URLS = {
    4: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    2: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
}
# repositories whose files the hub serves only after the licence is accepted on the model page
GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/", "stabilityai/stable-diffusion-3")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")

# what each status means to a run
CACHED, LOCAL, BUILTIN, HOSTED, MISSING = "cached", "local path", "built-in", "hosted", "missing"


# --------------------------------------------------------------------------------------------
# The hub: offline or not, decided without minutes of retries
# --------------------------------------------------------------------------------------------
def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline_env() -> bool:
    """Whether offline mode is asked for (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, or already on)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return any(_true(os.environ.get(v)) for v in OFFLINE_VARIABLES)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (cached for the process). With a proxy configured a
    direct connection proves nothing, so the hub is assumed reachable and the normal load decides."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:
        return True
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether nothing can come from the hub: offline mode is set, or its host does not answer."""
    return hub_offline_env() or not hub_reachable()


_SET_BY_PROBE: list[bool] = []  # non-empty once use_offline_mode turned offline mode on itself


def offline_reason() -> str:
    if _SET_BY_PROBE or not hub_offline_env():
        return "the Hugging Face hub is unreachable"
    return "HF_HUB_OFFLINE is set"


def use_offline_mode() -> bool:
    """Turn on the hub client's offline mode for this process when the hub cannot be used.

    Sets ``HF_HUB_OFFLINE=1`` (for libraries imported later) and the flag of an already imported
    ``huggingface_hub`` (which transformers, diffusers and sentence-transformers consult on every
    call), so a cached model loads at once and a missing one fails at once. Returns whether the
    process is offline now. Online, nothing changes (missing models are downloaded as usual).
    """
    if hub_offline_env():
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    _SET_BY_PROBE.append(True)
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def resolve_hub_model(model: str, what: str, option: str) -> tuple[str | None, str | None]:
    """``(what to load, None)``, or ``(None, why it is skipped)`` for a model id that cannot load here.

    A local folder is used as it is. A hub id already in the Hugging Face cache becomes its cached
    snapshot folder, so loading it touches no network. An id that is not cached is skipped at once
    when offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, or the hub's host does not answer
    within 3 s) instead of letting the hub client retry for a minute; online it is downloaded.
    """
    if _looks_like_path(model) or Path(model).expanduser().exists():
        return model, None
    snapshot = cached_snapshot(model)
    if snapshot is not None:
        return str(snapshot), None
    use = option if option.endswith("PATH") else f"{option} PATH"
    hint = f"download it ({_fetch_command(model).strip('`')}) or pass {use}"
    if hub_offline_env() and not _SET_BY_PROBE:
        return None, f"{what} '{model}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}"
    if _SET_BY_PROBE or not hub_reachable():
        return None, f"{what} '{model}' is not in the Hugging Face cache and the hub is unreachable: {hint}"
    return model, None


def image_features_offline_reason(spec: str, option: str = "--features") -> str | None:
    """Why the image embedder ``spec`` cannot load here at once (a hub model not cached while
    offline), or ``None`` when it can be tried. Weight-free and file-based specs are left to the loader."""
    name, _, arg = spec.partition(":")
    model = {"clip": arg or DEFAULT_CLIP, "dinov2": arg or DEFAULT_DINOV2}.get(name)
    if model is None:
        return None
    what = "CLIP model" if name == "clip" else "DINOv2 model"
    return resolve_hub_model(model, what, f"{option} {name}:PATH")[1]


# --------------------------------------------------------------------------------------------
# One model's status
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStatus:
    """One model a run needs: its role, what it is named, where it is (or why not) and how to get it."""

    role: str
    model: str
    status: str  # cached | local path | built-in | hosted | missing
    detail: str = ""
    fetch: str | None = None  # the command that fetches it on a connected machine
    repo_id: str | None = None  # a hub repository spti models download can fetch
    filename: str | None = None  # one file of it (GGUF), else the whole snapshot
    url: str | None = None  # a weights file from a release page

    @property
    def missing(self) -> bool:
        return self.status == MISSING

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self) -> str:
        """The one-line problem of a missing model, with the command that fetches it."""
        line = f"{self.role} model {self.model}: {self.detail}"
        return f"{line}; fetch it: {self.fetch}" if self.fetch else line


def _is_gated(repo_id: str) -> bool:
    return repo_id.lower().startswith(GATED_PREFIXES)


def _fetch_command(repo_id: str, filename: str | None = None) -> str:
    cmd = f"hf download {repo_id}" + (f" {filename}" if filename else "")
    if _is_gated(repo_id):
        return (
            f"accept the licence on the model page first (https://huggingface.co/{repo_id}), "
            f"then `hf auth login` and `{cmd}`"
        )
    return f"`{cmd}`"


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.sep + os.sep in model


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _snapshot_problem(folder: Path) -> str | None:
    """Why a cached snapshot cannot load (no weights, a diffusers pipeline without its denoiser), or None."""
    index = folder / "model_index.json"
    if index.is_file():
        import json

        try:
            components = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its model_index.json is unreadable"
        for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
            value = components.get(name)
            if isinstance(value, list) and value[0] is not None and not _has_weights(folder / name):
                return f"the cached copy has no {name} weights (an interrupted download?)"
        return None
    if not _has_weights(folder):
        return "the cached copy holds no weights file (an interrupted download?)"
    return None


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repository, without any network call; ``None`` if absent."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, a malformed id (HFValidationError), …
        return None


def hub_model_status(role: str, model: str, *, gguf: bool = False) -> ModelStatus:
    """A Hugging Face id, a local directory, or (``gguf``) a GGUF file: where it is on this machine."""
    if gguf and model.lower().endswith(".gguf"):
        return _gguf_status(role, model)
    path = Path(model).expanduser()
    if path.exists():
        return ModelStatus(role, model, LOCAL, str(path.resolve()))
    if _looks_like_path(model):
        return ModelStatus(
            role, model, MISSING, f"the local path {model} does not exist (save a model there with save_pretrained)"
        )
    snapshot = cached_snapshot(model)
    if snapshot is not None:
        problem = _snapshot_problem(snapshot)
        if problem is None:
            return ModelStatus(role, model, CACHED, str(snapshot), repo_id=model)
        return ModelStatus(role, model, MISSING, problem, fetch=_fetch_command(model), repo_id=model)
    return ModelStatus(
        role,
        model,
        MISSING,
        f"not in the Hugging Face cache ({hub_cache_dir()})",
        fetch=_fetch_command(model),
        repo_id=model,
    )


def _gguf_status(role: str, model: str) -> ModelStatus:
    from spti.backends.local._common import split_gguf  # no torch: a small pure function
    from spti.errors import SptiError

    try:
        source, filename = split_gguf(model)
    except SptiError as exc:
        return ModelStatus(role, model, MISSING, str(exc))
    folder = Path(source).expanduser()
    if folder.is_dir():
        found = folder / str(filename)
        if found.is_file():
            return ModelStatus(role, model, LOCAL, str(found.resolve()))
        return ModelStatus(role, model, MISSING, f"the GGUF file {found} does not exist")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, str(filename))
    except Exception:
        cached = None
    if isinstance(cached, str):
        return ModelStatus(role, model, CACHED, cached, repo_id=source, filename=filename)
    return ModelStatus(
        role,
        model,
        MISSING,
        f"the GGUF file {filename} of {source} is not in the Hugging Face cache ({hub_cache_dir()})",
        fetch=_fetch_command(source, filename),
        repo_id=source,
        filename=filename,
    )


def _file_status(role: str, model: str, path: str | None, what: str, url: str, flag: str) -> ModelStatus:
    name = url.rsplit("/", 1)[-1]
    fetch = f"`curl -L -o {name} {url}`, then pass {flag}"
    if not path or path == "None":
        return ModelStatus(role, model, MISSING, f"no {what} weights file given", fetch=fetch, url=url)
    found = Path(path).expanduser()
    if found.is_file():
        return ModelStatus(role, model, LOCAL, str(found.resolve()))
    return ModelStatus(role, model, MISSING, f"the {what} weights file {path} does not exist", fetch=fetch, url=url)


def _hosted(cfg: RunConfig, role: str, model: str) -> ModelStatus:
    spec = cfg.model_spec(role)
    from spti.backends.openai.helpers import describe_endpoint

    endpoint = describe_endpoint(cfg.endpoint_base_url(spec))
    if spec.endpoints:  # a fleet: each endpoint's own variable, else $OPENAI_API_KEY
        variables = dict.fromkeys(f"${e.api_key_env or 'OPENAI_API_KEY'}" for e in spec.endpoints)
        return ModelStatus(role, model, HOSTED, f"{endpoint}, keys in {', '.join(variables)} (nothing to download)")
    key = spec.api_key_env or "OPENAI_API_KEY"
    return ModelStatus(role, model, HOSTED, f"{endpoint}, key in ${key} (nothing to download)")


# --------------------------------------------------------------------------------------------
# What a run needs
# --------------------------------------------------------------------------------------------
def needed_roles(cfg: RunConfig, done: Iterable[str] = ()) -> list[str]:
    """The model roles the rest of a run uses, in the order they load; ``done`` names finished stages."""
    done = set(done)
    roles: list[str] = []
    if cfg.voting == "text" and "caption" not in done:
        roles.append("caption")
    if "evolve" not in done:
        roles += ["llm", "text_embedding"] if cfg.voting == "text" else ["llm", "image", "image_features"]
    # the render stage can always run again (spti render with new settings)
    roles.append("release_image" if cfg.separate_release_model else "image")
    if cfg.upscaler not in ("none", "lanczos") and cfg.upscale > 1:
        roles.append("upscaler")
    return list(dict.fromkeys(roles))


def role_status(cfg: RunConfig, role: str) -> ModelStatus:
    """Where the model of ``role`` is on this machine (no network)."""
    if role == "image_features":
        return image_features_status(cfg.image_embedder, role=role)
    if role == "upscaler":
        if cfg.upscaler == "realesrgan":
            url = REAL_ESRGAN_URLS.get(cfg.upscale, REAL_ESRGAN_URLS[4])
            return _file_status(
                role,
                cfg.upscaler_model or "Real-ESRGAN",
                cfg.upscaler_model,
                "Real-ESRGAN",
                url,
                "--upscaler-model PATH",
            )
        if cfg.upscaler == "sd-x4":
            return hub_model_status(role, cfg.upscaler_model or DEFAULT_X4_UPSCALER)
        return ModelStatus(role, cfg.upscaler, BUILTIN, "no model")
    name = cfg.release_model_name if role == "release_image" else getattr(cfg, _field(role))
    spec = cfg.model_spec(role)
    if spec.provider == "openai":
        return _hosted(cfg, role, spec.model)
    if name == "tiny":
        return ModelStatus(role, "tiny", BUILTIN, "a tiny random model built on the fly (outputs are noise)")
    return hub_model_status(role, str(name), gguf=role == "llm")


def image_features_status(spec: str, *, role: str = "image_features") -> ModelStatus:
    """An image embedder spec: ``wavelet``, ``clip[:ID]``, ``dinov2[:ID]``, ``inception:PATH``."""
    name, _, arg = spec.partition(":")
    if name == "wavelet":
        return ModelStatus(role, spec, BUILTIN, "weight-free wavelet features")
    if name == "clip":
        return hub_model_status(role, arg or DEFAULT_CLIP)
    if name == "dinov2":
        return hub_model_status(role, arg or DEFAULT_DINOV2)
    if name == "inception":
        return _file_status(
            role, spec, arg or None, "FID Inception-v3", INCEPTION_URL, "--image-embedder inception:PATH"
        )
    return ModelStatus(
        role, spec, MISSING, "unknown image embedder: use wavelet, clip[:ID], dinov2[:ID], inception:PATH"
    )


def _field(role: str) -> str:
    from spti.config import ROLE_FIELDS

    return ROLE_FIELDS[role]


def model_statuses(cfg: RunConfig, done: Iterable[str] = ()) -> list[ModelStatus]:
    """Every model the (rest of the) run needs, one per role, with its status."""
    return [role_status(cfg, role) for role in needed_roles(cfg, done)]


def check_models(cfg: RunConfig, *, offline: bool | None = None, done: Iterable[str] = ()) -> list[str]:
    """The problems of the models a run needs, one line each (empty: every model is there or fetchable).

    A weights file that is not on disk is always a problem. A hub model that is not cached is one
    only offline (``offline=None``: :func:`hub_offline` decides): online it is downloaded when it loads.
    Hosted roles are not checked here (their key variables are checked with the plan). No network call
    beyond the one reachability probe.
    """
    statuses = model_statuses(cfg, done)
    if offline is None:
        offline = any(s.missing and s.repo_id for s in statuses) and hub_offline()
    return [s.problem() for s in statuses if s.missing and (offline or not s.repo_id)]


def missing_models_message(statuses: Sequence[ModelStatus], *, offline: bool, resume_hint: bool = False) -> str:
    """One message naming every missing model with its fetch command, and what to do with the cache."""
    missing = [s for s in statuses if s.missing]
    why = f" ({offline_reason()})" if offline else ""
    lines = [f"{len(missing)} model(s) this run needs are not on this machine{why}:"]
    for s in missing:
        lines.append(f"  {s.role}: {s.model}: {s.detail}" + (f"\n      fetch: {s.fetch}" if s.fetch else ""))
    if any(s.repo_id for s in missing):
        lines.append(
            "On a connected machine run the hf commands (they fill its Hugging Face cache, $HF_HOME or "
            "~/.cache/huggingface), copy that folder here and point HF_HOME at it; HF_HUB_OFFLINE=1 skips hub lookups. "
            "`spti models check` lists them again."
        )
    if resume_hint:
        lines.append("Then run the same command with --resume.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# spti models download
# --------------------------------------------------------------------------------------------
def download_missing(statuses: Sequence[ModelStatus]) -> list[tuple[ModelStatus, str | None]]:
    """Fetch every missing hub model into the Hugging Face cache: ``(status, None)`` when it came,
    ``(status, why not)`` otherwise, one each. The hub is probed once first: unreachable, nothing is tried."""
    out: list[tuple[ModelStatus, str | None]] = []
    missing = [s for s in statuses if s.missing]
    blocked = None
    if any(s.repo_id for s in missing):
        if hub_offline_env() and not _SET_BY_PROBE:
            blocked = "HF_HUB_OFFLINE is set (unset it to download)"
        elif not hub_reachable():
            from huggingface_hub import constants

            blocked = f"the Hugging Face hub ({constants.ENDPOINT}) is unreachable from this machine"
    for s in missing:
        if not s.repo_id:
            out.append((s, f"spti does not fetch weights files; {s.fetch or s.detail}"))
            continue
        if blocked:
            out.append((s, f"{blocked}; on a connected machine: {s.fetch}"))
            continue
        try:
            from huggingface_hub import hf_hub_download, snapshot_download

            if s.filename:
                hf_hub_download(s.repo_id, s.filename)
            else:
                snapshot_download(s.repo_id)
            out.append((s, None))
        except Exception as exc:  # gated, not found, a dropped connection: one line each
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            out.append((s, f"{type(exc).__name__}: {first}; {s.fetch}"))
    return out
