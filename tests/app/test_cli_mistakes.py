"""A first-time user's mistakes: each one gets one clear line (file or flag, and the fix), a
non-zero exit code and no traceback, before any work is done or any run folder is made."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.cli import app
from spti.testing.example_images import write_example_folder

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "private_faces"


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


@pytest.fixture
def private(tmp_path: Path) -> Path:
    return write_example_folder(tmp_path / "private", num_people=2, images_per_person=2, size=32)


def synth(private: Path, out: Path, *extra: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["synthesize", str(private), "--output", str(out), "--quiet", *extra], env=env)


def one_line_error(result, *needles: str) -> str:
    """The command failed with exactly one ``error:`` line holding every needle, and no traceback."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {exc!r}\n{result.output}"
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


# -- 1. epsilon inf -----------------------------------------------------------------------------
def test_epsilon_inf_runs_and_every_output_says_not_dp(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = synth(EXAMPLES, out, "--preset", "smoke", "--epsilon", "inf")
    assert result.exit_code == 0, result.output
    final = result.output.strip().splitlines()[-1]
    assert final.startswith("released 8 images")
    assert "NOT differentially private" in final
    assert "warning: epsilon is infinite: this release is NOT differentially private" in result.output
    privacy = json.loads((out / "release" / "privacy.json").read_text())
    assert privacy["differentially_private"] is False
    assert any("NOT differentially private" in w for w in privacy["warnings"])
    report = (out / "release" / "report.html").read_text()
    assert re.search(r'<p class="[^"]*\bnotdp\b[^"]*">NOT DIFFERENTIALLY PRIVATE', report)  # the red box

    resumed = synth(EXAMPLES, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    final = resumed.output.strip().splitlines()[-1]
    assert "NOT differentially private" in final
    assert "epsilon is infinite" in resumed.output  # the warning again, not only the summary


# -- 2. the whole plan is checked before any work ---------------------------------------------
def test_num_samples_above_population_is_refused_before_any_work(private: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("--preset", "smoke", "--num-samples", "50", "--population-size", "4", "--variation-folds", "2")
    result = synth(private, out, *args)
    one_line_error(result, "--num-samples 50", "--population-size", "12")
    assert not out.exists()  # the obvious retry is never blocked by a half-made run folder
    again = synth(private, out, *args)  # and the same mistake gets the same line, not "already holds a run"
    one_line_error(again, "--num-samples 50")


def test_check_plan_accepts_the_presets_and_names_sizes(private: Path, tmp_path: Path) -> None:
    from spti.config import resolve_config
    from spti.errors import SptiError
    from spti.plan_check import check_plan

    check_plan(resolve_config(preset="smoke"), private, tmp_path / "new")
    cfg = resolve_config(preset="smoke", overrides={"num_samples": 50, "population_size": 4, "variation_folds": 2})
    with pytest.raises(SptiError, match="--num-samples"):
        check_plan(cfg, private, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_resume_of_a_run_whose_plan_cannot_work_is_one_line(private: Path, tmp_path: Path) -> None:
    from spti.config import resolve_config
    from spti.rundir import RunDirectory

    # a run folder made by an older spti that did not check the plan
    cfg = resolve_config(preset="smoke", overrides={"num_samples": 50, "population_size": 4, "variation_folds": 2})
    RunDirectory(tmp_path / "old").create(cfg)
    result = synth(private, tmp_path / "old", "--resume")
    one_line_error(result, "--num-samples 50", "new --output")


# -- 3. paths, flags, config files, devices, keys ---------------------------------------------
def test_output_is_a_file(private: Path, tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("x")
    one_line_error(synth(private, target, "--preset", "smoke"), str(target), "is a file")
    assert target.read_text() == "x"


def test_output_under_a_read_only_folder(private: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the immutable-folder test covers root)")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        one_line_error(synth(private, parent / "run", "--preset", "smoke"), str(parent), "cannot write")
    finally:
        parent.chmod(0o755)


def test_output_on_a_read_only_file_system(private: Path) -> None:
    target = Path("/sys/spti-test-run")
    if not Path("/sys").is_dir() or _can_mkdir(target):
        pytest.skip("no read-only /sys here")
    one_line_error(synth(private, target, "--preset", "smoke"), "/sys", "cannot write")


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


@pytest.mark.parametrize("where", ["parent", "output"])
def test_output_in_an_immutable_folder(private: Path, tmp_path: Path, where: str) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    made = subprocess.run(["chattr", "+i", str(frozen)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i does not work in this sandbox: {made.stderr.strip()}")
    try:
        out = frozen / "run" if where == "parent" else frozen
        one_line_error(synth(private, out, "--preset", "smoke"), str(frozen), "cannot write")
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)
    assert list(frozen.iterdir()) == []


def test_delta_not_a_number(private: Path, tmp_path: Path) -> None:
    one_line_error(synth(private, tmp_path / "run", "--preset", "smoke", "--delta", "tiny"), "--delta", "'tiny'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ('epsilon = "two"', ("epsilon", "a number", '"two"')),
        ('num_samples = "8"', ("num_samples", "an integer", '"8"', "without quotes")),
        ("iterations = [2, 3]", ("iterations", "an integer", "[2, 3]")),
        ("[privacy]\ndelta = [1e-6]", ("delta", "a number")),
        ("seed = 1.5", ("seed", "an integer")),
        ("batch_size = true", ("batch_size", "an integer")),
        ("voting = 3", ("voting", "a string")),
    ],
)
def test_wrong_types_in_a_config_file(private: Path, tmp_path: Path, line: str, needles: tuple[str, ...]) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(line + "\n")
    result = synth(private, tmp_path / "run", "--preset", "smoke", "--config", str(config))
    one_line_error(result, str(config), *needles)
    assert not (tmp_path / "run").exists()


def test_good_types_in_a_config_file_still_load(tmp_path: Path) -> None:
    from spti.config import resolve_config

    config = tmp_path / "ok.toml"
    config.write_text('epsilon = "inf"\ndelta = "auto"\nstrength = 0.5\nvote_render_size = 64\nmax_words = 30\n')
    cfg = resolve_config(preset="smoke", config_file=config)
    assert cfg.epsilon == float("inf") and cfg.delta is None and cfg.strength == [0.5]
    config.write_text("epsilon = 2\nstrength = [0.5, 0.25]\n")
    assert resolve_config(preset="smoke", config_file=config).epsilon == 2.0


def test_device_cuda_without_cuda(private: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = synth(private, tmp_path / "run", "--preset", "smoke", "--device", "cuda")
    one_line_error(result, "no CUDA device: use --device cpu or auto")
    assert not (tmp_path / "run").exists()


def test_device_cuda_is_not_checked_when_no_local_torch_model_runs(private: Path, tmp_path: Path, monkeypatch) -> None:
    from spti.config import resolve_config
    from spti.plan_check import check_plan

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cfg = resolve_config(preset="openai", overrides={"device": "cuda"})  # every model hosted, wavelet features
    check_plan(cfg, private, tmp_path / "run")


def test_missing_api_key_for_openai(private: Path, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None}
    result = synth(private, tmp_path / "run", "--preset", "openai", env=env)
    one_line_error(result, "OPENAI_API_KEY", "caption")
    assert not (tmp_path / "run").exists()


def test_missing_api_key_env_of_one_role(private: Path, tmp_path: Path) -> None:
    config = tmp_path / "roles.toml"
    config.write_text(
        '[models.llm]\nprovider = "openai"\nmodel = "gpt-4o-mini"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "SPTI_TEST_LLM_KEY"\n'
    )
    result = synth(
        private, tmp_path / "run", "--preset", "smoke", "--config", str(config), env={"SPTI_TEST_LLM_KEY": None}
    )
    one_line_error(result, "SPTI_TEST_LLM_KEY", "llm")
    assert not (tmp_path / "run").exists()


def test_output_inside_the_private_folder_writes_nothing_there(private: Path) -> None:
    before = sorted(p.relative_to(private) for p in private.rglob("*"))
    result = synth(private, private / "run", "--preset", "smoke")
    one_line_error(result, "inside the private folder", "outside")
    assert sorted(p.relative_to(private) for p in private.rglob("*")) == before


def test_output_inside_the_private_folder_for_caption(private: Path) -> None:
    result = runner.invoke(app, ["caption", str(private), "--output", str(private / "run"), "--preset", "smoke"])
    one_line_error(result, "inside the private folder")
    assert not (private / "run").exists()
