"""A role served by a fleet written in its TOML table: ``[models.<role>] endpoints = [...]``, each
endpoint with its own key variable and limits; resolved, saved, checked before any work, and used
by a real run against two loopback OpenAI-compatible servers that each accept only their own key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.backends.openai.endpoints import Endpoint
from spti.cli import app
from spti.config import config_from_saved, resolve_config
from spti.errors import SptiError
from spti.plan_check import check_api_keys
from spti.testing.example_images import write_example_folder

runner = CliRunner()
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
A, B = "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"

FLEET = f"""\
preset = "hybrid"
[models.llm]
provider = "openai"
model = "{LLAMA}"
api_key_env = "FLEET_KEY"
endpoints = [
  {{ base_url = "{A}", api_key_env = "KEY_A", max_concurrency = 4, name = "gpu1" }},
  {{ base_url = "{B}", requests_per_minute = 600 }},
]
"""


def _config(tmp_path: Path, body: str = FLEET) -> Path:
    f = tmp_path / "fleet.toml"
    f.write_text(body)
    return f


def test_an_endpoints_list_resolves_to_one_endpoint_each(tmp_path: Path) -> None:
    cfg = resolve_config(config_file=_config(tmp_path))
    spec = cfg.model_spec("llm")
    assert spec.provider == "openai" and spec.model == LLAMA
    # an entry without its own key variable takes the role's
    assert spec.endpoints == (
        Endpoint(A, api_key_env="KEY_A", max_concurrency=4, name="gpu1"),
        Endpoint(B, api_key_env="FLEET_KEY", requests_per_minute=600),
    )
    assert cfg.endpoint_base_url(spec) == f"{A},{B}"
    assert str(spec) == f"openai:{LLAMA}@{A},{B}"
    # a flag names the role whole: its endpoint replaces the file's fleet
    cfg = resolve_config(config_file=_config(tmp_path), overrides={"llm_model": "openai:m@http://127.0.0.1:11/v1"})
    assert cfg.model_spec("llm").endpoints == () and cfg.model_spec("llm").base_url == "http://127.0.0.1:11/v1"


def test_the_saved_config_keeps_the_fleet(tmp_path: Path) -> None:
    cfg = resolve_config(config_file=_config(tmp_path))
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml())
    again = config_from_saved(saved)
    assert again.model_spec("llm") == cfg.model_spec("llm")
    assert again.model_spec("caption") == cfg.model_spec("caption")


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (f'[{{ base_url = "{A}", api_key = "sk-123" }}]', "do not write API keys into config files"),
        (f'[{{ base_url = "{A}", timeout = 5 }}]', "unknown key 'timeout'"),
        (f'[{{ base_url = "{A}", api_key_env = "sk-abc" }}]', "never the key itself"),
        ('[{ api_key_env = "K" }]', "each endpoint needs base_url"),
        ("[]", "endpoints is a non-empty list of tables"),
        (f'"{A}"', "endpoints is a non-empty list of tables"),
        (f'[{{ base_url = "{A}", name = "x" }}, {{ base_url = "{B}", name = "x" }}]', "names must be distinct"),
        (f'[{{ base_url = "{A}", max_concurrency = 0 }}]', "max_concurrency must be at least 1"),
    ],
)
def test_bad_endpoints_name_the_table_and_the_fix(tmp_path: Path, entries: str, match: str) -> None:
    f = _config(tmp_path, f'[models.llm]\nprovider = "openai"\nmodel = "m"\nendpoints = {entries}\n')
    with pytest.raises(SptiError, match=match) as info:
        resolve_config(config_file=f)
    assert str(f) in str(info.value) and "[models.llm]" in str(info.value)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (f'provider = "openai"\nmodel = "m"\nbase_url = "{A}"\nendpoints = [{{ base_url = "{B}" }}]', "not both"),
        (f'provider = "local"\nmodel = "m"\nendpoints = [{{ base_url = "{B}" }}]', "a local model has no endpoint"),
    ],
)
def test_endpoints_conflicts_are_refused(tmp_path: Path, table: str, match: str) -> None:
    with pytest.raises(SptiError, match=match):
        resolve_config(config_file=_config(tmp_path, f"[models.llm]\n{table}\n"))


def test_every_key_variable_of_the_fleet_is_checked_before_any_work(tmp_path: Path, monkeypatch) -> None:
    cfg = resolve_config(config_file=_config(tmp_path))
    monkeypatch.delenv("KEY_A", raising=False)
    monkeypatch.setenv("FLEET_KEY", "sk-test-fleet")
    (problem,) = check_api_keys(cfg, ["llm"])
    assert "$KEY_A" in problem and "gpu1" in problem and "[models.llm]" in problem
    monkeypatch.setenv("KEY_A", "sk-test-a")
    assert check_api_keys(cfg, ["llm"]) == []
    monkeypatch.delenv("FLEET_KEY")
    (problem,) = check_api_keys(cfg, ["llm"])
    assert "$FLEET_KEY" in problem


# --------------------------------------------------------------------------------------------
# A run: the LLM on a fleet of two servers, each with its own key
# --------------------------------------------------------------------------------------------
SMALL = """\
min_words = 4
max_words = 24
word_count_std = 1.0
caption_max_tokens = 12
voting_size = 32
steps = 1
batch_size = 16
caption_model = "local:tiny"
image_model = "local:tiny"
[models.text_embedding]
provider = "local"
model = "tiny"
[models.llm]
provider = "openai"
model = "{model}"
endpoints = [
  {{ base_url = "{first}", api_key_env = "SPTI_TEST_KEY_1", name = "first" }},
  {{ base_url = "{second}", api_key_env = "SPTI_TEST_KEY_2", name = "second" }},
]
"""


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


def test_a_run_spreads_the_llm_over_its_fleet_with_each_endpoints_key(tmp_path: Path, monkeypatch) -> None:
    from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer

    monkeypatch.setenv("SPTI_TEST_KEY_1", "sk-test-one")
    monkeypatch.setenv("SPTI_TEST_KEY_2", "sk-test-two")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    private = write_example_folder(tmp_path / "private" / "faces", num_people=4, images_per_person=2, size=32)
    out = tmp_path / "run"
    with (
        LoopbackOpenAIServer(FaultConfig(api_key="sk-test-one", latency=0.02)) as first,
        LoopbackOpenAIServer(FaultConfig(api_key="sk-test-two", latency=0.02)) as second,
    ):
        config = tmp_path / "small.toml"
        config.write_text(SMALL.format(model=LLAMA, first=first.base_url, second=second.base_url))
        args = ["synthesize", str(private), "--output", str(out), "--quiet", "--preset", "hybrid"]
        args += ["--config", str(config), "--num-samples", "4", "--iterations", "2", "--population-size", "8"]
        args += ["--variation-folds", "2", "--render-size", "32"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        one, two = first.stats.snapshot(), second.stats.snapshot()
        # both replicas answered (each accepts only its own key: a wrong key would be a 401, and a failed run)
        assert one["requests"] > 0 and two["requests"] > 0, (one, two)
        assert one["by_status"].get("401", 0) == 0 and two["by_status"].get("401", 0) == 0

        privacy = json.loads((out / "release" / "privacy.json").read_text())
        assert privacy["models"]["llm"]["endpoint"] == f"{first.base_url}, {second.base_url}"
        assert privacy["models"]["llm"]["reads_private_data"] is False
        assert first.base_url not in json.dumps(privacy["private_data_sent_to"])
        saved = config_from_saved(out / "config.toml")
        assert [e.name for e in saved.model_spec("llm").endpoints] == ["first", "second"]
        assert "sk-test" not in (out / "config.toml").read_text()

        # a resume keeps the fleet and sends nothing more
        resumed = runner.invoke(app, ["synthesize", str(private), "--output", str(out), "--quiet", "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert first.stats.snapshot()["requests"] == one["requests"]
        assert second.stats.snapshot()["requests"] == two["requests"]


def test_the_documented_fleet_resolves(tmp_path: Path) -> None:
    """docs/openai.md's endpoints example means what the doc says: two keys of one provider."""
    import re

    doc = Path("docs/openai.md").read_text()
    section = doc[doc.index("## Endpoint fleets") :]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    spec = resolve_config(config_file=_config(tmp_path, block)).model_spec("llm")
    assert [e.api_key_env for e in spec.endpoints] == ["OPENAI_KEY_TEAM_A", "OPENAI_KEY_TEAM_B"]
    assert {e.requests_per_minute for e in spec.endpoints} == {5000}
