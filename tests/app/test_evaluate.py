"""`spti evaluate`: metric implementations against closed forms, and one evaluated smoke run.

The metric tests need no model. The end-to-end tests make a smoke run, then evaluate it with tiny
random feature extractors loaded through the real loading paths (CLIP and DINOv2 folders, an FID
Inception weights file, a sentence-transformers folder): they check plumbing and the privacy
hygiene of the outputs (under private/, marked NOT DP, nothing added to release/), not quality.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from spti import metrics
from spti.cli_evaluate import register
from spti.errors import SptiError
from spti.evaluate import METRICS, parse_metrics
from spti.testing.example_images import write_example_folder

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------
def _closed_form_commuting(mu1, eig1, mu2, eig2) -> float:
    """FD of Gaussians whose covariances share eigenvectors: the trace term is Σ √(λ1 λ2)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(eig1 + eig2 - 2 * np.sqrt(eig1 * eig2)))


def _random_rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


class TestFrechet:
    def test_one_dimension(self) -> None:
        # N(m1, s1²) vs N(m2, s2²): (m1 − m2)² + (s1 − s2)²
        assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)

    def test_diagonal_covariances_exact(self) -> None:
        rng = np.random.default_rng(0)
        mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
        eig1, eig2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
        got = metrics.frechet_distance(mu1, np.diag(eig1), mu2, np.diag(eig2))
        assert got == pytest.approx(_closed_form_commuting(mu1, eig1, mu2, eig2), rel=1e-10)

    def test_commuting_full_covariances_exact(self) -> None:
        q = _random_rotation(5, seed=1)
        eig1, eig2 = np.array([0.5, 1, 2, 3, 4.0]), np.array([2, 0.3, 1, 5, 0.7])
        mu1, mu2 = np.zeros(5), np.arange(5.0)
        s1, s2 = q @ np.diag(eig1) @ q.T, q @ np.diag(eig2) @ q.T
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(_closed_form_commuting(mu1, eig1, mu2, eig2), rel=1e-9)

    def test_from_large_samples(self) -> None:
        rng = np.random.default_rng(2)
        q = _random_rotation(4, seed=3)
        eig1, eig2 = np.array([1.0, 2, 0.5, 3]), np.array([2.0, 1, 1, 0.5])
        mu1, mu2 = np.array([0, 1, 0, 0.0]), np.array([1, 0, 0, 2.0])
        a = rng.normal(size=(40_000, 4)) * np.sqrt(eig1) @ q.T + mu1
        b = rng.normal(size=(40_000, 4)) * np.sqrt(eig2) @ q.T + mu2
        expected = _closed_form_commuting(mu1, eig1, mu2, eig2)
        assert metrics.frechet_distance_features(a, b) == pytest.approx(expected, rel=0.03)
        mu, sigma = metrics.gaussian_stats(a)
        assert mu == pytest.approx(mu1, abs=0.05)
        assert sigma == pytest.approx(q @ np.diag(eig1) @ q.T, abs=0.06)

    def test_same_features_give_zero_in_both_regimes(self) -> None:
        rng = np.random.default_rng(4)
        many = rng.normal(size=(300, 8))  # n > d: sqrtm
        few = rng.normal(size=(6, 64))  # n < d: exact low-rank route
        assert metrics.frechet_distance_features(many, many) == pytest.approx(0.0, abs=1e-8)
        assert metrics.frechet_distance_features(few, few) == pytest.approx(0.0, abs=1e-8)

    def test_low_rank_route_matches_sqrtm(self) -> None:
        """With fewer samples than dimensions the sample-space identity agrees with sqrtm on the product."""
        rng = np.random.default_rng(5)
        a, b = rng.normal(size=(10, 24)), 1.5 * rng.normal(size=(14, 24)) + 0.3
        fast = metrics.frechet_distance_features(a, b)
        slow = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
        assert fast == pytest.approx(slow, rel=1e-5)

    def test_eigen_route_for_a_small_set_against_a_large_one(self) -> None:
        """n ≤ d < m: the n × n eigen route agrees with sqrtm, in either argument order."""
        rng = np.random.default_rng(6)
        small, large = rng.normal(size=(10, 24)), 1.5 * rng.normal(size=(400, 24)) + 0.3
        slow = metrics.frechet_distance(*metrics.gaussian_stats(small), *metrics.gaussian_stats(large))
        assert metrics.frechet_distance_features(small, large) == pytest.approx(slow, rel=1e-6)
        assert metrics.frechet_distance_features(large, small) == pytest.approx(slow, rel=1e-6)

    def test_singular_covariances(self) -> None:
        # the product is the zero matrix: tr(S1) + tr(S2) remains
        s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
        assert metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(2.0)

    def test_large_imaginary_part_raises(self) -> None:
        not_a_covariance = np.diag([1.0, -1.0])
        with pytest.raises(ValueError, match="imaginary"):
            metrics.frechet_distance(np.zeros(2), not_a_covariance, np.zeros(2), np.eye(2))

    def test_bad_inputs(self) -> None:
        with pytest.raises(ValueError, match="at least 2"):
            metrics.gaussian_stats(np.ones((1, 3)))
        with pytest.raises(ValueError, match="dimensions differ"):
            metrics.frechet_distance_features(np.ones((3, 2)), np.ones((3, 4)))
        with pytest.raises(ValueError, match="shapes"):
            metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


