"""The cost plan (`spti plan`, `--dry-run`, `--max-cost`), image pricing and RUN_DIR/private/usage.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.backends.openai.usage import DEFAULT_PRICES, _UsageLedger, load_price_table, price_model_usage
from spti.cli import app
from spti.config import resolve_config
from spti.plan_cost import embed_requests, plan_run
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    return write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=4, images_per_person=2, size=32
    )


def test_plan_of_the_openai_preset_prints_roles_counts_cost_and_the_price_date() -> None:
    result = runner.invoke(app, ["plan", "--preset", "openai", "--num-private", "24"])
    assert result.exit_code == 0, result.output
    out = result.output
    date = load_price_table().date
    assert f"prices of {date}" in out and date.startswith("2026-")
    for role in ("caption", "llm", "text_embedding", "image"):
        assert any(line.startswith(role + " ") for line in out.splitlines()), role
    # 24 captions + 1000 random + 4 rounds x 800 variations + 69 embedding requests + 100 renders:
    # the 4,393 requests the run made
    assert "total: 4393 requests, 100 images, ~$" in out
    plan = json.loads(runner.invoke(app, ["plan", "--preset", "openai", "-N", "24", "--json"]).output)
    roles = {r["role"]: r for r in plan["by_role"]}
    assert roles["caption"]["requests"] == 24 and roles["llm"]["kinds"] == {"random": 1000, "vary": 3200}
    assert roles["image"]["images"] == 100 and roles["image"]["cost_usd"] > 10  # gpt-image-1 is the bill
    assert plan["cost_complete"] and plan["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in plan["by_role"]))


def test_unknown_prices_make_the_total_a_lower_bound_and_self_served_costs_nothing(tmp_path: Path) -> None:
    cfg = resolve_config(preset="openai", overrides={"llm_model": "some-new-model"})
    plan = plan_run(cfg, num_images=10)
    assert not plan.complete and "lower bound" in plan.total_text()
    assert any("price unknown" in line for line in plan.lines())
    hybrid = plan_run(resolve_config(preset="hybrid"), num_images=10)
    llm = next(r for r in hybrid.roles if r.role == "llm")
    assert llm.requests > 0 and llm.cost_usd == 0 and llm.priced  # localhost vLLM
    assert "image (stabilityai/sdxl-turbo)" in " ".join(hybrid.local_roles)
    table = tmp_path / "p.toml"
    table.write_text('date = "2026-12-02"\n[models."some-new-model"]\ninput_per_1m = 1.0\noutput_per_1m = 2.0\n')
    result = runner.invoke(
        app, ["plan", "--preset", "openai", "-N", "10", "--llm-model", "some-new-model", "--prices", str(table)]
    )
    assert result.exit_code == 0 and "prices of 2026-12-02" in result.output and "lower bound" not in result.output


def test_population_auto_is_planned_with_the_count_of_files() -> None:
    plan = plan_run(resolve_config(preset="openai", overrides={"population": "auto"}), num_images=24)
    assert any("public count of files" in n for n in plan.notes)


def test_max_cost_refuses_with_one_line_and_writes_nothing(private_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["synthesize", str(private_folder), "-o", str(out), "--preset", "openai", "--max-cost", "0.01"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "above --max-cost $0.01" in lines[0] and "~$" in lines[0]
    assert not out.exists()
    dry = runner.invoke(app, ["synthesize", str(private_folder), "-o", str(out), "--preset", "openai", "--dry-run"])
    assert dry.exit_code == 0 and "total: " in dry.output and not out.exists()


def test_an_image_gpt_image_1_did_not_meter_is_priced_by_size_and_never_silently_free() -> None:
    price = DEFAULT_PRICES["gpt-image-1"]
    ledger = _UsageLedger()
    ledger.add("gpt-image-1", requests=1)
    ledger.add("gpt-image-1", prompt_tokens=0, completion_tokens=0, images=1)  # a server that reports no usage
    counts = vars(ledger.snapshot()["gpt-image-1"])
    assert counts["unmetered_images"] == 1
    cost, known = price_model_usage("gpt-image-1", counts, price, image_size="1024x1024")
    assert known and cost == pytest.approx(0.167)  # quality auto priced as high
    cost, known = price_model_usage("gpt-image-1", counts, price, image_size="32x32")
    assert not known  # no price for that size: not known, never a claimed 0
    metered = {"requests": 1, "prompt_tokens": 100, "completion_tokens": 1056, "images": 1}
    cost, known = price_model_usage("gpt-image-1", metered, price, image_size="1024x1024")
    assert known and cost == pytest.approx((100 * 5 + 1056 * 40) / 1e6)  # tokens reported: tokens billed
    assert price_model_usage("x", {"requests": 1}, None) == (0.0, False)


def test_embed_requests_follow_the_batches() -> None:
    assert embed_requests(1000) == 16 and embed_requests(1000, cached_first=200) == 13 and embed_requests(24) == 1


def test_planned_requests_match_what_the_loopback_server_receives(
    private_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """A tiny openai-preset run against the loopback server: the plan's requests per endpoint are
    exactly what the server received; the tokens roughly; private/usage.json holds the same counts."""
    from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    out = tmp_path / "run"
    settings = ["--num-samples", "6", "--iterations", "3", "--population-size", "6", "--variation-folds", "2"]
    with LoopbackOpenAIServer(FaultConfig(latency=0.0)) as server:
        args = ["--preset", "openai", "--base-url", server.base_url, "--render-size", "32", *settings]
        planned = runner.invoke(app, ["plan", str(private_folder), "--json", *args])
        assert planned.exit_code == 0, planned.output
        plan = {r["role"]: r for r in json.loads(planned.output)["by_role"]}
        result = runner.invoke(app, ["synthesize", str(private_folder), "-o", str(out), "--quiet", *args])
        assert result.exit_code == 0, result.output
        served = server.stats.snapshot()["by_endpoint"]
    usage = json.loads((out / "private" / "usage.json").read_text())
    assert "caption" not in (out / "release" / "report.html").read_text().split("Hosted usage")[-1].split("</table>")[0]
    llm_stats = [json.loads(line) for line in (out / "state" / "llm_stats.jsonl").read_text().splitlines()]
    regenerated = sum(row.get("regenerated", 0) for row in llm_stats)
    chat = plan["caption"]["requests"] + plan["llm"]["requests"]
    assert served["chat"] == chat + regenerated
    assert served["embeddings"] == plan["text_embedding"]["requests"]
    assert served["images"] == plan["image"]["requests"] == 6
    assert usage["total"]["requests"] == sum(served.values())
    assert usage["by_role"]["caption+llm"]["requests"] == served["chat"]
    real_tokens = usage["by_role"]["caption+llm"]["prompt_tokens"]
    planned_tokens = plan["caption"]["prompt_tokens"] + plan["llm"]["prompt_tokens"]
    assert 0.2 < planned_tokens / max(real_tokens, 1) < 20  # an estimate: the same order of magnitude
    assert usage["total"]["cost_known"] and usage["total"]["cost_usd"] == 0  # a self-served endpoint
