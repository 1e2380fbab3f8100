"""Offline and model availability: every missing model named at once, fast; `spti models`; quiet runs.

The hub is unreachable here on purpose (``HF_ENDPOINT`` points at a closed local port, and the HF
cache is an empty folder), which is the situation to handle. Only the tiny smoke models are local.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spti import models_check
from spti.config import resolve_config

QUICK_MODELS = (
    "HuggingFaceTB/SmolVLM-256M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "sentence-transformers/all-MiniLM-L6-v2",
    "stabilityai/sd-turbo",
)
NOISE = (
    "Loading weights",
    "Writing model shards",
    "Token indices sequence length is longer",
    "exceeded the model's predefined maximum length",
    "CLIP can only handle sequences",
    "Retrying in",
    "FutureWarning",
    "deprecated",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_models"


def spti_cli(*args: str, hf_home: Path, tiny_dir: Path | None = None, timeout: float = 300) -> tuple:
    """``spti ARGS`` in a fresh process on a machine whose hub is unreachable (not merely 'offline')."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPTI_VERBOSE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT="http://127.0.0.1:9", COLUMNS="200")
    if tiny_dir is not None:
        env["SPTI_TINY_MODEL_DIR"] = str(tiny_dir)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "spti.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - start


def fake_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A Hugging Face cache entry of ``repo_id`` holding ``files`` (as the hub client lays it out)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / ("a" * 40)
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("a" * 40)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# --------------------------------------------------------------------------------------------
# A run offline: every missing model at once, in seconds
# --------------------------------------------------------------------------------------------
def test_quick_preset_offline_fails_fast_naming_every_missing_model(tmp_path: Path) -> None:
    from spti.testing.example_images import write_example_folder

    private = write_example_folder(tmp_path / "faces", num_people=2, images_per_person=2, size=32)
    proc, seconds = spti_cli(
        "synthesize", str(private), "-o", str(tmp_path / "run"), "--preset", "quick", hf_home=tmp_path / "hf"
    )
    assert proc.returncode != 0
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr
    assert "the Hugging Face hub is unreachable" in proc.stderr
    for model in QUICK_MODELS:
        assert f"hf download {model}" in proc.stderr
    assert "HF_HOME" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr


def test_models_list_check_download(tmp_path: Path) -> None:
    listed, seconds = spti_cli("models", "list", "--preset", "quick", hf_home=tmp_path / "hf")
    assert listed.returncode == 0 and seconds < 15
    for role, model in zip(("caption", "llm", "text_embedding", "image"), QUICK_MODELS, strict=True):
        line = next(row for row in listed.stdout.splitlines() if row.strip().startswith(role))
        assert model in line and "missing" in line

    as_json, _ = spti_cli("models", "list", "--preset", "openai", "--json", hf_home=tmp_path / "hf")
    assert {m["status"] for m in json.loads(as_json.stdout)["models"]} == {"hosted"}

    checked, _ = spti_cli("models", "check", "--preset", "quick", hf_home=tmp_path / "hf")
    assert checked.returncode == 1
    assert all(f"hf download {m}" in checked.stderr for m in QUICK_MODELS)
    smoke, _ = spti_cli("models", "check", "--preset", "smoke", hf_home=tmp_path / "hf")
    assert smoke.returncode == 0, smoke.stderr

    fetched, seconds = spti_cli("models", "download", "--preset", "quick", hf_home=tmp_path / "hf")
    assert fetched.returncode == 1 and seconds < 15
    lines = [row for row in fetched.stderr.splitlines() if row.startswith("error:")]
    assert len(lines) == 4 and all("unreachable" in row for row in lines), fetched.stderr
    assert "Retrying" not in fetched.stderr


