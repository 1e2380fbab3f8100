"""What the (ε, δ) statement relies on outside the mechanism: one process per run directory, file
modes that keep private data private, nothing private outside ``private/``, captions that survive a
torn write, and bookkeeping (stage facts, endpoints, unit source) that tells the truth.

Real processes, real files, the tiny-model smoke preset and the loopback OpenAI server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spti.cli import app
from spti.testing.example_images import write_example_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPTI_TINY_MODEL_DIR", str(tmp_path_factory.getbasetemp() / "tiny_models"))
        yield


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    return write_example_folder(
        tmp_path_factory.mktemp("private") / "faces", num_people=3, images_per_person=2, size=32
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, private_folder: Path, tiny_env) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    args = ["synthesize", str(private_folder), "--output", str(out), "--preset", "smoke", "--num-samples", "4"]
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def spti(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spti.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    }


# --------------------------------------------------------------------------------------------
# 1. One process at a time holds a run directory
# --------------------------------------------------------------------------------------------
HOLD = """
import fcntl, os, sys, time
path = sys.argv[1]
os.makedirs(path, exist_ok=True)
fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


class Holder:
    """Another process that holds RUN_DIR/.lock (as a running spti command would)."""

    def __init__(self, run: Path, script: str = HOLD) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(run)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def _commands(private: Path, run: Path, captions: Path) -> dict[str, list[str]]:
    return {
        "synthesize": ["synthesize", str(private), "--output", str(run), "--resume"],
        "caption": ["caption", str(private), "--output", str(run), "--resume"],
        "evolve": ["evolve", str(run), "--resume"],
        "render": ["render", str(run)],
        "evaluate": ["evaluate", str(run), "--metrics", "wavelet"],
        "audit": ["audit", str(run), "--features", "wavelet"],
    }