class TestRoundMetrics:
    def test_selected_set_closer_to_the_private_set_scores_lower(self) -> None:
        rng = np.random.default_rng(7)
        private = rng.normal(size=(500, 16))
        near, far = rng.normal(size=(12, 16)) + 0.1, rng.normal(size=(12, 16)) + 2.0  # n < d
        got_near, got_far = metrics.round_metrics(near, private), metrics.round_metrics(far, private)
        assert got_near["num_selected"] == got_far["num_selected"] == 12
        assert 0 < got_near["fd_voting_space"] < got_far["fd_voting_space"]
        # the mean term alone: ||Δμ||² = 16 · 2² for the far set, up to sampling noise
        assert got_far["fd_voting_space"] == pytest.approx(64.0, rel=0.35)
        assert got_near == metrics.round_metrics(near, private)
        json.dumps(got_near)  # plain JSON types, ready for metrics_by_round.jsonl

    def test_too_few_rows_give_null_and_bad_shapes_raise(self) -> None:
        private = np.random.default_rng(8).normal(size=(50, 4))
        assert metrics.round_metrics(private[:1], private) == {"fd_voting_space": None, "num_selected": 1}
        with pytest.raises(ValueError, match="dimensions differ"):
            metrics.round_metrics(private[:, :3], private)


# --------------------------------------------------------------------------------------------
# Precision / recall and nearest neighbours
# --------------------------------------------------------------------------------------------
class TestPrecisionRecall:
    def test_identical_sets(self) -> None:
        x = np.random.default_rng(0).normal(size=(200, 5))
        pr = metrics.precision_recall(x, x.copy(), k=3)
        assert (pr.precision, pr.recall) == (1.0, 1.0)
        assert (pr.n_real, pr.n_fake, pr.k) == (200, 200, 3)

    def test_far_apart_clusters(self) -> None:
        rng = np.random.default_rng(1)
        pr = metrics.precision_recall(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0)
        assert (pr.precision, pr.recall) == (0.0, 0.0)

    def test_fake_inside_one_mode_of_real(self) -> None:
        """Mode collapse: every fake sample is realistic (precision high) but half of real is missed."""
        rng = np.random.default_rng(2)
        real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 50.0])
        fake = rng.normal(size=(300, 2))
        pr = metrics.precision_recall(real, fake, k=3)
        assert pr.precision > 0.95
        assert 0.4 < pr.recall < 0.55

    def test_blocks_do_not_change_the_result(self) -> None:
        rng = np.random.default_rng(3)
        real, fake = rng.normal(size=(120, 3)), rng.normal(size=(90, 3)) * 1.5
        whole = metrics.precision_recall(real, fake, k=4)
        blocked = metrics.precision_recall(real, fake, k=4, block_entries=50)
        assert whole == blocked

    def test_kth_and_nearest_neighbours_match_brute_force(self) -> None:
        rng = np.random.default_rng(4)
        x, y = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
        full = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.testing.assert_allclose(
            metrics.kth_neighbour_distances(x, 2, block_entries=30), np.sort(full, axis=1)[:, 2], atol=1e-9
        )
        cross = np.linalg.norm(y[:, None] - x[None], axis=-1).min(axis=1)
        np.testing.assert_allclose(metrics.nearest_neighbour_distances(y, x, block_entries=7), cross, atol=1e-9)
        np.testing.assert_allclose(
            metrics.nearest_neighbour_distances(x, x, exclude_self=True), np.sort(full, axis=1)[:, 1], atol=1e-9
        )

    def test_too_few_samples(self) -> None:
        with pytest.raises(ValueError, match="k=3"):
            metrics.precision_recall(np.ones((3, 2)), np.ones((10, 2)), k=3)


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------
def test_clip_score_on_constructed_embeddings() -> None:
    e = np.eye(3)
    assert metrics.clip_score(e, 5 * e) == pytest.approx(100.0)  # scale does not matter
    assert metrics.clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)  # orthogonal
    assert metrics.clip_score(e, -e) == pytest.approx(0.0)  # negative cosine is clamped at 0
    sixty_degrees = np.array([[0.5, math.sqrt(3) / 2]])
    assert metrics.clip_score(np.array([[1.0, 0.0]]), sixty_degrees) == pytest.approx(50.0)
    pairs = np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert metrics.clip_score(*pairs) == pytest.approx(50.0)  # mean of 100 and 0
    with pytest.raises(ValueError, match="paired"):
        metrics.clip_score(np.ones((2, 3)), np.ones((3, 3)))


