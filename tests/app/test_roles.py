"""Each model role on its own provider: the spec syntax, TOML tables, backward compatibility, and a
hybrid run with the captioner and the LLM on two real loopback OpenAI-compatible servers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.cli import app
from spti.config import (
    PRESETS,
    ROLE_FIELDS,
    ModelSpec,
    config_from_saved,
    parse_model_spec,
    resolve_config,
)
from spti.errors import SptiError
from spti.rundir import RunDirectory
from spti.testing.example_images import write_example_folder

runner = CliRunner()
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"


def specs(cfg) -> dict[str, str]:
    return {role: str(cfg.model_spec(role)) for role in ROLE_FIELDS}


# --------------------------------------------------------------------------------------------
# The syntax: [provider:]model[@base_url]
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("gpt-4o-mini", (None, "gpt-4o-mini", None)),
        ("openai:gpt-4o-mini", ("openai", "gpt-4o-mini", None)),
        (f"openai:{LLAMA}@http://gpu1:8000/v1", ("openai", LLAMA, "http://gpu1:8000/v1")),
        (f"openai:{LLAMA}@http://gpu1:8000/v1/", ("openai", LLAMA, "http://gpu1:8000/v1")),
        ("local:stabilityai/sdxl-turbo", ("local", "stabilityai/sdxl-turbo", None)),
        ("OpenAI:gpt-4o", ("openai", "gpt-4o", None)),
        # a prefix that is no provider stays in the name: Ollama tags, GGUF files, image embedders
        ("llama3:8b", (None, "llama3:8b", None)),
        ("openai:llama3:8b@http://127.0.0.1:11434/v1", ("openai", "llama3:8b", "http://127.0.0.1:11434/v1")),
        ("bartowski/SmolLM2-GGUF:smol.Q4_K_M.gguf", (None, "bartowski/SmolLM2-GGUF:smol.Q4_K_M.gguf", None)),
        ("local:clip:openai/clip-vit-base-patch32", ("local", "clip:openai/clip-vit-base-patch32", None)),
        ("inception:/w/pt.pth", (None, "inception:/w/pt.pth", None)),
        ("claude@20240229", (None, "claude@20240229", None)),
        ("m@https://user:pw@host.example/v1", (None, "m", "https://user:pw@host.example/v1")),
    ],
)
def test_parse_model_spec(text: str, parsed: tuple) -> None:
    assert parse_model_spec(text) == parsed


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"llm_model": "vllm:llama"}, "--llm-model.*'vllm' is not a provider; write openai:MODEL@URL"),
        ({"llm_model": "openai:llama@gpu1:8000/v1"}, "--llm-model.*must be an http\\(s\\) URL"),
        ({"caption_model": "openai:"}, "--caption-model.*no model after 'openai:'"),
        ({"caption_model": "openai:x@ftp://host/v1"}, "--caption-model.*after '@' must be an http\\(s\\) URL"),
        ({"image_model": "local:sdxl@http://gpu1:8000/v1"}, "--image-model.*a local model has no endpoint"),
        ({"image_embedder": "openai:wavelet"}, "--image-embedder.*image_features runs locally only"),
        ({"upscaler_model": "openai:x4"}, "--upscaler-model.*upscaler runs locally only"),
        ({"caption_model": "  "}, "--caption-model.*give a model name"),
    ],
)
def test_bad_specs_name_the_flag_and_the_fix(flags: dict, match: str) -> None:
    with pytest.raises(SptiError, match=match):
        resolve_config(preset="quick", overrides=flags)


def test_bad_spec_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    private = write_example_folder(tmp_path / "p", num_people=2, images_per_person=1, size=16)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["synthesize", str(private), "-o", str(out), "--preset", "smoke", "--llm-model", "vllm:x"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting: --llm-model"), result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing was created


def test_bare_names_keep_the_run_provider_and_base_url() -> None:
    cfg = resolve_config(
        preset="quick",
        overrides={"provider": "openai", "base_url": "http://h:1/v1", "caption_model": "gpt-4o-mini"},
    )
    spec = cfg.model_spec("caption")
    assert spec == ModelSpec("caption", "openai", "gpt-4o-mini")
    assert cfg.endpoint_base_url(spec) == "http://h:1/v1"
    # tiny models are built locally whatever the run's provider; image features never leave the machine
    assert cfg.model_spec("image_features").provider == "local"
    cfg = resolve_config(preset="openai", overrides={"image_model": "tiny"})
    assert str(cfg.model_spec("image")) == "local:tiny"
    # a URL implies the openai provider, even on a local run
    cfg = resolve_config(preset="quick", overrides={"llm_model": f"{LLAMA}@http://gpu1:8000/v1"})
    assert cfg.model_spec("llm") == ModelSpec("llm", "openai", LLAMA, "http://gpu1:8000/v1")


def test_hybrid_preset() -> None:
    cfg = resolve_config(preset="hybrid")
    assert specs(cfg) == {
        "caption": "openai:gpt-4o-mini",
        "llm": f"openai:{LLAMA}@http://localhost:8000/v1",
        "text_embedding": "local:sentence-transformers/sentence-t5-base",
        "image": "local:stabilityai/sdxl-turbo",
        "release_image": "local:stabilityai/sdxl-turbo",
        "upscaler": "local:lanczos",
        "image_features": "local:wavelet",
    }
    assert cfg.provider == "local" and cfg.voting == "text"
    assert cfg.caption_model == "gpt-4o-mini"  # the fields hold bare names for the rest of the code
    # --base-url moves the openai roles that name no endpoint of their own
    moved = resolve_config(preset="hybrid", overrides={"base_url": "http://proxy:4000/v1"})
    assert moved.endpoint_base_url(moved.model_spec("caption")) == "http://proxy:4000/v1"
    assert moved.endpoint_base_url(moved.model_spec("llm")) == "http://localhost:8000/v1"
    # a flag names its role whole: a bare name is the run's provider again (local)
    local = resolve_config(preset="hybrid", overrides={"caption_model": "HuggingFaceTB/SmolVLM-256M-Instruct"})
    assert local.model_spec("caption").provider == "local"


# --------------------------------------------------------------------------------------------
# TOML: [models.<role>] tables
# --------------------------------------------------------------------------------------------
def test_toml_tables(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(
        'preset = "quick"\n'
        "[models.caption]\n"
        'provider = "openai"\nmodel = "gpt-4o-mini"\napi_key_env = "CAPTION_KEY"\n'
        "[models.llm]\n"
        f'provider = "openai"\nmodel = "{LLAMA}"\nbase_url = "http://gpu1:8000/v1"\n'
        "[models.image]\n"
        'model = "stabilityai/sdxl-turbo"\n'
        "[models.release_image]\n"
        'provider = "local"\nmodel = "stabilityai/stable-diffusion-xl-base-1.0"\n'
    )
    cfg = resolve_config(config_file=f)
    assert cfg.model_spec("caption") == ModelSpec("caption", "openai", "gpt-4o-mini", None, "CAPTION_KEY")
    assert cfg.model_spec("llm") == ModelSpec("llm", "openai", LLAMA, "http://gpu1:8000/v1")
    assert str(cfg.model_spec("image")) == "local:stabilityai/sdxl-turbo"  # no provider: the run's
    assert cfg.release_model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.separate_release_model
    # a flag beats the file's table, whole (its key variable goes with it)
    cfg = resolve_config(config_file=f, overrides={"caption_model": "openai:gpt-4o"})
    assert cfg.model_spec("caption") == ModelSpec("caption", "openai", "gpt-4o")
    # a table beats the preset's flat field; an old [models] section of flat keys still works
    f.write_text('[models]\ncaption_model = "openai:gpt-4o-mini"\nllm_model = "local:tiny"\n')
    cfg = resolve_config(preset="quick", config_file=f)
    assert (str(cfg.model_spec("caption")), str(cfg.model_spec("llm"))) == ("openai:gpt-4o-mini", "local:tiny")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[models.captioner]\nmodel = "x"\n', r"\[models.captioner\]: unknown role; use one of caption, llm"),
        ('[models.caption]\nprovider = "openai"\n', r'\[models.caption\]: needs model = "..."'),
        ('[models.caption]\nmodel = "x"\napi_key = "sk-123"\n', "never write an API key in a file"),
        ('[models.caption]\nmodel = "x"\nprovider = "openai"\napi_key_env = "sk-abc"\n', "never the key itself"),
        ('[models.caption]\nmodel = "x"\nprovider = "vllm"\n', r"provider 'vllm'; use one of local, openai"),
        ('[models.caption]\nmodel = "openai:x"\n', "model names the model only"),
        ('[models.caption]\nmodel = "x"\nbase_url = "gpu1:8000"\n', "is not an http\\(s\\) URL"),
        ('[models.caption]\nmodel = "x"\nprovider = "local"\nbase_url = "http://h/v1"\n', "no endpoint"),
        ('[models.caption]\nmodel = "x"\ntemperature = "1"\n', "unknown key\\(s\\) temperature"),
        ('caption_model = "a"\n[models.caption]\nmodel = "b"\n', "name two models for one role; keep one"),
    ],
)
def test_toml_table_errors(tmp_path: Path, body: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(SptiError, match=match) as info:
        resolve_config(config_file=f)
    assert str(f) in str(info.value)


def test_toml_error_through_the_cli_is_one_line(tmp_path: Path) -> None:
    private = write_example_folder(tmp_path / "p", num_people=2, images_per_person=1, size=16)
    f = tmp_path / "bad.toml"
    f.write_text('[models.llm]\nmodel = "x"\nprovider = "vllm"\n')
    result = runner.invoke(app, ["synthesize", str(private), "-o", str(tmp_path / "r"), "--config", str(f)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "[models.llm]" in result.output, result.output


# --------------------------------------------------------------------------------------------
# Backward compatibility: old flags, old config files, runs made before per-role models
# --------------------------------------------------------------------------------------------
def test_old_flags_mean_what_they_meant() -> None:
    cfg = resolve_config(
        preset="quick",
        overrides={"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "caption_model": "gpt-4o-mini"},
    )
    for role in ("caption", "llm", "text_embedding", "image"):
        assert cfg.model_spec(role).provider == "openai"
        assert cfg.endpoint_base_url(cfg.model_spec(role)) == "http://127.0.0.1:9/v1"
    assert cfg.caption_model == "gpt-4o-mini"
    assert specs(resolve_config(preset="smoke"))["caption"] == "local:tiny"


@pytest.mark.parametrize("name", ["smoke", "quick", "paper", "openai"])
def test_example_config_files_still_resolve(name: str) -> None:
    cfg = resolve_config(config_file=Path("examples/configs") / f"{name}.toml")
    expected = "openai" if name == "openai" else "local"
    assert cfg.model_spec("caption").provider == expected
    assert cfg.model_spec("image_features").provider == "local"


@pytest.mark.parametrize("preset", PRESETS)
def test_saved_config_round_trips_with_role_tables(tmp_path: Path, preset: str) -> None:
    extra = {"image_embedder": "inception:/w/pt.pth"} if preset == "paper" else {}
    cfg = resolve_config(preset=preset, overrides=extra)
    run = RunDirectory(tmp_path / "run")
    run.create(cfg)
    text = run.config_path.read_text()
    assert "[models.caption]" in text and "sk-" not in text
    assert config_from_saved(run.config_path) == cfg


def _old_style(cfg) -> str:
    """config.toml as spti wrote it before per-role models: flat keys only, no [models.*] tables."""
    return cfg.to_toml().split("\n# each model role")[0] + "\n"


def test_resume_a_run_made_before_per_role_models(tmp_path: Path) -> None:
    cfg = resolve_config(preset="openai", overrides={"base_url": "http://127.0.0.1:9/v1", "image_model": "tiny"})
    run = RunDirectory(tmp_path / "run")
    run.create(cfg)
    run.config_path.write_text(_old_style(cfg))
    assert "[models" not in run.config_path.read_text()
    old = run.reopen({})
    assert specs(old) == specs(cfg)
    assert old.endpoint_base_url(old.model_spec("caption")) == "http://127.0.0.1:9/v1"
    # the same model, named bare or in full, is no change; another model or provider is refused
    assert run.reopen({"caption_model": "gpt-4o-mini", "llm_model": "openai:gpt-4o-mini"}) == old
    with pytest.raises(SptiError, match=r"cannot change caption-model .*'openai:gpt-4o-mini'.*'local:gpt-4o-mini'"):
        run.reopen({"caption_model": "local:gpt-4o-mini"})
    with pytest.raises(SptiError, match="cannot change llm-model"):
        run.reopen({"llm_model": "openai:gpt-4o"})
    # base_url stays an execution setting; the render stage may change its generator
    assert run.reopen({"base_url": "http://127.0.0.1:10/v1"}).base_url == "http://127.0.0.1:10/v1"
    rendered = run.reopen({"image_model": "openai:gpt-image-1"}, also_allowed=frozenset({"image_model"}))
    assert str(rendered.model_spec("image")) == "openai:gpt-image-1"


def test_resume_keeps_a_hybrid_run_as_it_started(tmp_path: Path) -> None:
    cfg = resolve_config(preset="hybrid")
    run = RunDirectory(tmp_path / "run")
    run.create(cfg)
    again = run.reopen({"caption_model": "openai:gpt-4o-mini", "llm_model": f"openai:{LLAMA}@http://localhost:8000/v1"})
    assert specs(again) == specs(cfg)
    with pytest.raises(SptiError, match="cannot change caption-model"):
        run.reopen({"caption_model": "gpt-4o-mini"})  # bare: the run's provider, local


# --------------------------------------------------------------------------------------------
# The factory: one backend per (endpoint, key variable), one request cache
# --------------------------------------------------------------------------------------------
def test_models_build_one_backend_per_endpoint_and_key(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("openai")
    from spti.backends.factory import Models

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-default")
    monkeypatch.setenv("SECOND_KEY", "sk-test-second")
    f = tmp_path / "c.toml"
    f.write_text(
        'preset = "quick"\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[models.caption]\nmodel = "gpt-4o-mini"\n'
        '[models.llm]\nprovider = "openai"\nmodel = "m"\nbase_url = "http://127.0.0.1:10/v1"\n'
        '[models.text_embedding]\nprovider = "openai"\nmodel = "e"\napi_key_env = "SECOND_KEY"\n'
        '[models.image]\nmodel = "i"\n'
    )
    cfg = resolve_config(config_file=f)
    run = RunDirectory(tmp_path / "run")
    run.create(cfg)
    models = Models(cfg, run)
    try:
        caption, llm, embed, image = models.captioner, models.llm, models.text_embedder, models.image_generator
        assert caption.backend is image.backend  # same endpoint, same key: one client, one set of limits
        assert llm.backend is not caption.backend and embed.backend is not caption.backend
        assert llm.backend.base_url == "http://127.0.0.1:10/v1"
        assert {id(b.cache) for b in (caption.backend, llm.backend, embed.backend)} == {id(models._cache)}
        assert Path(models._cache.path) == run.private / "requests.sqlite"
        assert models.endpoints == {"caption": "http://127.0.0.1:9/v1", "text_embedding": "http://127.0.0.1:9/v1"}
        usage = models.usage()
        assert set(usage["by_endpoint"]) == {
            "http://127.0.0.1:9/v1 ($OPENAI_API_KEY)",
            "http://127.0.0.1:9/v1 ($SECOND_KEY)",
            "http://127.0.0.1:10/v1",
        }
        assert usage["requests"] == 0
    finally:
        models.close()
    monkeypatch.delenv("SECOND_KEY")
    models = Models(cfg, run)
    with pytest.raises(SptiError, match=r"reads its API key from \$SECOND_KEY \(api_key_env\), which is not set"):
        _ = models.text_embedder
    models.close()


# --------------------------------------------------------------------------------------------
# A hybrid run: the captioner on one server, the LLM on another, renderer and embedder local
# --------------------------------------------------------------------------------------------
SMALL = """\
# the hybrid preset at the size of a test: tiny local models stand in for SDXL-Turbo and sentence-t5
min_words = 4
max_words = 24
word_count_std = 1.0
caption_max_tokens = 12
voting_size = 32
steps = 1
batch_size = 16
[models.text_embedding]
provider = "local"
model = "tiny"
"""


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


def _chat_bodies(server) -> list[dict]:
    return server.stats.recent_bodies("chat")


def _has_image(body: dict) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
        for m in body.get("messages", [])
    )


def test_hybrid_run_sends_each_role_to_its_own_server(tmp_path: Path, monkeypatch) -> None:
    from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer, count_images

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    private = write_example_folder(tmp_path / "private" / "faces", num_people=4, images_per_person=2, size=32)
    small = tmp_path / "small.toml"
    small.write_text(SMALL)
    out = tmp_path / "run"
    with (
        LoopbackOpenAIServer(FaultConfig(keep_bodies=100_000)) as captioner,
        LoopbackOpenAIServer(FaultConfig(keep_bodies=100_000)) as llm,
    ):
        args = ["synthesize", str(private), "--output", str(out), "--quiet", "--preset", "hybrid"]
        args += ["--config", str(small)]
        args += ["--caption-model", f"openai:gpt-4o-mini@{captioner.base_url}"]
        args += ["--llm-model", f"openai:{LLAMA}@{llm.base_url}", "--image-model", "local:tiny"]
        args += ["--num-samples", "4", "--iterations", "2", "--population-size", "4", "--variation-folds", "2"]
        args += ["--render-size", "32"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"private images will be sent to {captioner.base_url} for captioning" in result.output
        assert "private captions will be sent" not in result.output  # the embedder is local

        # each server received only its role's requests
        cap, gen = captioner.stats.snapshot(), llm.stats.snapshot()
        assert set(cap["by_endpoint"]) == {"chat"} and set(gen["by_endpoint"]) == {"chat"}
        assert cap["requests"] == 8  # one request per private image, no more
        cap_bodies, gen_bodies = _chat_bodies(captioner), _chat_bodies(llm)
        assert len(cap_bodies) == 8 and all(_has_image(b) and b["model"] == "gpt-4o-mini" for b in cap_bodies)
        assert all(count_images(b["messages"]) == 1 for b in cap_bodies)  # one private image per request
        assert gen_bodies and all(not _has_image(b) and b["model"] == LLAMA for b in gen_bodies)
        private_captions = [
            json.loads(line)["caption"] for line in (out / "private" / "captions.jsonl").read_text().splitlines()
        ]
        sent_to_llm = json.dumps(gen_bodies)
        assert all(c and c not in sent_to_llm for c in private_captions)

        # privacy.json: the caption stage sent private data to the caption server, nothing to the LLM server
        privacy = json.loads((out / "release" / "privacy.json").read_text())
        sent = privacy["private_data_sent_to"]
        assert sent["caption"] == {"caption": captioner.base_url}
        assert sent["evolve"] == {"text_embedding": "local"}
        assert llm.base_url not in json.dumps(sent)
        # and names every role's endpoint, saying which of them read private data
        models = privacy["models"]
        assert models["caption"] == {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "endpoint": captioner.base_url,
            "reads_private_data": True,
        }
        assert models["llm"]["endpoint"] == llm.base_url and models["llm"]["reads_private_data"] is False
        assert models["text_embedding"]["endpoint"] == "local"
        assert len(list((out / "release" / "images").glob("*.png"))) == 4

        # the one request cache holds both roles' answers; the saved config names each role, no key
        with sqlite3.connect(out / "private" / "requests.sqlite") as db:
            models_cached = {row[0] for row in db.execute("SELECT DISTINCT model FROM responses")}
        assert models_cached == {"gpt-4o-mini", LLAMA}
        saved = config_from_saved(out / "config.toml")
        assert str(saved.model_spec("caption")) == f"openai:gpt-4o-mini@{captioner.base_url}"
        assert str(saved.model_spec("llm")) == f"openai:{LLAMA}@{llm.base_url}"
        assert str(saved.model_spec("text_embedding")) == "local:tiny"
        assert "sk-test" not in (out / "config.toml").read_text()

        # a resumed finished run sends nothing to either server
        resumed = runner.invoke(app, ["synthesize", str(private), "--output", str(out), "--quiet", "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert captioner.stats.snapshot()["requests"] == cap["requests"]
        assert llm.stats.snapshot()["requests"] == gen["requests"]


def test_the_documented_examples_resolve(tmp_path: Path) -> None:
    """docs/openai.md's TOML example and README's command line mean what the docs say."""
    import re
    import shlex

    doc = Path("docs/openai.md").read_text()
    section = doc[doc.index("## One endpoint per role") :]
    toml_block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    f = tmp_path / "doc.toml"
    f.write_text(toml_block)
    cfg = resolve_config(config_file=f)
    assert cfg.model_spec("llm") == ModelSpec("llm", "openai", LLAMA, "http://gpu1:8000/v1", "VLLM_API_KEY")
    assert cfg.model_spec("caption").api_key_env == "OPENAI_API_KEY"
    readme = Path("README.md").read_text()
    command = re.search(r"### Per-role models.*?```bash\n(.*?)```", readme, re.S).group(1).replace("\\\n", " ")
    words = shlex.split(command)
    flags = {words[i].removeprefix("--").replace("-", "_"): words[i + 1] for i in range(len(words) - 1)}
    cfg = resolve_config(preset=flags["preset"], overrides={k: v for k, v in flags.items() if k.endswith("_model")})
    assert str(cfg.model_spec("llm")) == f"openai:{LLAMA}@http://gpu1:8000/v1"
    assert str(cfg.model_spec("image")) == "local:stabilityai/sdxl-turbo"
