"""`spti budget`: the published numbers, JSON output, defaults and clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from spti.cli import app

runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["budget", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_golden_noise_multiplier_json() -> None:
    out = run_json("--epsilon", "1", "--delta", "1e-5", "--iterations", "10", "--count-share", "0")
    assert out["noise_multiplier"] == pytest.approx(11.797, abs=1e-3)
    assert out["epsilon"] == 1.0
    assert out["delta"] == 1e-5
    assert out["iterations"] == 10
    assert out["gdp_mu"] == pytest.approx(math.sqrt(10) / out["noise_multiplier"])
    assert out["count_noise_multiplier"] is None


def test_default_plan_includes_the_dp_unit_count() -> None:
    out = run_json("--epsilon", "1", "--delta", "1e-5", "--iterations", "10")
    sigma, sigma_c = out["noise_multiplier"], out["count_noise_multiplier"]
    assert 11.797 < sigma < 11.797 * 1.011  # 2% of μ² for the count: about 1% more noise per round
    assert out["gdp_mu"] == pytest.approx(math.sqrt(10 / sigma**2 + 1 / sigma_c**2))
    assert out["achieved_epsilon"] <= 1.0


def test_default_delta_from_num_private_and_signal_warning() -> None:
    out = run_json("--epsilon", "1", "--iterations", "10", "--num-private", "2000", "--population", "14000")
    assert out["delta"] == pytest.approx(1 / (2000 * math.log(2000)))
    assert out["expected_votes_per_candidate"] == pytest.approx(2000 / 14000)
    assert "signal below noise" in out["warning"]
    strong = run_json("--epsilon", "8", "--iterations", "2", "--num-private", "100000", "--population", "1000")
    assert strong["warning"] is None


def test_infinite_epsilon_no_noise() -> None:
    assert run_json("--epsilon", "inf", "--delta", "1e-5")["noise_multiplier"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "0", "--delta", "1e-5"], "epsilon must be > 0"),
        (["--epsilon", "1"], "--num-private"),
        (["--epsilon", "1", "--delta", "0.1", "--num-private", "100"], "1/N"),
        (["--epsilon", "1", "--delta", "2"], "delta must be in"),
    ],
)
def test_bad_input_is_one_clear_error(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["budget", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_console_script_human_output() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spti.cli", "budget", "--epsilon", "1", "--delta", "1e-5", "--count-share", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "11.7973" in out.stdout


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "sys.argv=['spti','--help']\n"
        "from spti.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "names=('torch','transformers','diffusers','openai','dp_accounting','scipy')\n"
        "heavy=[m for m in names if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