# --------------------------------------------------------------------------------------------
# Wavelet energy spectrum
# --------------------------------------------------------------------------------------------
class TestWaveletSpectrum:
    def test_bands_and_partition(self) -> None:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)) for _ in range(3)]
        spectrum = metrics.wavelet_energy_spectrum(images, levels=4)
        assert spectrum.bands == metrics.wavelet_band_names(4)
        assert spectrum.bands[:4] == ("A4", "LH4", "HL4", "HH4")
        assert spectrum.bands[-1] == "HH1"
        assert spectrum.fractions.sum() == pytest.approx(1.0)
        assert sum(spectrum.by_level().values()) == pytest.approx(1.0)
        assert spectrum.n == 3

    def test_noise_puts_energy_in_fine_levels_and_smooth_images_in_coarse_ones(self) -> None:
        rng = np.random.default_rng(1)
        noise = [rng.normal(size=(64, 64)) for _ in range(4)]
        yy, xx = np.mgrid[0:64, 0:64] / 64.0
        smooth = [np.sin(2 * np.pi * (xx * f + yy)) + xx for f in (0.5, 1.0, 1.5)]
        noisy = metrics.wavelet_energy_spectrum(noise).by_level()
        calm = metrics.wavelet_energy_spectrum(smooth).by_level()
        # orthogonal transform of white noise: each level keeps its share of coefficients (3/4 at level 1)
        assert noisy["L1"] == pytest.approx(0.75, abs=0.03)
        assert calm["L1"] < 0.01
        assert calm["A4"] + calm["L4"] + calm["L3"] > 0.9
        assert metrics.wavelet_energy_spectrum(noise).total_variation(metrics.wavelet_energy_spectrum(smooth)) > 0.5

    def test_constant_image_and_small_images(self) -> None:
        flat = metrics.image_energy_fractions(np.full((32, 32), 7.0), levels=3)
        assert flat[0] == 1.0
        assert flat.sum() == 1.0
        with pytest.raises(ValueError, match="larger image"):
            metrics.image_energy_fractions(np.zeros((8, 8)), levels=4)


# --------------------------------------------------------------------------------------------
# Text statistics and metric names
# --------------------------------------------------------------------------------------------
def test_text_stats_on_a_known_list() -> None:
    stats = metrics.text_stats(["A red bed.", "a red, red lamp", "Don't  move the bed"], top_k=2)
    assert stats["n_texts"] == 3
    assert stats["total_words"] == 3 + 4 + 4
    assert stats["vocabulary_size"] == len({"a", "red", "bed", "lamp", "don't", "move", "the"})
    assert stats["type_token_ratio"] == pytest.approx(7 / 11)
    assert stats["top_words"] == [["red", 3], ["a", 2]]  # "a" and "bed" tie at 2: alphabetical
    assert stats["words"]["mean"] == pytest.approx(11 / 3)
    assert stats["words"]["min"] == 3
    assert stats["words"]["max"] == 4
    assert stats["words"]["median"] == 4
    empty = metrics.text_stats([])
    assert empty["words"] is None
    assert empty["type_token_ratio"] is None