# --------------------------------------------------------------------------------------------
# Statuses, without the network
# --------------------------------------------------------------------------------------------
def test_statuses_of_cached_incomplete_local_and_gguf_models(hub_cache: Path, tmp_path: Path) -> None:
    fake_snapshot(hub_cache, "org/complete", {"config.json": "{}", "model.safetensors": "x"})
    fake_snapshot(hub_cache, "org/partial", {"config.json": "{}"})
    fake_snapshot(
        hub_cache,
        "org/pipe",
        {
            "model_index.json": json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["d", "V"]}),
            "unet/diffusion_pytorch_model.safetensors": "x",
        },
    )
    fake_snapshot(hub_cache, "org/gguf", {"m-q8_0.gguf": "x"})

    assert models_check.hub_model_status("llm", "org/complete").status == "cached"
    partial = models_check.hub_model_status("llm", "org/partial")
    assert partial.missing and "no weights" in partial.detail and partial.fetch == "`hf download org/partial`"
    pipe = models_check.hub_model_status("image", "org/pipe")
    assert pipe.missing and "vae" in pipe.detail
    assert models_check.hub_model_status("llm", "org/gguf:m-q8_0.gguf", gguf=True).status == "cached"
    gguf = models_check.hub_model_status("llm", "org/gguf:other.gguf", gguf=True)
    assert gguf.missing and gguf.fetch == "`hf download org/gguf other.gguf`"
    assert models_check.hub_model_status("llm", str(tmp_path)).status == "local path"
    assert models_check.hub_model_status("llm", "/no/such/model").missing
    gated = models_check.hub_model_status("llm", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert "accept the licence on the model page first" in gated.fetch


def test_check_models_names_every_missing_model_and_weights_file(hub_cache: Path, tmp_path: Path) -> None:
    from spti.plan_check import check_models

    quick = resolve_config(preset="quick")
    problems = check_models(quick)
    assert len(problems) == 4 and all(any(m in p for p in problems) for m in QUICK_MODELS)
    assert models_check.check_models(quick, offline=False) == []  # online they would be downloaded

    paper = resolve_config(
        preset="paper",
        overrides={
            "image_embedder": f"inception:{tmp_path / 'nope.pth'}",
            "upscaler": "realesrgan",
            "upscale": 4,
            "upscaler_model": str(tmp_path / "RealESRGAN_x4plus.pth"),
        },
    )
    offline = " ".join(check_models(paper))
    for needed in ("meta-llama/Meta-Llama-3-8B-Instruct", "stabilityai/sdxl-turbo", "stable-diffusion-xl-base-1.0"):
        assert needed in offline
    assert "accept the licence on the model page first" in offline
    files = models_check.check_models(paper, offline=False)  # weights files are problems online too
    assert len(files) == 2
    assert any("pt_inception-2015-12-05-6726825d.pth" in p and "nope.pth" in p for p in files)
    assert any("RealESRGAN_x4plus.pth" in p for p in files)
    assert "caption" not in models_check.needed_roles(paper)  # image voting captions nothing
    assert check_models(resolve_config(preset="smoke")) == []
    assert check_models(resolve_config(preset="openai")) == []


def test_quiet_libraries_keeps_logs_with_verbose(monkeypatch) -> None:
    import transformers.utils.logging as tlog

    from spti.backends.local._common import quiet_libraries

    monkeypatch.setenv("SPTI_VERBOSE", "1")
    tlog.set_verbosity_warning()
    quiet_libraries()
    assert tlog.get_verbosity() == tlog.WARNING
    monkeypatch.delenv("SPTI_VERBOSE")
    quiet_libraries()
    assert tlog.get_verbosity() == tlog.ERROR and not tlog.is_progress_bar_enabled()
    tlog.set_verbosity_warning()
    tlog.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Long descriptions: cut at a word boundary with the pipeline's own tokenizer, and counted
# --------------------------------------------------------------------------------------------
def test_long_prompts_are_cut_at_a_word_boundary_and_counted(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    from spti.backends.factory import Models

    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tiny_dir))
    models = Models(resolve_config(preset="smoke"), tmp_path)
    try:
        gen = models.image_generator
        tok = gen.pipe.tokenizer
        limit = gen.prompt_token_limit
        assert limit == tok.model_max_length
        long = " ".join(f"word{i % 7} blue chair" for i in range(60))
        fitted, cut = gen.fit_prompt(long)
        assert cut and long.startswith(fitted) and long[len(fitted)] == " "  # whole words only
        assert len(tok(fitted)["input_ids"]) <= limit < len(tok(long, verbose=False)["input_ids"])
        more = " ".join(long.split()[: len(fitted.split()) + 1])
        assert len(tok(more, verbose=False)["input_ids"]) > limit  # as many words as fit
        assert gen.fit_prompt("a red chair") == ("a red chair", False)
        gen.generate([long, "a red chair"], width=32, height=32)
        assert gen.truncated_prompts == 1
        assert gen.count_truncated([long, long, "short"]) == 2
    finally:
        models.close()


# --------------------------------------------------------------------------------------------
# A normal run is quiet; audit and evaluate use what is there offline
# --------------------------------------------------------------------------------------------
def test_smoke_run_is_quiet_records_truncations_and_audit_skips_offline(tmp_path: Path, tiny_dir: Path) -> None:
    from spti.testing.example_images import write_example_folder

    private = write_example_folder(tmp_path / "faces", num_people=3, images_per_person=2, size=32)
    run = tmp_path / "run"
    proc, _ = spti_cli(
        "synthesize", str(private), "-o", str(run), "--preset", "smoke", hf_home=tmp_path / "hf", tiny_dir=tiny_dir
    )
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr, noise
    record = json.loads((run / "state" / "render.json").read_text())
    assert isinstance(record["truncated_prompts"], int)

    audited, seconds = spti_cli("audit", str(run), hf_home=tmp_path / "hf", tiny_dir=tiny_dir)
    assert audited.returncode == 0, audited.stderr
    assert seconds < 60 and "Retrying" not in audited.stderr
    said = " ".join(audited.stderr.split())  # rich may wrap the line
    assert said.count("skipped the clip feature space") == 1 and "hf download openai/clip-vit-base-patch32" in said
    result = json.loads((run / "private" / "audit.json").read_text())
    assert set(result["features"]) == {"wavelet"} and "clip" in result["features_skipped"]
