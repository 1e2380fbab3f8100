"""Run configuration: presets, a TOML file, command-line flags (in rising precedence), validation.

The resolved configuration is saved in the run directory (``config.toml``) so that a run can be
inspected, reproduced and resumed with exactly the settings it started with. The model roles and
their TOML tables live in :mod:`spti.model_roles`, the presets in :mod:`spti.presets`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spti.errors import SptiError
from spti.model_roles import (
    FIELD_ROLES,
    LOCAL_ONLY_ROLES,
    ROLE_FIELDS,
    ROUTE_KEYS,
    ModelSpec,
    checked_spec,
    fleet_of,
    model_spec_with,
    parse_model_spec,
    read_model_tables,
    role_label,
)
from spti.presets import PRESET_VALUES, PRESETS, Preset

if TYPE_CHECKING:
    from spti.backends.openai.endpoints import Endpoint

# re-exported: callers import the run's roles and presets from here
__all__ = [
    "FIELD_NAMES",
    "FIELD_ROLES",
    "PRESETS",
    "PRESET_VALUES",
    "ROLE_FIELDS",
    "ModelSpec",
    "Preset",
    "RunConfig",
    "config_from_saved",
    "load_toml",
    "model_spec_with",
    "parse_model_spec",
    "resolve_config",
]


@dataclass
class RunConfig:
    """Every setting of a run. Field names are the TOML keys and (with dashes) the CLI flags."""

    preset: str = "quick"
    # privacy
    epsilon: float = 1.0
    delta: float | None = None  # None: 1/(B·ln B) for units_bound B, else 1e-6 (public: never from N)
    units_bound: int | None = None  # a public upper bound on the number of privacy units
    count_share: float = 0.02  # share of the budget (of μ² in Gaussian DP) for the DP count of units
    privacy_unit: str = "image"
    # output
    num_samples: int = 100
    seed: int = 0
    # PE
    iterations: int = 5
    voting: str = "text"
    population_size: int = 200  # kept per round; with population = "auto", the upper bound
    population: str = "fixed"  # fixed | auto: sized from the DP count of units (target_signal · σ votes each)
    target_signal: float = 2.0  # auto population: expected votes per candidate per round, in units of σ
    population_min: int = 8  # auto population: the lower bound of the kept per round
    max_private: int | None = None  # vote with a uniformly random subset of at most this many units
    seeding: str = "attributes"  # attributes: DP histogram of the captions' public attribute values; none
    seeding_share: float = 0.1  # share of the budget (of μ²) for the seeding release
    variation_folds: int = 4
    initial_population: int | None = None
    strength: list[float] = field(default_factory=lambda: [0.5])
    selection: str = "rank"
    k: int = 1
    threshold: float = 0.0
    lookahead: int = 0
    # text APIs
    domain: str = "generic"
    caption_max_tokens: int = 77
    word_count_std: float = 36.0  # σ_w of the target-length jitter (SPTI / Aug-PE)
    min_words: int = 25  # floor of the target length
    max_words: int | None = None  # optional cap on the target length; none by default, as the authors
    rephrase_fraction: float = 0.0
    # a random answer naming fewer than this share of its prompt's attribute values is regenerated
    # once, then replaced by the attribute template (0: off); see VariationSettings
    min_attribute_share: float = 0.5
    seeding_uniform_mix: float = 0.05  # with DP seeding, the uniform share of each key's value draws
    temperature: float = 1.0
    top_p: float = 0.95
    # models: each role names its model in its field below, as a spec ``[provider:]model[@base_url]``
    # (a bare name: the run's provider); ``models`` holds each role's resolved route (see ROLE_FIELDS)
    provider: str = "local"  # the provider of roles whose spec names none
    base_url: str | None = None  # the endpoint of openai roles whose spec names none
    caption_model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"
    llm_model: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    image_model: str = "stabilityai/sd-turbo"
    image_embedder: str = "wavelet"
    # rendering
    render_size: int = 512  # side of a released image before upscaling (flag also --release-size)
    voting_size: int = 256  # input side of the image feature extractor: vote renders and private images
    vote_render_size: int | str = "native"  # side vote candidates are drawn at; native: the generator's own
    vote_seeds: int = 1  # renders per candidate (image voting); its feature is their mean
    steps: int | None = None  # denoising steps of the vote generator (None: its family default)
    guidance: float | None = None
    release_render: str = "voted"  # image voting: release the vote render itself, or "rerender"
    release_model: str | None = None  # generator of the released images (None: image_model)
    release_steps: int | None = None  # None: steps (same model) or the release model's default
    release_guidance: float | None = None
    upscaler: str = "lanczos"
    upscale: int = 4
    upscaler_model: str | None = None
    # execution
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    concurrency: int = 32
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    executor: str = "local"  # local: models in this process; ray: on Ray actors (one per GPU), see spti.executors
    ray_address: str | None = None  # --executor ray: an existing cluster; None starts a local instance
    ray_workers: int | None = None  # --executor ray: actors (None: one per GPU of the cluster, else per CPU)
    # role -> {"provider", and where given "base_url", "api_key_env", "endpoints" (a list of tables)};
    # saved as [models.<role>] tables
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- io --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    def to_toml(self) -> str:
        lines = ["# spti run configuration (resolved: preset < config file < flags)"]
        for key, value in self.to_dict().items():
            if key == "models":
                continue  # tables come after the top-level keys
            if value is None:
                lines.append(f"# {key} = (default)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        lines.append("# each model role, resolved (no API keys: api_key_env names the variable that holds one)")
        for role in ROLE_FIELDS:
            if getattr(self, ROLE_FIELDS[role]) is None:
                continue
            spec = self.model_spec(role)
            lines.append(f"[models.{role}]")
            lines.append(f"provider = {_toml_value(spec.provider)}")
            lines.append(f"model = {_toml_value(spec.model)}")
            route = self.models.get(role, {})
            if spec.provider == "openai":
                if route.get("endpoints"):
                    lines.append("endpoints = [")
                    lines.extend(f"  {_toml_value(table)}," for table in route["endpoints"])
                    lines.append("]")
                elif route.get("base_url"):
                    lines.append(f"base_url = {_toml_value(route['base_url'])}")
                else:
                    lines.append("# base_url: the run's base_url ($OPENAI_BASE_URL, else https://api.openai.com/v1)")
                if route.get("api_key_env"):
                    lines.append(f"api_key_env = {_toml_value(route['api_key_env'])}")
                else:
                    lines.append("# api_key_env: OPENAI_API_KEY")
        return "\n".join(lines) + "\n"

    # -- model roles -------------------------------------------------------------------------
    def model_spec(self, role: str) -> ModelSpec:
        """The resolved spec of ``role`` (one of :data:`ROLE_FIELDS`): its field's
        ``[provider:]model[@base_url]`` over the route in ``models``, the run's provider and base_url.

        ``release_image`` without a ``release_model`` is the vote generator (``image``) itself."""
        if role not in ROLE_FIELDS:
            raise SptiError(f"unknown model role {role!r}: use one of {', '.join(ROLE_FIELDS)}")
        field_name = ROLE_FIELDS[role]
        value = getattr(self, field_name)
        if value is None and role == "release_image":
            return dataclasses.replace(self.model_spec("image"), role=role)
        if value is None:
            return ModelSpec(role, "local", self.upscaler if role == "upscaler" else "")
        where = role_label(role)
        provider, model, base_url = parse_model_spec(value, where=where)
        route = self.models.get(role, {})
        api_key_env = route.get("api_key_env")
        endpoints: tuple[Endpoint, ...] = ()
        if provider is None and base_url is None:  # a bare name: the route saved or given for the role
            provider, base_url = route.get("provider"), route.get("base_url")
            endpoints = fleet_of(route, where=f"[models.{role}]")
        if provider is None and (base_url is not None or endpoints):  # only openai models have an endpoint
            provider = "openai"
        if provider is None:
            provider = "local" if model == "tiny" or role in LOCAL_ONLY_ROLES else self.provider
        return checked_spec(ModelSpec(role, provider, model, base_url, api_key_env, endpoints), where)

    def endpoint_base_url(self, spec: ModelSpec) -> str | None:
        """The base URL(s) an openai role talks to: its own (comma-joined for a fleet), else the run's
        ``base_url`` (None: the default)."""
        return spec.where or self.base_url

    def _resolve_roles(self) -> None:
        """Check every role's spec; keep bare model names in the fields and the routes in ``models``."""
        routes: dict[str, dict[str, str]] = {}
        for role, field_name in ROLE_FIELDS.items():
            if getattr(self, field_name) is None:
                continue
            spec = self.model_spec(role)
            setattr(self, field_name, spec.model)
            route = {"provider": spec.provider}
            if spec.base_url:
                route["base_url"] = spec.base_url
            if spec.api_key_env:
                route["api_key_env"] = spec.api_key_env
            if spec.endpoints:
                route["endpoints"] = [e.as_table() for e in spec.endpoints]
            routes[role] = route
        unknown = sorted(set(self.models) - set(ROLE_FIELDS))
        if unknown:
            raise SptiError(f"invalid setting: models.{unknown[0]}: unknown role; use one of {', '.join(ROLE_FIELDS)}")
        self.models = routes

    def validate(self) -> RunConfig:
        def bad(msg: str) -> SptiError:
            return SptiError(f"invalid setting: {msg}")

        if self.preset not in PRESETS:
            raise bad(f"preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise bad(f"epsilon={self.epsilon}: must be > 0 (inf for no privacy)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise bad(f"delta={self.delta}: must be in (0, 1), or 'auto'")
        if self.units_bound is not None and self.units_bound < 3:
            raise bad(f"units-bound={self.units_bound}: must be >= 3 (a public upper bound on the privacy units)")
        if not 0 <= self.count_share < 1:
            raise bad(f"count-share={self.count_share}: must be in [0, 1) (0 releases no DP count of units)")
        if self.population not in ("fixed", "auto"):
            raise bad(f"population {self.population!r}: use fixed or auto")
        if self.population == "auto" and self.count_share <= 0:
            raise bad("population auto is sized from the DP count of units: count-share must be > 0")
        if not self.target_signal > 0 or self.population_min < 1:
            raise bad("target-signal must be > 0 and population-min >= 1")
        if self.max_private is not None and self.max_private < 3:
            raise bad(f"max-private={self.max_private}: must be >= 3")
        if self.seeding not in ("attributes", "none"):
            raise bad(f"seeding {self.seeding!r}: use attributes or none")
        if not 0 <= self.seeding_share < 1 or self.count_share + self.seeding_share >= 1:
            raise bad("seeding-share must be in [0, 1) and leave budget for the rounds with count-share")
        choices = {
            "privacy_unit": ("image", "folder"),
            "voting": ("text", "image"),
            "selection": ("rank", "sample"),
            "provider": ("local", "openai"),
            "upscaler": ("none", "lanczos", "realesrgan", "sd-x4"),
            "release_render": ("voted", "rerender"),
            "executor": ("local", "ray"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(f"{name.replace('_', '-')} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        positive = (
            "num_samples",
            "iterations",
            "population_size",
            "k",
            "render_size",
            "voting_size",
            "batch_size",
            "concurrency",
            "caption_max_tokens",
            "min_words",
            "vote_seeds",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.variation_folds < 1:
            raise bad("variation-folds must be >= 1")
        if self.max_words is not None and self.max_words < self.min_words:
            raise bad(f"max-words {self.max_words} is below min-words {self.min_words}")
        if math.isnan(self.word_count_std) or self.word_count_std < 0:
            raise bad(f"word-count-std must be >= 0, got {self.word_count_std}")
        if not 0 <= self.rephrase_fraction <= 1:
            raise bad(f"rephrase-fraction must be in [0, 1], got {self.rephrase_fraction}")
        for name in ("min_attribute_share", "seeding_uniform_mix"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if isinstance(self.vote_render_size, str) and self.vote_render_size.isdigit():
            self.vote_render_size = int(self.vote_render_size)
        if self.vote_render_size != "native" and not (
            isinstance(self.vote_render_size, int) and self.vote_render_size >= 8
        ):
            raise bad(f"vote-render-size {self.vote_render_size!r}: use native or a side of at least 8 pixels")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise bad(f"ray-workers must be >= 1, got {self.ray_workers}")
        if self.release_steps is not None and self.release_steps < 1:
            raise bad(f"release-steps must be >= 1, got {self.release_steps}")
        if self.release_model == "":
            self.release_model = None
        self._resolve_roles()
        if self.upscale not in (1, 2, 4):
            raise bad(f"upscale {self.upscale}: use 1, 2 or 4")
        if not self.strength or any(not 0 < s <= 1 for s in self.strength):
            raise bad(f"strength {self.strength}: each value is a mask probability in (0, 1]")
        if self.voting == "image" and self.image_embedder == "inception":
            raise bad(
                "image voting with the Inception embedder needs its weights file: "
                "--image-embedder inception:/path/to/pt_inception-2015-12-05-6726825d.pth (or use wavelet)"
            )
        if self.upscaler == "realesrgan" and not self.upscaler_model:
            raise bad(
                "upscaler realesrgan needs --upscaler-model PATH to RealESRGAN_x4plus weights (.pth or .safetensors)"
            )
        return self

    # -- the two image generators ----------------------------------------------------------
    @property
    def release_model_name(self) -> str:
        """The model that draws released images: ``release_model``, else the vote generator."""
        return self.release_model or self.image_model

    @property
    def separate_release_model(self) -> bool:
        """Whether released images come from another model than the vote renders (or the same model
        from another provider or endpoint)."""
        if self.release_model_name != self.image_model:
            return True
        if self.release_model is None:
            return False
        release, image = self.model_spec("release_image"), self.model_spec("image")
        return (release.provider, release.base_url) != (image.provider, image.base_url)

    @property
    def release_steps_used(self) -> int | None:
        """Steps of a re-rendered release: ``release_steps``, else the vote steps (same model) or the
        release model's own default (``None``; a Turbo model's 4 steps would spoil SDXL-base)."""
        if self.release_steps is not None:
            return self.release_steps
        return None if self.separate_release_model else self.steps

    @property
    def release_guidance_used(self) -> float | None:
        if self.release_guidance is not None:
            return self.release_guidance
        return None if self.separate_release_model else self.guidance

    def keeps_vote_renders(self) -> bool:
        """Whether the evolve stage keeps each candidate's render to release it: image voting, release
        ``voted``, the same generator and settings for both, one render per round (no lookahead)."""
        return (
            self.voting == "image"
            and self.release_render == "voted"
            and not self.separate_release_model
            and self.release_steps in (None, self.steps)
            and self.release_guidance in (None, self.guidance)
            and self.lookahead == 0
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (an endpoint of a fleet)
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


FIELD_NAMES = frozenset(f.name for f in fields(RunConfig))


# what a TOML value of each annotation may be: (description, check)
_NUMBER = ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
_INTEGER = ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
_STRING = ("a string", lambda v: isinstance(v, str))
_TYPE_CHECKS: dict[str, tuple[str, Any]] = {
    "float": _NUMBER,
    "int": _INTEGER,
    "str": _STRING,
    "int | str": ("an integer or a string", lambda v: _INTEGER[1](v) or isinstance(v, str)),
    "list[float]": (
        "a number or a list of numbers",
        lambda v: _NUMBER[1](v) or (isinstance(v, list) and bool(v) and all(_NUMBER[1](x) for x in v)),
    ),
}
# strings a numeric setting also takes
_WORDS = {"epsilon": ("inf",), "delta": ("auto", "default")}


def _check_type(key: str, value: Any, where: str) -> None:
    """One line naming the file, the key and the type it expects, for a value of the wrong type."""
    annotation = next((f.type for f in fields(RunConfig) if f.name == key), None)
    if not isinstance(annotation, str) or key == "models":
        return
    optional = annotation.endswith(" | None")
    description, check = _TYPE_CHECKS.get(annotation.removesuffix(" | None"), (None, None))
    if check is None or check(value) or value in _WORDS.get(key, ()):
        return
    words = "".join(f" or {w!r}" for w in _WORDS.get(key, ()))
    shown = _toml_value(value) if isinstance(value, bool | str | list) else repr(value)
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    hint = ", or leave it out for the default" if optional else ""
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?", value.strip()):
        hint += f"; write {key} = {value.strip()} without quotes"
    raise SptiError(f"{where}: {key} must be {description}{words}, got {shown} ({kind}){hint}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """A config file's settings. ``[sections]`` are for readability (their keys are global), except
    ``[models.<role>]`` tables, which name a role's provider, model, base_url and api_key_env."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SptiError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SptiError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for key, value in data.items():
        if key == "models" and isinstance(value, dict):
            for name, inner in value.items():  # [models.<role>] tables, or flat keys in a [models] section
                (tables if isinstance(inner, dict) else flat)[name] = inner
        elif isinstance(value, dict):  # allow [sections] for readability; keys are global
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(k for k in (k.replace("-", "_") for k in flat) if k not in FIELD_NAMES or k == "models")
    if unknown:
        raise SptiError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    values = {k.replace("-", "_"): v for k, v in flat.items()}
    for key, value in values.items():
        _check_type(key, value, f"config file {path}")
    if tables:
        values["models"] = read_model_tables(tables, f"config file {path}")
    for role, table in values.get("models", {}).items():
        field_name = ROLE_FIELDS[role]
        if field_name in values:
            _, model, _ = parse_model_spec(values[field_name], where=f"config file {path}: {field_name}")
            if model != table["model"]:
                raise SptiError(
                    f"config file {path}: {field_name} = {values[field_name]!r} and [models.{role}] model = "
                    f"{table['model']!r} name two models for one role; keep one of them"
                )
    return values


def _merge_levels(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Settings of rising precedence merged into one; a role is named whole at each level: a
    ``[models.<role>]`` table or a ``<field> = "[provider:]model[@base_url]"`` replaces the role's
    provider, model, endpoint and key variable given below it."""
    values: dict[str, Any] = {}
    routes: dict[str, dict[str, Any]] = {}
    for level in levels:
        level = dict(level)
        tables = level.pop("models", None) or {}
        for field_name in FIELD_ROLES:
            if field_name in level:
                routes.pop(FIELD_ROLES[field_name], None)
        for role, table in tables.items():
            level[ROLE_FIELDS[role]] = table["model"]
            routes[role] = {k: table[k] for k in ROUTE_KEYS if table.get(k)}
        values.update(level)
    values["models"] = routes
    return values


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """preset defaults < config file < explicit flags (``None`` in overrides means 'not given')."""
    file_values = load_toml(config_file) if config_file else {}
    flag_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    flag_values.pop("models", None)
    chosen = flag_values.get("preset") or preset or file_values.get("preset") or "quick"
    if chosen not in PRESETS:
        raise SptiError(f"unknown preset {chosen!r}: use one of {', '.join(PRESETS)}")
    values = _merge_levels([{"preset": chosen, **PRESET_VALUES[chosen]}, file_values, flag_values])
    values["preset"] = chosen
    if values.get("delta") in ("auto", "default"):
        values["delta"] = None
    if isinstance(values.get("epsilon"), str):
        values["epsilon"] = float(values["epsilon"])
    if isinstance(values.get("strength"), int | float):
        values["strength"] = [float(values["strength"])]
    try:
        cfg = RunConfig(**values)
    except TypeError as exc:
        raise SptiError(f"invalid configuration: {exc}") from None
    return cfg.validate()


def config_from_saved(path: str | Path) -> RunConfig:
    """A run's saved ``config.toml``; one written before per-role models (no ``[models.*]``
    tables) resolves every role through its ``provider`` and ``base_url``, as it ran."""
    values = _merge_levels([load_toml(path)])
    if values.get("epsilon") == "inf":
        values["epsilon"] = math.inf
    return RunConfig(**values).validate()