def test_parse_metrics() -> None:
    assert parse_metrics(None) == list(METRICS)
    assert parse_metrics("all") == list(METRICS)
    assert parse_metrics(" FID, wavelet,fid ") == ["fid", "wavelet"]
    with pytest.raises(SptiError, match="unknown metric"):
        parse_metrics("fid,is")


# --------------------------------------------------------------------------------------------
# End to end: a smoke run, evaluated with tiny random extractors
# --------------------------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a callback keeps `evaluate` a sub-command, as in the real CLI
        pass

    register(app)
    return app


def _build_tiny_clip_with_tokenizer(path: Path) -> Path:
    """A full CLIP checkpoint (both towers, tokenizer, image processor): what clip-score needs."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from spti.testing.tiny_vision import write_clip_tokenizer_files

    write_clip_tokenizer_files(path)
    tokenizer = CLIPTokenizer.from_pretrained(str(path), model_max_length=77)
    eos, bos = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|startoftext|>")
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=12,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_extractors(tmp_path_factory) -> dict[str, Path]:
    from spti.testing import tiny_text, tiny_vision

    root = tmp_path_factory.mktemp("eval_models")
    return {
        "clip": _build_tiny_clip_with_tokenizer(root / "clip"),
        "clip_vision_only": tiny_vision.build_tiny_clip_vision(root / "clip_vision"),
        "dinov2": tiny_vision.build_tiny_dinov2(root / "dinov2"),
        "inception": tiny_vision.write_tiny_inception_weights(root / "inception"),
        "sentence": tiny_text.build_tiny_sentence_transformer(root / "sentence"),
    }


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    from spti.cli import app

    base = tmp_path_factory.mktemp("eval_run")
    private = write_example_folder(base / "private" / "faces", num_people=4, images_per_person=2, size=32)
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))
        result = runner.invoke(
            app,
            ["synthesize", str(private), "--output", str(run), "--preset", "smoke", "--quiet", "--num-samples", "6"],
        )
    assert result.exit_code == 0, result.output
    return run


def _release_snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in (run / "release").rglob("*")}


def test_evaluate_smoke_run(smoke_run: Path, tiny_extractors: dict[str, Path]) -> None:
    before = _release_snapshot(smoke_run)
    args = [
        "evaluate",
        str(smoke_run),
        "--clip-model",
        str(tiny_extractors["clip"]),
        "--dinov2-model",
        str(tiny_extractors["dinov2"]),
        "--text-model",
        str(tiny_extractors["sentence"]),
        "--device",
        "cpu",
    ]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "NOT differentially private" in result.output

    report = json.loads((smoke_run / "private" / "evaluation.json").read_text())
    assert report["not_dp"] is True
    assert "NOT differentially private" in report["warning"]
    assert report["samples"]["private_images"] == 8
    assert report["samples"]["released_images"] == 6
    assert report["samples"]["private_captions"] == 8
    found = report["metrics"]
    assert list(found) == list(METRICS)

    fid = found["fid"]  # no weights: reported, never computed with anything else
    assert fid["status"] == "unavailable"
    assert "--inception-weights" in fid["reason"]
    assert "pt_inception-2015-12-05-6726825d.pth" in fid["reason"]
    assert "value" not in fid

    for name, extractor in (("fd-dinov2", "DINOv2"), ("fd-clip", "CLIP"), ("text-fd", "sentence")):
        assert found[name]["status"] == "ok", found[name]
        assert math.isfinite(found[name]["value"])
        assert found[name]["value"] >= 0
        assert extractor in found[name]["extractor"]
        assert (found[name]["n_private"], found[name]["n_released"]) == (8, 6)
    pr = found["precision-recall"]
    assert pr["status"] == "ok"
    assert 0 <= pr["precision"] <= 1
    assert 0 <= pr["recall"] <= 1
    assert "DINOv2" in pr["extractor"]
    assert pr["nearest_neighbour"]["released_to_private"]["min"] >= 0
    clip = found["clip-score"]
    assert clip["status"] == "ok"
    assert 0 <= clip["value"] <= 100
    assert clip["n_released"] == 6
    assert clip["n_private"] == 8
    assert "private_reference" in clip
    wave = found["wavelet"]
    assert wave["status"] == "ok"
    assert (wave["n_private"], wave["n_released"]) == (8, 6)
    assert wave["analysis_size"] == 32  # private images are 32², released 64²: no upsampling
    assert sum(wave["private"]["fractions"].values()) == pytest.approx(1.0)
    assert wave["upscaler"]["factor"] == 2  # smoke: 32² rendered, ×2 Lanczos
    assert wave["upscaler"]["n"] == 6
    stats = found["text-fd"]["text_stats"]
    assert stats["private"]["n_texts"] == 8
    assert stats["released"]["n_texts"] == 6

    page = (smoke_run / "private" / "evaluation.html").read_text()
    assert "NOT DIFFERENTIALLY PRIVATE" in page
    assert "do not share" in page.lower()
    assert page.count("data:image/png;base64,") >= 4  # two spectra, NN distances, P/R, text lengths
    assert "fd-dinov2" in page

    assert _release_snapshot(smoke_run) == before  # nothing written to (or changed in) release/
    shared_page = (smoke_run / "release" / "report.html").read_text().lower()
    assert not any(name in shared_page for name in ("fd-dinov2", "precision-recall", "clip-score", "text-fd"))


def test_fid_with_a_weights_file_and_json_output(smoke_run: Path, tiny_extractors: dict[str, Path]) -> None:
    args = [
        "evaluate",
        str(smoke_run),
        "--metrics",
        "fid",
        "--inception-weights",
        str(tiny_extractors["inception"]),
        "--max-images",
        "4",
        "--device",
        "cpu",
        "--json",
    ]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["not_dp"] is True
    fid = report["metrics"]["fid"]
    assert fid["status"] == "ok", fid
    assert (fid["n_private"], fid["n_released"]) == (4, 4)
    assert fid["feature_dim"] == 2048
    assert "Inception-v3" in fid["extractor"]
    assert math.isfinite(fid["value"])
    assert fid["value"] >= 0
    assert report["samples"]["private_images_available"] == 8
    assert any("rank-deficient" in note for note in fid["notes"])
    missing = runner.invoke(
        _app(), ["evaluate", str(smoke_run), "--metrics", "fid", "--inception-weights", "/nonexistent/w.pth"]
    )
    assert missing.exit_code == 0, missing.output
    assert "does not exist" in missing.output


def test_clip_score_needs_a_tokenizer_and_fd_clip_does_not(smoke_run: Path, tiny_extractors: dict[str, Path]) -> None:
    result = runner.invoke(
        _app(),
        [
            "evaluate",
            str(smoke_run),
            "--metrics",
            "fd-clip,clip-score",
            "--clip-model",
            str(tiny_extractors["clip_vision_only"]),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["metrics"]
    assert found["fd-clip"]["status"] == "ok"
    assert found["clip-score"]["status"] == "unavailable"
    assert "tokenizer" in found["clip-score"]["reason"]


def test_moved_private_folder_and_user_errors(smoke_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "run"
    shutil.copytree(smoke_run, moved)
    manifest_path = moved / "private" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    real_root = manifest["root"]
    manifest["root"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(manifest))

    lost = runner.invoke(_app(), ["evaluate", str(moved), "--metrics", "wavelet"])
    assert lost.exit_code == 2
    assert "--private" in lost.output
    assert "Traceback" not in lost.output
    found = runner.invoke(_app(), ["evaluate", str(moved), "--metrics", "wavelet", "--private", real_root])
    assert found.exit_code == 0, found.output
    assert json.loads((moved / "private" / "evaluation.json").read_text())["metrics"]["wavelet"]["status"] == "ok"

    unknown = runner.invoke(_app(), ["evaluate", str(moved), "--metrics", "fid,inception-score"])
    assert unknown.exit_code == 2
    assert "unknown metric" in unknown.output
    not_a_run = runner.invoke(_app(), ["evaluate", str(tmp_path)])
    assert not_a_run.exit_code == 2
    assert "not an spti run" in not_a_run.output
