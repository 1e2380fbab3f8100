"""The executor interface and ``--executor ray`` on a small local Ray instance (2 CPU actors, tiny models).

- proxies cut calls into the model's own batches, in order, with per-item seeds and keys cut alike;
- ``spti --help`` never imports Ray, and ``--executor ray`` without Ray is one line;
- with Ray: a smoke run at ε = ∞ releases exactly what ``--executor local`` releases (captions.jsonl and
  image bytes), for text voting, and for image voting after the driver was killed mid-round with SIGKILL
  and resumed: nothing rendered twice, one ledger entry per draw.
The Ray tests are skipped when ray is not installed (``pip install 'spti[ray]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from private_evolution import PrivacyLedger
from spti.cli import app
from spti.executors import Call, LocalExecutor, RoleSpec
from spti.executors.proxies import ImageEmbedderProxy, ImageGeneratorProxy
from spti.testing.example_images import write_example_folder

runner = CliRunner()
requires_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed: pip install 'spti[ray]'"
)


# --------------------------------------------------------------------------------------------
# Without Ray: the proxies and the interface
# --------------------------------------------------------------------------------------------
class RecordingExecutor:
    """Runs each call on a fake model in this process and records what it was given."""

    workers = 3
    where = "local"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def map(self, role: RoleSpec, method: str, calls: list[Call]) -> list[Any]:
        self.calls += calls
        if method == "embed":
            return [np.full((len(c.kwargs["images"]), 2), i, np.float32) for i, c in enumerate(calls)]
        return [[f"{p}@{s}" for p, s in zip(c.kwargs["prompts"], c.kwargs["seeds"], strict=True)] for c in calls]

    def describe(self, role: RoleSpec) -> dict[str, Any]:
        return {"native_size": 32, "steps": 1, "guidance": 0.0}

    def close(self) -> None:
        pass


def _smoke_config(**overrides: Any) -> Any:
    from spti.config import resolve_config

    return resolve_config(preset="smoke", overrides=overrides)


def test_proxy_cuts_calls_into_model_batches_in_order() -> None:
    executor = RecordingExecutor()
    role = RoleSpec.of("image", _smoke_config(device="cuda:1"))
    assert role.config.executor == "local" and role.config.device == "cuda"  # a worker sees its own GPU
    gen = ImageGeneratorProxy(executor, role, chunk=4)
    assert (gen.native_size, gen.steps, gen.guidance) == (32, 1, 0.0)
    prompts = [f"p{i}" for i in range(10)]
    out = gen.generate(prompts, width=32, height=32)
    assert out == [f"p{i}@{i}" for i in range(10)]  # default seeds are the call's 0..n-1, not each batch's
    assert [len(c.kwargs["prompts"]) for c in executor.calls] == [4, 4, 2]
    assert all(c.kwargs["width"] == 32 for c in executor.calls)
    assert gen.generate(prompts[:3], seeds=[7, 8, 9]) == ["p0@7", "p1@8", "p2@9"]
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(prompts, seeds=[1])
    emb = ImageEmbedderProxy(executor, RoleSpec.of("image_features", _smoke_config()), chunk=4).embed(list(range(9)))
    assert emb.shape == (9, 2) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[:, 0], [0, 0, 0, 0, 1, 1, 1, 1, 2])


def test_local_executor_builds_the_role_from_its_spec() -> None:
    from PIL import Image

    from spti.backends.factory import build_image_embedder

    images = [Image.new("RGB", (32, 32), (i * 40, 10, 200 - i * 30)) for i in range(5)]
    executor = LocalExecutor()
    try:
        proxy = ImageEmbedderProxy(executor, RoleSpec.of("image_features", _smoke_config()), chunk=2)
        np.testing.assert_array_equal(proxy.embed(images), build_image_embedder("wavelet").embed(images))
    finally:
        executor.close()
    with pytest.raises(ValueError, match="does not run on an executor"):
        RoleSpec.of("llm", _smoke_config())


def test_cli_never_imports_ray_and_missing_ray_is_one_line(monkeypatch) -> None:
    code = "import sys, spti.cli; sys.exit(int('ray' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    from spti.errors import SptiError
    from spti.executors import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(SptiError, match=r"pip install 'spti\[ray\]'"):
        make_executor(_smoke_config(executor="ray"))
    with pytest.raises(SptiError, match="executor"):
        _smoke_config(executor="dask")


# --------------------------------------------------------------------------------------------
# With Ray: the same release, and resume after SIGKILL
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address() -> Any:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install 'spti[ray]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    return write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=4, images_per_person=3, size=32
    )


@pytest.fixture(autouse=True)
def shared_tiny_models(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))


# small batches, so that a round is several batches and each step keeps both actors busy
SMOKE = ["--preset", "smoke", "--epsilon", "inf", "--batch-size", "4", "--seed", "3", "--quiet"]


def synth(private: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["synthesize", str(private), "--output", str(out), *SMOKE, *extra])


def release_of(run: Path) -> dict[str, bytes]:
    files = {"captions.jsonl": (run / "release" / "captions.jsonl").read_bytes()}
    for path in sorted((run / "release" / "images").glob("*.png")):
        files[path.name] = path.read_bytes()
    return files


@contextmanager
def counting_renders(cls: type) -> Iterator[list[tuple[str, int]]]:
    """Every (text, seed) drawn through ``cls.generate`` in this process while the block runs."""
    drawn: list[tuple[str, int]] = []
    original = cls.generate

    def generate(self, prompts, *args, seeds=None, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, prompts, *args, seeds=seeds, **kwargs)
        drawn.extend(zip(prompts, seeds if seeds is not None else range(len(prompts)), strict=True))
        return out

    cls.generate = generate  # type: ignore[attr-defined]
    try:
        yield drawn
    finally:
        cls.generate = original  # type: ignore[attr-defined]


@requires_ray
def test_ray_text_voting_releases_what_local_releases(ray_address: str, private_folder: Path, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert synth(private_folder, local).exit_code == 0
    result = synth(private_folder, remote, "--executor", "ray")
    assert result.exit_code == 0, result.output
    assert release_of(remote) == release_of(local)
    assert len(release_of(remote)) == 1 + 8
    # the private side ran on the actors too: the same captions of the private images
    assert (remote / "private" / "captions.jsonl").read_bytes() == (local / "private" / "captions.jsonl").read_bytes()
    saved = (remote / "config.toml").read_text()
    assert 'executor = "ray"' in saved
    privacy = json.loads((remote / "release" / "privacy.json").read_text())
    assert privacy["private_data_sent_to"]["caption"]["caption"] == "local"
    # where the models run is not what the run computes: a later stage may run elsewhere
    again = runner.invoke(app, ["render", str(remote), "--executor", "local", "--quiet"])
    assert again.exit_code == 0, again.output
    assert release_of(remote) == release_of(local)


_KILLED_DRIVER = """
import json, os, sys, time
from pathlib import Path

