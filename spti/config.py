"""Run configuration: presets, a TOML file, command-line flags (in rising precedence), validation.

The resolved configuration is saved in the run directory (``config.toml``) so that a run can be
inspected, reproduced and resumed with exactly the settings it started with.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from spti.errors import SptiError

Preset = Literal["smoke", "quick", "paper", "openai"]
PRESETS: tuple[str, ...] = ("smoke", "quick", "paper", "openai")


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
    temperature: float = 1.0
    top_p: float = 0.95
    # models
    provider: str = "local"
    base_url: str | None = None
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

    # -- io --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    def to_toml(self) -> str:
        lines = ["# spti run configuration (resolved: preset < config file < flags)"]
        for key, value in self.to_dict().items():
            if value is None:
                lines.append(f"# {key} = (default)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

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
        if isinstance(self.vote_render_size, str) and self.vote_render_size.isdigit():
            self.vote_render_size = int(self.vote_render_size)
        if self.vote_render_size != "native" and not (
            isinstance(self.vote_render_size, int) and self.vote_render_size >= 8
        ):
            raise bad(f"vote-render-size {self.vote_render_size!r}: use native or a side of at least 8 pixels")
        if self.release_steps is not None and self.release_steps < 1:
            raise bad(f"release-steps must be >= 1, got {self.release_steps}")
        if self.release_model == "":
            self.release_model = None
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
        """Whether released images come from another model than the vote renders."""
        return self.release_model_name != self.image_model

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
    return repr(value)


# Preset defaults: smaller for quick, the published settings for paper, hosted models for openai.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "smoke": dict(
        num_samples=8,
        iterations=2,
        population_size=8,
        variation_folds=2,
        strength=[0.5],
        min_words=4,
        max_words=24,
        caption_max_tokens=12,
        render_size=32,
        voting_size=32,
        steps=1,
        upscaler="lanczos",
        upscale=2,
        batch_size=16,
        caption_model="tiny",
        llm_model="tiny",
        embedding_model="tiny",
        image_model="tiny",
        image_embedder="wavelet",
        word_count_std=1.0,
    ),
    "quick": dict(
        num_samples=100,
        iterations=5,
        population_size=200,
        variation_folds=4,
        strength=[0.5],
        caption_model="HuggingFaceTB/SmolVLM-256M-Instruct",
        llm_model="HuggingFaceTB/SmolLM2-360M-Instruct",
        embedding_model="sentence-transformers/all-MiniLM-L6-v2",
        image_model="stabilityai/sd-turbo",
        image_embedder="wavelet",
        render_size=512,
        voting_size=256,
        upscaler="lanczos",
        upscale=4,
    ),
    "paper": dict(
        iterations=10,  # running.total_iterations: 10, textpe/configs/ordinary.yaml (DPITI, singleprocess)
        population_size=2000,  # running.num_samples: 2000, same file
        variation_folds=6,  # running.next_variation_api_fold: 6, same file
        strength=[0.5],  # running.blank_probabilities: 0.5, same file
        # the authors' variation: σ_w = 36, at least 25 words, no word cap (DPITI textpe/run_pe_fill_in_the_blanks.py)
        word_count_std=36.0,
        min_words=25,
        max_words=None,
        rephrase_fraction=0.0,
        caption_model="Qwen/Qwen2.5-VL-7B-Instruct",
        llm_model="meta-llama/Meta-Llama-3-8B-Instruct",
        embedding_model="sentence-transformers/sentence-t5-base",
        # Image voting as the authors run it. Sources: github.com/MarkGodrick/DPITI, branch singleprocess
        # (their newest code) unless noted; DPSDA = github.com/microsoft/DPSDA, the PE library they call.
        voting="image",  # run_pe_fill_in_the_blanks.py --voting default "image" (ImageVotingNN)
        # selection, keep-selected: PEPopulation(keep_selected=True, selection_mode="rank") there
        selection="rank",
        k=1,  # ImageVotingNN(num_nearest_neighbors=1) default, textpe/utils/histogram.py
        threshold=0.0,  # PEPopulation's histogram_threshold left at None: no clipping (DPSDA pe_population.py)
        lookahead=0,  # running.lookahead_degree: 0, textpe/configs/ordinary.yaml and voting.yaml
        image_model="stabilityai/sdxl-turbo",  # embedding.huggingface.model, textpe/configs/ordinary.yaml
        # hfpipe_embedding calls the SDXL pipeline with no size: SDXL-Turbo's own 512², textpe/utils/embedding.py
        vote_render_size="native",
        steps=4,  # num_inference_steps=4, textpe/utils/embedding.py (and textpe/config.json on main)
        guidance=0.0,  # guidance_scale=0.0, same places
        vote_seeds=1,  # one render per candidate, same place
        # renders shrunk by PIL bicubic to 256² before Inception (make_resizer(..., output_size=(256, 256)))
        # and the private side Resize(256)+CenterCrop(256) (textpe/utils/dataset.py, run_pe_image.py on main)
        voting_size=256,
        # clean-fid's InceptionV3W, 2048-d pool features, textpe/utils/embedding.py; needs inception:PATH
        image_embedder="inception",
        # The release: their README (main) scores "10,000+ 1024x1024 images generated by
        # stabilityai/stable-diffusion-xl-base-1.0"; SDXL-base at its native 1024². run_stable_diff.py
        # hard-codes SDXL-Turbo's 4 steps / guidance 0, which do not suit SDXL-base: its family default here.
        release_model="stabilityai/stable-diffusion-xl-base-1.0",
        render_size=1024,
        release_steps=None,
        release_guidance=None,
        # run_stable_diff.py renders every selected text (variation fold -1: population_size of them)
        num_samples=2000,
        # no super-resolution step in their code: the released images are SDXL-base's 1024² as drawn
        upscaler="none",
        upscale=1,
        batch_size=32,
    ),
    "openai": dict(
        provider="openai",
        num_samples=100,
        iterations=5,
        population_size=200,
        variation_folds=4,
        caption_model="gpt-4o-mini",
        llm_model="gpt-4o-mini",
        embedding_model="text-embedding-3-small",
        image_model="gpt-image-1",
        image_embedder="wavelet",
        voting="text",
        render_size=1024,
        voting_size=256,
        upscaler="none",
        upscale=1,
        concurrency=32,
    ),
}

FIELD_NAMES = frozenset(f.name for f in fields(RunConfig))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SptiError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SptiError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # allow [sections] for readability; keys are global
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(k for k in (k.replace("-", "_") for k in flat) if k not in FIELD_NAMES)
    if unknown:
        raise SptiError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in flat.items()}


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """preset defaults < config file < explicit flags (``None`` in overrides means 'not given')."""
    file_values = load_toml(config_file) if config_file else {}
    flag_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = flag_values.get("preset") or preset or file_values.get("preset") or "quick"
    if chosen not in PRESETS:
        raise SptiError(f"unknown preset {chosen!r}: use one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": chosen}
    values.update(PRESET_VALUES[chosen])
    values.update(file_values)
    values.update(flag_values)
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
    values = load_toml(path)
    if values.get("epsilon") == "inf":
        values["epsilon"] = math.inf
    return RunConfig(**values).validate()
