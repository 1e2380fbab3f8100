"""Build the models a run needs from its configuration, lazily (only what a stage uses is loaded).

Every role (caption, llm, text_embedding, image, release_image, upscaler, image_features) is built
from its own :class:`~spti.config.ModelSpec`: a Hugging Face id or local directory (``local``), a
model of an OpenAI-compatible server (``openai``, at the role's ``base_url`` with the key in its
``api_key_env``), or ``"tiny"``: a tiny randomly-initialised local model built on the fly into the
run's state folder (the offline ``smoke`` preset; its outputs are noise). Roles on the same server
with the same key share one client; all of them share the run's one request cache.
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
    from spti.config import ModelSpec, RunConfig
    from spti.rundir import RunDirectory

DEFAULT_KEY_ENV = "OPENAI_API_KEY"

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINOV2 = "facebook/dinov2-small"


class Models:
    """The run's models, each built on first use. ``endpoints`` records where private data went.

    ``run`` is the run directory: tiny models are built in its ``state/``, and the hosted
    providers' request cache lives in its ``private/`` (it holds captions of private images
    verbatim and embeddings of private captions). A plain folder instead of a run directory is
    taken as the state folder, and then nothing is cached (there is no private folder to put it in).

    ``endpoints`` maps the roles that see private data (caption, text_embedding, image_features)
    to where it went: an endpoint URL or ``"local"``. The llm and image roles see public text only
    and are never listed there.
    """

    PRIVATE_ROLES = ("caption", "text_embedding", "image_features")

    def __init__(self, config: RunConfig, run: RunDirectory | str | Path) -> None:
        from spti.rundir import RunDirectory

        self.cfg = config
        self.run: RunDirectory | None = run if isinstance(run, RunDirectory) else None
        if isinstance(run, RunDirectory):
            self.state_dir = run.state
            self.private_dir: Path | None = run.private
        else:
            self.state_dir = Path(run)
            self.private_dir = None
        self._checked = False
        self.endpoints: dict[str, str] = {}
        self._backends: dict[tuple[Any, ...], Any] = {}
        self._cache: Any = None

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

        from spti.backends.local._common import quiet_libraries

        quiet_libraries()  # building them writes shards and loads weights: no bars for that
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

    def check_available(self) -> None:
        """Before the first local model of a run loads: every model the rest of the run needs, at once.

        Offline (``HF_HUB_OFFLINE``, or the hub's host does not answer), a hub model that is not in
        the cache, or a weights file that is not on disk, stops the run here with one error naming
        every missing model and the command that fetches it; the hub client is then put in offline
        mode for the process, so cached models load without retries. Online, uncached models are
        downloaded as they load. Checked once, only for a run directory (finished stages need
        nothing), so an evaluation that borrows one role is not stopped by another role's model.
        """
        if self._checked:
            return
        self._checked = True
        from spti import models_check

        if self.run is None:
            return
        done = [s for s in ("caption", "evolve") if self.run.stage_done(s)]
        statuses = models_check.model_statuses(self.cfg, done)
        offline = any(s.repo_id for s in statuses) and models_check.use_offline_mode()
        missing = [s for s in statuses if s.missing and (offline or not s.repo_id)]
        if missing:
            from spti.errors import ModelNotFoundError

            raise ModelNotFoundError(models_check.missing_models_message(missing, offline=offline, resume_hint=True))

    def _local_kwargs(self) -> dict[str, Any]:
        return {"device": self.cfg.device, "dtype": self.cfg.dtype, "batch_size": self.cfg.batch_size}

    @property
    def request_cache_path(self) -> Path | None:
        """``RUN_DIR/private/requests.sqlite``: answers hold private captions, so never in ``state/``."""
        return self.private_dir / "requests.sqlite" if self.private_dir is not None else None

    def spec(self, role: str) -> ModelSpec:
        """The resolved spec of ``role`` (provider, model, endpoint, key variable)."""
        return self.cfg.model_spec(role)

    def base_url_of(self, spec: ModelSpec) -> str:
        """The server root an openai role talks to (its own, the run's ``base_url``, or the default)."""
        from spti.backends.openai_api import resolve_base_url

        return resolve_base_url(self.cfg.endpoint_base_url(spec))

    def endpoint_of(self, role: str) -> str:
        """Where ``role`` sends its inputs: ``"local"`` or the endpoint URL (no credentials). Needs no network."""
        spec = self.spec(role)
        if spec.provider != "openai":
            return "local"
        from spti.backends.openai_api import describe_endpoint

        return describe_endpoint(self.cfg.endpoint_base_url(spec))

    def backend_for(self, spec: ModelSpec) -> Any:
        """The client of ``spec``'s server: one per distinct (base URL, key variable), with its own
        connection pool, limits and usage, all writing the run's one request cache."""
        from spti.backends.openai_api import OpenAIBackend
        from spti.backends.request_cache import RequestCache

        url = self.base_url_of(spec)
        key_env = spec.api_key_env or DEFAULT_KEY_ENV
        # a fleet from an endpoints list is its own client: its entries carry their own keys and limits
        identity = (url, spec.endpoints) if spec.endpoints else (url, key_env)
        backend = self._backends.get(identity)
        if backend is not None:
            return backend
        api_key = None  # the default variable: the backend reads it (and needs it for api.openai.com only)
        if spec.api_key_env and not spec.endpoints:  # a fleet's entries already name their variables
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise SptiError(
                    f"the {spec.role} model {spec} reads its API key from ${spec.api_key_env} (api_key_env), "
                    f"which is not set; export {spec.api_key_env}=... or change [models.{spec.role}] api_key_env"
                )
        if self._cache is None and self.request_cache_path is not None:
            self._cache = RequestCache(self.request_cache_path)  # keys include the endpoint: one file serves all
        where: dict[str, Any] = {"endpoints": list(spec.endpoints)} if spec.endpoints else {"base_url": url}
        backend = OpenAIBackend(
            **where,
            api_key=api_key,
            cache=self._cache,
            max_concurrency=self.cfg.concurrency,
            requests_per_minute=self.cfg.requests_per_minute,
            tokens_per_minute=self.cfg.tokens_per_minute,
        )
        self._backends[identity] = backend
        return backend

    @property
    def openai_backend(self) -> Any:
        """The client of the run's default endpoint (``--base-url``, ``$OPENAI_API_KEY``)."""
        from spti.config import ModelSpec

        return self.backend_for(ModelSpec("default", "openai", "-"))

    def openai_host(self) -> str:
        """The run's default endpoint (``--base-url``); each role's own is :meth:`endpoint_of`."""
        from spti.backends.openai_api import describe_endpoint

        return describe_endpoint(self.cfg.base_url)

    def _private_role(self, role: str) -> ModelSpec:
        """The spec of a role that sees private data, noted in :attr:`endpoints` before it is built."""
        self.endpoints[role] = self.endpoint_of(role)
        return self.spec(role)

    # -- the executor (--executor ray: local models run on Ray actors, see spti.executors) -----------
    @cached_property
    def executor(self) -> Any:
        """Where local models of the captioner, image generators, upscaler and image embedder run."""
        from spti.executors import make_executor

        return make_executor(self.cfg)

    @property
    def remote(self) -> bool:
        """Whether local models run on an executor's workers (through proxies) instead of in this process."""
        return self.cfg.executor != "local"

    def _proxy(self, role: str) -> Any:
        """The stand-in of ``role``'s local model: batches go to the executor, whose workers build the
        model from its spec; tiny models are built here first, once, for every worker to read."""
        from spti.executors import RoleSpec
        from spti.executors.base import TINY_KINDS
        from spti.executors.proxies import proxy_for

        tiny = self.spec(role).model == "tiny" and role in TINY_KINDS
        tiny_dir = self._tiny(TINY_KINDS[role]).parent if tiny else None
        if role in self.PRIVATE_ROLES:
            self.endpoints[role] = self.executor.where
        return proxy_for(self.executor, RoleSpec.of(role, self.cfg, tiny_dir))

    def parallel_batch(self, batch: int) -> int:
        """Items a pipeline loop hands over at once: ``batch``, times the workers of a remote executor
        (the proxies cut it back into batches of the model's size, one per worker)."""
        return batch * self.executor.workers if self.remote else batch

    # -- the models ------------------------------------------------------------------------
    @cached_property
    def captioner(self) -> Captioner:
        spec = self._private_role("caption")
        if spec.provider == "openai":
            from spti.backends.openai_api import OpenAICaptioner

            return OpenAICaptioner(spec.model, backend=self.backend_for(spec))
        if self.remote:
            return self._proxy("caption")
        self.check_available()
        from spti.backends.local.text import HFCaptioner

        model = self._tiny("vlm") if spec.model == "tiny" else spec.model
        return HFCaptioner(str(model), **self._local_kwargs())

    @cached_property
    def llm(self) -> TextGenerator:
        """The random / variation API: public prompts and synthetic texts only."""
        spec = self.spec("llm")
        if spec.provider == "openai":
            from spti.backends.openai_api import OpenAITextGenerator

            return OpenAITextGenerator(spec.model, backend=self.backend_for(spec))
        self.check_available()
        from spti.backends.local.text import HFTextGenerator

        model = self._tiny("lm") if spec.model == "tiny" else spec.model
        return HFTextGenerator(str(model), **self._local_kwargs())

    @cached_property
    def text_embedder(self) -> TextEmbedder:
        spec = self._private_role("text_embedding")
        if spec.provider == "openai":
            from spti.backends.openai_api import OpenAITextEmbedder

            return OpenAITextEmbedder(spec.model, backend=self.backend_for(spec))
        self.check_available()
        from spti.backends.local.text import SentenceTransformerEmbedder

        model = self._tiny("sentence") if spec.model == "tiny" else spec.model
        return SentenceTransformerEmbedder(str(model), device=self.cfg.device, batch_size=max(self.cfg.batch_size, 32))

    def _image_generator(self, spec: ModelSpec) -> ImageGenerator:
        if spec.provider == "openai":
            from spti.backends.openai_api import OpenAIImageGenerator

            return OpenAIImageGenerator(spec.model, backend=self.backend_for(spec))
        if self.remote:
            return self._proxy(spec.role)
        self.check_available()
        from spti.backends.local.images import DiffusersImageGenerator

        model = self._tiny("sd") if spec.model == "tiny" else spec.model
        return DiffusersImageGenerator(str(model), **self._local_kwargs())

    @cached_property
    def image_generator(self) -> ImageGenerator:
        """The vote generator (image voting renders every candidate with it), and by default the release one."""
        return self._image_generator(self.spec("image"))

    @cached_property
    def release_image_generator(self) -> ImageGenerator:
        """The generator of released images: ``release_model`` (e.g. SDXL-base at 1024² while SDXL-Turbo
        votes), built on first use; the vote generator itself when the two are the same model."""
        if not self.cfg.separate_release_model:
            return self.image_generator
        return self._image_generator(self.spec("release_image"))

    @cached_property
    def image_embedder(self) -> ImageEmbedder:
        """Image features are always computed locally: private images never leave the machine here."""
        spec = self._private_role("image_features")
        if self.remote:
            return self._proxy("image_features")
        self.check_available()
        return build_image_embedder(spec.model, device=self.cfg.device, batch_size=self.cfg.batch_size)

    @cached_property
    def upscaler(self) -> Upscaler | None:
        cfg = self.cfg
        if cfg.upscaler == "none" or cfg.upscale == 1:
            return None
        if self.remote:
            return self._proxy("upscaler")
        if cfg.upscaler != "lanczos":
            self.check_available()
        from spti.backends.local import upscale

        model = self.spec("upscaler").model if cfg.upscaler_model else None
        if cfg.upscaler == "lanczos":
            return upscale.LanczosUpscaler(scale=cfg.upscale)
        if cfg.upscaler == "realesrgan":
            return upscale.RealESRGANUpscaler(str(model), scale=cfg.upscale, device=cfg.device)
        return upscale.DiffusersX4Upscaler(
            model or "stabilityai/stable-diffusion-x4-upscaler",
            scale=cfg.upscale,
            device=cfg.device,
            dtype=cfg.dtype,
        )

    def usage(self) -> dict[str, Any]:
        """Requests, tokens and estimated cost of the hosted models used so far: the totals, and each
        endpoint's own report under ``by_endpoint`` (keyed by its URL, plus the key variable when one
        server is reached with two keys)."""
        if not self._backends:
            return {}
        urls = [url for url, _ in self._backends]
        by_endpoint: dict[str, Any] = {}
        for (url, key_env), backend in self._backends.items():
            name = url if urls.count(url) == 1 else f"{url} (${key_env})"
            by_endpoint[name] = backend.usage()
        reports = list(by_endpoint.values())
        totals: dict[str, Any] = {}
        for report in reports:
            for key, value in report.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        totals["cost_known"] = all(r.get("cost_known", True) for r in reports)
        totals["unpriced_models"] = sorted({m for r in reports for m in r.get("unpriced_models", [])})
        if len(reports) == 1:
            totals["endpoint"] = reports[0].get("endpoint")
            totals["by_model"] = reports[0].get("by_model", {})
        return {**totals, "by_endpoint": by_endpoint}

    def close(self) -> None:
        backends = list(self._backends.values())
        self._backends.clear()
        for model in {id(m): m for m in self.__dict__.values() if not isinstance(m, dict)}.values():
            close = getattr(model, "close", None)  # a shared generator closes once
            if callable(close) and model is not self._cache:
                close()
        for backend in backends:
            backend.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


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