@pytest.mark.parametrize("command", ["synthesize", "caption", "evolve", "render", "evaluate", "audit"])
def test_second_process_is_refused_and_writes_nothing(
    smoke_run: Path, private_folder: Path, tmp_path: Path, command: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    args = _commands(private_folder, run, tmp_path / "mine.jsonl")[command]
    with Holder(run) as holder:
        before = snapshot(run)
        result = spti(*args, "--quiet") if command not in ("evaluate", "audit") else spti(*args)
        assert snapshot(run) == before, "a refused command must not write into the run directory"
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {run.resolve()} is in use by another spti process (pid {holder.proc.pid}); wait for it to finish"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_new_run_directory_is_created_only_by_the_holder(private_folder: Path, tmp_path: Path) -> None:
    """Two `synthesize --output NEW` at once: the second exits at once and does not half-create the run."""
    run = tmp_path / "new"
    with Holder(run):
        result = spti("synthesize", str(private_folder), "--output", str(run), "--preset", "smoke", "--quiet")
        captions = tmp_path / "mine.jsonl"
        captions.write_text(json.dumps({"caption": "a red bicycle by a wall", "unit": 1}) + "\n")
        imported = spti("evolve", "--captions", str(captions), "--output", str(run), "--preset", "smoke", "--quiet")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    for r in (result, imported):
        assert r.returncode == 2, r.stderr
        assert "is in use by another spti process" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    from spti.errors import SptiError
    from spti.rundir import RunDirectory

    run = tmp_path / "run"
    run.mkdir()
    script = (
        "import sys, time\n"
        "from spti.rundir import RunDirectory\n"
        "with RunDirectory(sys.argv[1]).lock():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )
    holder = Holder(run, script)
    try:
        assert (run / ".lock").read_text().strip() == str(holder.proc.pid)
        assert stat.S_IMODE((run / ".lock").stat().st_mode) == 0o600
        busy = rf"in use by another spti process \(pid {holder.proc.pid}\)"
        with pytest.raises(SptiError, match=busy), RunDirectory(run).lock():
            pass
        holder.proc.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        holder.proc.wait()
        with RunDirectory(run).lock():
            assert (run / ".lock").read_text().strip() == str(os.getpid())
    finally:
        holder.proc.kill()
        holder.proc.wait()


def test_a_command_holds_the_lock_while_it_runs(private_folder: Path, tmp_path: Path, tiny_env) -> None:
    """A running `spti synthesize` holds the lock: a resume started meanwhile is refused with its pid."""
    run = tmp_path / "run"
    env = {"SPTI_TINY_MODEL_DIR": os.environ["SPTI_TINY_MODEL_DIR"]}
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spti.cli",
            "synthesize",
            str(private_folder),
            "--output",
            str(run),
            "--preset",
            "smoke",
            "--num-samples",
            "4",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.toml").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = spti("synthesize", str(private_folder), "--output", str(run), "--resume", "--quiet", env=env)
        if first.poll() is None:  # (on a very fast machine the first run may already be done)
            assert second.returncode == 2, second.stderr
            assert f"(pid {first.pid})" in second.stderr
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


# --------------------------------------------------------------------------------------------
# 2. File modes
# --------------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_modes(run: Path) -> None:
    private = run / "private"
    assert _mode(private) == 0o700
    for p in private.rglob("*"):
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), f"{p} has mode {oct(_mode(p))}"
    assert (private / "README.txt").exists()
    assert _mode(run / "state") == 0o700
    assert _mode(run / "release") == 0o755
    files = [p for p in (run / "release").rglob("*") if p.is_file()]
    assert files
    for p in (run / "release").rglob("*"):
        assert _mode(p) == (0o755 if p.is_dir() else 0o644), f"{p} has mode {oct(_mode(p))}"


def test_file_modes_after_a_smoke_run(smoke_run: Path) -> None:
    assert (smoke_run / "private" / "captions.jsonl").exists()
    check_modes(smoke_run)


def test_share_release_applies_release_modes(tmp_path: Path) -> None:
    from spti.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    (run.release / "images").mkdir(parents=True)
    (run.release / "images" / "0.png").write_bytes(b"x")
    os.chmod(run.release / "images" / "0.png", 0o600)
    os.chmod(run.release / "images", 0o700)
    run.share_release()
    assert _mode(run.release / "images") == 0o755
    assert _mode(run.release / "images" / "0.png") == 0o644


def test_request_cache_file_is_owner_only(tmp_path: Path) -> None:
    from spti.backends.request_cache import RequestCache

    with RequestCache(tmp_path / "requests.sqlite") as cache:
        cache.put("k", endpoint="e", model="m", value=b"a private caption")
        for p in tmp_path.iterdir():
            assert _mode(p) == 0o600, p


# --------------------------------------------------------------------------------------------
# 3. + 6. A hosted-provider run: nothing private outside private/, endpoints recorded
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openai_run(tmp_path_factory, private_folder: Path, tiny_env) -> Path:
    from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer

    out = tmp_path_factory.mktemp("runs") / "openai"
    with pytest.MonkeyPatch.context() as mp, LoopbackOpenAIServer(FaultConfig()) as server:
        mp.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
        args = ["synthesize", str(private_folder), "--output", str(out), "--preset", "openai"]
        args += ["--base-url", server.base_url, "--image-model", "tiny", "--num-samples", "4", "--iterations", "2"]
        args += ["--population-size", "4", "--variation-folds", "2", "--render-size", "32", "--quiet"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return out


def test_no_private_caption_outside_private(openai_run: Path) -> None:
    captions = [
        json.loads(line)["caption"] for line in (openai_run / "private" / "captions.jsonl").read_text().splitlines()
    ]
    assert len(captions) == 6 and all(captions)
    outside = [p for p in openai_run.rglob("*") if p.is_file() and "private" not in p.relative_to(openai_run).parts]
    assert outside
    for p in outside:
        data = p.read_bytes()
        for caption in captions:
            assert caption.encode() not in data, f"private caption found in {p.relative_to(openai_run)}"
    assert not (openai_run / "state" / "requests.sqlite").exists()
    assert (openai_run / "private" / "requests.sqlite").exists()
    check_modes(openai_run)


def test_private_endpoints_are_recorded(openai_run: Path, smoke_run: Path) -> None:
    from spti.rundir import RunDirectory

    hosted = RunDirectory(openai_run).private_data_endpoints()
    assert hosted["caption"]["caption"].startswith("http://127.0.0.1")
    assert RunDirectory(smoke_run).private_data_endpoints()["caption"] == {"caption": "local"}


def test_endpoints_merge_across_processes_and_survive_mark(tmp_path: Path) -> None:
    from spti.config import resolve_config
    from spti.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.create(resolve_config(preset="smoke"))
    run.record_private_endpoints("caption", {"caption": "https://api.a.example/v1"})
    code = (
        "import sys\nfrom spti.rundir import RunDirectory\n"
        "RunDirectory(sys.argv[1]).record_private_endpoints('caption', {'caption': 'https://b.example/v1'})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(run.root)], check=True)
    run.mark("caption")
    run.record_private_endpoints("evolve", {"text_embedding": "local"})
    assert RunDirectory(run.root).private_data_endpoints() == {
        "caption": {"caption": "https://api.a.example/v1, https://b.example/v1"},
        "evolve": {"text_embedding": "local"},
    }


def test_stage_bookkeeping_holds_no_private_counts(smoke_run: Path) -> None:
    stages = json.loads((smoke_run / "state" / "stages.json").read_text())
    for key in ("images", "failed", "skipped"):
        assert key not in stages["caption"], f"stages.json (outside private/) holds the private count {key!r}"
    stats = json.loads((smoke_run / "private" / "caption_stats.json").read_text())
    assert stats == {"images": 6, "captioned": 6, "failed": 0, "skipped": 0}


def test_unit_source(smoke_run: Path, tmp_path: Path, tiny_env) -> None:
    from spti.config import resolve_config
    from spti.rundir import RunDirectory

    assert RunDirectory(smoke_run).unit_source() == "image"
    folder = RunDirectory(tmp_path / "folder")
    folder.create(resolve_config(preset="smoke", overrides={"privacy_unit": "folder"}))
    assert folder.unit_source() == "folder"

    captions = tmp_path / "mine.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"id": f"i{i}", "caption": f"a red bicycle number {i} by a wall", "unit": i // 2}) + "\n"
            for i in range(12)
        )
    )
    out = tmp_path / "byo"
    r = runner.invoke(app, ["evolve", "--captions", str(captions), "--output", str(out), "--preset", "smoke",
                            "--epsilon", "4", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert RunDirectory(out).unit_source() == "captions file 'unit' field"


# --------------------------------------------------------------------------------------------
# 4. The captions file survives a torn write and a bad line
# --------------------------------------------------------------------------------------------
@pytest.fixture
def counted_captions(monkeypatch):
    from spti.backends.local.text import HFCaptioner

    original = HFCaptioner.caption
    calls: list[int] = []

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(HFCaptioner, "caption", counting)
    return calls


def _caption(private: Path, run: Path, *extra: str):
    return runner.invoke(app, ["caption", str(private), "--output", str(run), "--quiet", *extra])


def test_torn_last_caption_line_is_cut_and_recaptioned(
    private_folder: Path, tmp_path: Path, tiny_env, counted_captions
) -> None:
    from private_evolution.files import recover_jsonl

    run = tmp_path / "run"
    assert _caption(private_folder, run, "--preset", "smoke").exit_code == 0
    path = run / "private" / "captions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["relpath"]
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    counted_captions.clear()
    r = _caption(private_folder, run, "--resume")
    assert r.exit_code == 0, r.output
    assert sum(counted_captions) == 1
    rec = recover_jsonl(path)
    assert rec.bad_lines == [] and rec.truncated_bytes == 0
    assert sorted(row["relpath"] for row in rec.rows) == sorted(json.loads(x)["relpath"] for x in lines)
    assert [row["relpath"] for row in rec.rows][-1] == torn


def test_bad_caption_line_in_the_middle_is_skipped_not_the_rest(
    private_folder: Path, tmp_path: Path, tiny_env, counted_captions
) -> None:
    from private_evolution.files import recover_jsonl

    run = tmp_path / "run"
    assert _caption(private_folder, run, "--preset", "smoke").exit_code == 0
    path = run / "private" / "captions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lost = json.loads(lines[2])["relpath"]
    lines[2] = '{"relpath": "person_02/0\x00 garbage\n'
    path.write_text("".join(lines))
    counted_captions.clear()
    r = _caption(private_folder, run, "--resume")
    assert r.exit_code == 0, r.output
    assert f"{path}" in r.output.replace("\n", "") and "line 3" in r.output
    assert sum(counted_captions) == 1  # only the image whose line was destroyed; the rows after it are kept
    rows = recover_jsonl(path).rows
    assert [row["relpath"] for row in rows].count(lost) == 1
    assert len(rows) == 6

    # the evolve stage reads the same file the same way: every image but none twice
    from spti.rundir import RunDirectory

    r = runner.invoke(app, ["evolve", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    assert RunDirectory(run).stage_done("evolve")