from spti.executors import proxies
from spti.vote_spaces import FeatureCache

log = open(os.environ["RENDER_LOG"], "a")
generate = proxies.ImageGeneratorProxy.generate


def logged(self, prompts, *args, seeds=None, **kwargs):
    out = generate(self, prompts, *args, seeds=seeds, **kwargs)
    for pair in zip(prompts, seeds):
        log.write(json.dumps(pair) + "\\n")
    log.flush()
    return out


put_many = FeatureCache.put_many
round_0 = Path(os.environ["RUN_DIR"]) / "state" / "pe" / "round_000" / "complete.json"


def put_then_wait(self, items):
    put_many(self, items)
    if round_0.exists():  # the first batch of round 1 is cached: wait here to be killed
        Path(os.environ["MARKER"]).write_text("mid-round")
        time.sleep(600)


proxies.ImageGeneratorProxy.generate = logged
FeatureCache.put_many = put_then_wait
from spti.cli import main

sys.argv = ["spti", *sys.argv[1:]]
main()
"""


@requires_ray
def test_ray_image_voting_killed_mid_round_resumes_to_the_local_release(
    ray_address: str, private_folder: Path, tmp_path: Path
) -> None:
    from spti.backends.local.images import DiffusersImageGenerator

    local, remote = tmp_path / "local", tmp_path / "ray"
    with counting_renders(DiffusersImageGenerator) as local_renders:
        assert synth(private_folder, local, "--voting", "image").exit_code == 0

    # a real driver process, killed with SIGKILL once round 1 is half rendered
    script, log, marker = tmp_path / "driver.py", tmp_path / "renders.jsonl", tmp_path / "marker"
    script.write_text(textwrap.dedent(_KILLED_DRIVER))
    env = {**os.environ, "RENDER_LOG": str(log), "RUN_DIR": str(remote), "MARKER": str(marker)}
    args = ["synthesize", str(private_folder), "--output", str(remote), *SMOKE, "--voting", "image"]
    driver = subprocess.Popen(
        [sys.executable, str(script), *args, "--executor", "ray", "--ray-address", ray_address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), driver.communicate(timeout=30)[0].decode()[-3000:] if driver.poll() is not None else ""
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    before = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    ledger = PrivacyLedger.load(remote / "state" / "pe" / "ledger.json")
    assert len(ledger) == 2  # the DP count and round 0: round 1 was still rendering
    assert not (remote / "release" / "captions.jsonl").exists()

    from spti.executors.proxies import ImageGeneratorProxy

    with counting_renders(ImageGeneratorProxy) as after:
        resumed = runner.invoke(app, ["synthesize", str(private_folder), "--output", str(remote), "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert after, "the resumed run had the rest of round 1 to render"
    assert not set(before) & set(after), "a render was drawn again after the resume"
    assert len(before) + len(after) == len(set(local_renders))  # every render once, as the run without a kill
    assert len(set(before)) == len(before) and len(set(after)) == len(after)
    ledger = PrivacyLedger.load(remote / "state" / "pe" / "ledger.json")
    assert len(ledger) == 1 + 2 and len(set(ledger.names())) == len(ledger)  # one entry per draw, none redrawn
    assert release_of(remote) == release_of(local)
    assert np.array_equal(
        np.load(remote / "private" / "image_features.npy"), np.load(local / "private" / "image_features.npy")
    )
