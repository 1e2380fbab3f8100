"""The OpenAI provider against a server this project did not write: ``transformers serve``.

The test starts ``transformers serve`` on 127.0.0.1 (offline, ``HF_HUB_OFFLINE=1``) with a tiny
randomly-initialised chat model built into a temporary folder (:mod:`spti.testing.tiny_text`),
pinned with the folder as its model id, and drives it through :class:`OpenAITextGenerator`:
chat completions, usage, the request cache, the error line for a wrong model name, and
``/v1/embeddings`` (which ``transformers serve`` does not offer: the embedder must say so in one
line). Skipped when the serving extra is missing: ``pip install torch==2.13.0 'transformers[serving]'``
(fastapi, uvicorn, starlette; it does not change torch). Start-up takes 10-30 s on two cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="transformers serve needs the serving extra: pip install 'transformers[serving]'")
pytest.importorskip("uvicorn", reason="transformers serve needs the serving extra: pip install 'transformers[serving]'")

from spti.backends.openai_api import OpenAITextEmbedder, OpenAITextGenerator
from spti.errors import BackendError

STARTUP_TIMEOUT = 240.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServedModel:
    def __init__(self, model: str, base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.model, self.base_url, self.proc, self.log = model, base_url, proc, log


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    from spti.testing.tiny_text import build_tiny_chat_lm

    root = tmp_path_factory.mktemp("transformers-serve")
    model = str(build_tiny_chat_lm(root / "tiny-chat"))
    port = _free_port()
    log = root / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.skip(f"transformers serve exited with {proc.returncode} at start-up: {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.5)
        yield ServedModel(model, base_url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"describe photo number {i} of a bedroom"}] for i in range(n)]


def test_chat_completions_through_the_text_generator(served: ServedModel, tmp_path: Path) -> None:
    cache = tmp_path / "requests.sqlite"
    keys = [f"llm/{i}" for i in range(3)]
    with OpenAITextGenerator(
        served.model, base_url=served.base_url, api_key="x", max_concurrency=2, cache_path=cache
    ) as gen:
        assert gen.backend.is_local
        assert served.model in gen.backend.list_models()
        out = gen.generate(chats(3), temperature=1.0, max_new_tokens=6, seed=0, keys=keys)
        usage = gen.usage()
    assert all(isinstance(text, str) and text.strip() for text in out), out
    assert usage["requests"] == 3 and usage["succeeded"] == 3 and usage["failures"] == 0
    assert 0 < usage["completion_tokens"] <= 3 * 6, "max_new_tokens reached the server as max_tokens"
    assert usage["prompt_tokens"] > 0
    assert usage["cost_known"] is False  # a self-served model has no list price
    with OpenAITextGenerator(served.model, base_url=served.base_url, api_key="x", cache_path=cache) as gen:
        assert gen.generate(chats(3), temperature=1.0, max_new_tokens=6, seed=0, keys=keys) == out
        assert gen.usage()["requests"] == 0 and gen.usage()["cache_hits"] == 3


def test_a_fleet_with_a_dead_endpoint_still_reaches_the_server(served: ServedModel) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with OpenAITextGenerator(
        served.model, base_url=f"{dead},{served.base_url}", api_key="x", max_concurrency=1, backoff_initial=0.05
    ) as gen:
        out = gen.generate(chats(4), max_new_tokens=4)
        by_endpoint = gen.usage()["by_endpoint"]
    assert all(isinstance(text, str) and text for text in out)
    assert by_endpoint[served.base_url]["succeeded"] == 4
    assert by_endpoint[dead]["succeeded"] == 0


def test_a_wrong_model_name_is_one_clear_line(served: ServedModel) -> None:
    with (
        OpenAITextGenerator("not-the-served-model", base_url=served.base_url, api_key="x") as gen,
        pytest.raises(BackendError) as info,
    ):
        gen.generate(chats(1), max_new_tokens=4)
    message = str(info.value)
    assert "\n" not in message and "HTTP 4" in message and "not-the-served-model" in message


def test_embeddings_where_the_server_has_none(served: ServedModel) -> None:
    request = urllib.request.Request(
        f"{served.base_url}/embeddings",
        data=json.dumps({"model": served.model, "input": ["a"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    with OpenAITextEmbedder(served.model, base_url=served.base_url, api_key="x") as embedder:
        if status == 200:  # a later transformers that serves embeddings
            vectors = embedder.embed(["a bedroom", "a face"])
            assert vectors.dtype == np.float32 and vectors.shape[0] == 2
            return
        with pytest.raises(BackendError) as info:
            embedder.embed(["a bedroom"])
    message = str(info.value)
    assert f"HTTP {status}" in message and "embeddings" in message and "\n" not in message
    if status == 404:
        assert "check the model name and base_url" in message
