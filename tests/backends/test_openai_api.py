"""The OpenAI-compatible providers against a real loopback HTTP server (offline, a few seconds).

Every test talks HTTP to :mod:`spti.testing.openai_server` on 127.0.0.1, so retries, headers,
connection pooling and the SQLite cache are exercised as they run against a hosted API.
"""

from __future__ import annotations

import _thread
import base64
import io
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from PIL import Image

from spti.backends.base import Captioner, ImageGenerator, TextEmbedder, TextGenerator
from spti.backends.openai_api import (
    ModelPrice,
    OpenAIBackend,
    OpenAICaptioner,
    OpenAIImageGenerator,
    OpenAITextEmbedder,
    OpenAITextGenerator,
    _retry_after,
    describe_endpoint,
)
from spti.backends.request_cache import RequestCache, cache_key
from spti.errors import BackendError, SptiError
from spti.testing.openai_server import (
    FaultConfig,
    LoopbackOpenAIServer,
    chat_reply,
    embedding_vector,
    image_colors,
    prompt_text,
)

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def server() -> Iterator[LoopbackOpenAIServer]:
    with LoopbackOpenAIServer(FaultConfig(api_key=KEY, keep_bodies=256)) as srv:
        yield srv


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Both HTTP transports the SDK can run on: retries and timeouts must behave the same."""
    return str(request.param)


def fast(**overrides: object) -> dict[str, object]:
    """Connection options with short back-offs so fault tests finish quickly."""
    options: dict[str, object] = {"api_key": KEY, "backoff_initial": 0.01, "backoff_max": 0.05, "timeout": 10.0}
    options.update(overrides)
    return options


def chats(n: int, prefix: str = "item") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{prefix} {i}"}] for i in range(n)]


def expected(n: int, prefix: str = "item", max_tokens: int = 128) -> list[str]:
    return [chat_reply(f"{prefix} {i}", max_tokens=max_tokens) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Basic behaviour


def test_providers_satisfy_the_interfaces(server: LoopbackOpenAIServer) -> None:
    with OpenAIBackend(base_url=server.base_url, api_key=KEY) as backend:
        assert isinstance(OpenAICaptioner(backend=backend), Captioner)
        assert isinstance(OpenAITextGenerator(backend=backend), TextGenerator)
        assert isinstance(OpenAITextEmbedder(backend=backend), TextEmbedder)
        assert isinstance(OpenAIImageGenerator(backend=backend), ImageGenerator)


def test_answers_keep_order_and_pass_parameters(server: LoopbackOpenAIServer, transport: str) -> None:
    with OpenAITextGenerator("gpt-4o-mini", base_url=server.base_url, api_key=KEY, http_client=transport) as gen:
        assert gen.backend.http_transport == transport
        out = gen.generate(chats(40), temperature=0.7, top_p=0.9, max_new_tokens=9)
    assert out == expected(40, max_tokens=9)
    body = server.stats.recent_bodies("chat")[-1]
    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["max_tokens"] == 9
    assert body["model"] == "gpt-4o-mini"
    assert "seed" not in body


def test_seed_is_sent_per_item_and_reproducible(server: LoopbackOpenAIServer) -> None:
    with OpenAITextGenerator(base_url=server.base_url, api_key=KEY) as gen:
        same = [[{"role": "user", "content": "same prompt"}]] * 3
        first = gen.generate(same, seed=7, keys=["a", "b", "c"])
        seeds = [b["seed"] for b in server.stats.recent_bodies("chat")]
        again = gen.generate(same, seed=7, keys=["a", "b", "c"])
    assert len(set(seeds)) == 3, "identical prompts must get distinct per-item seeds"
    assert first == again
    assert len(set(first)) == 3


def test_empty_batch_sends_nothing(server: LoopbackOpenAIServer) -> None:
    with OpenAITextGenerator(base_url=server.base_url, api_key=KEY) as gen:
        assert gen.generate([]) == []
    assert server.stats.requests == 0


def test_one_client_is_reused_across_calls(server: LoopbackOpenAIServer) -> None:
    with OpenAITextGenerator(base_url=server.base_url, api_key=KEY) as gen:
        client = gen.backend._client
        thread = gen.backend._loop_thread.thread
        gen.generate(chats(3))
        gen.generate(chats(3, "other"))
        assert gen.backend._client is client
        assert gen.backend._loop_thread.thread is thread and thread.is_alive()
    assert not thread.is_alive()


# ---------------------------------------------------------------------------------------------
# Faults, retries, limits


def test_all_requests_complete_under_injected_faults(server: LoopbackOpenAIServer, transport: str) -> None:
    server.config.latency = 0.01
    server.config.jitter = 0.5
    server.config.rate_429 = 0.2
    server.config.retry_after = 0.02
    server.config.rate_500 = 0.1
    server.config.rate_refusal = 0.1
    server.config.rate_empty = 0.05
    options = fast(empty_retries=4, max_retries=8, http_client=transport)
    with OpenAITextGenerator(base_url=server.base_url, **options) as gen:
        out = gen.generate(chats(80))
        usage = gen.usage()
    assert out == expected(80)
    snap = server.stats.snapshot()
    assert snap["by_status"].get("429", 0) > 0 and snap["by_status"].get("500", 0) > 0
    assert usage["succeeded"] == 80
    assert usage["retries"] == snap["requests"] - 80
    assert usage["failures"] == 0 and gen.failures == []


def test_slow_answers_time_out_and_are_retried(server: LoopbackOpenAIServer, transport: str) -> None:
    server.config.script = {"slow one": ["slow:1.5", "ok"]}
    with OpenAITextGenerator(base_url=server.base_url, **fast(timeout=0.3, http_client=transport)) as gen:
        start = time.monotonic()
        out = gen.generate([[{"role": "user", "content": "slow one"}], *chats(3)])
        elapsed = time.monotonic() - start
    assert out == [chat_reply("slow one", max_tokens=128), *expected(3)]
    assert server.stats.snapshot()["max_attempts_per_fingerprint"] == 2
    assert elapsed < 1.4, "the timed-out attempt must not be waited for"


@pytest.mark.parametrize("send_ms", [True, False])
def test_retry_after_is_honoured(server: LoopbackOpenAIServer, send_ms: bool) -> None:
    wait = 0.4 if send_ms else 1.0  # without retry-after-ms the header is whole seconds
    server.config.retry_after = wait
    server.config.send_retry_after_ms = send_ms
    server.config.script = {"limited": ["429", "ok"]}
    with OpenAITextGenerator(base_url=server.base_url, **fast()) as gen:
        start = time.monotonic()
        out = gen.generate([[{"role": "user", "content": "limited"}]])
        elapsed = time.monotonic() - start
    assert out == [chat_reply("limited", max_tokens=128)]
    assert server.stats.requests == 2
    assert wait <= elapsed < wait * 1.1 + 0.5


def test_retry_after_header_parsing() -> None:
    assert _retry_after({"retry-after-ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert _retry_after({"retry-after": "2"}) == 2.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (_retry_after({"retry-after": future}) or 0) <= 31
    assert _retry_after({"retry-after": "soon"}) is None
    assert _retry_after({}) is None


def test_bad_key_fails_fast_with_one_clear_line(server: LoopbackOpenAIServer, transport: str) -> None:
    wrong = "sk-wrong-key-ABCDEFGHIJKLMNOP"
    options = fast(api_key=wrong, http_client=transport)
    with OpenAITextGenerator("gpt-4o-mini", base_url=server.base_url, **options) as gen:
        start = time.monotonic()
        with pytest.raises(BackendError) as info:
            gen.generate(chats(10))
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message
    assert "401" in message and "chat/completions" in message and "gpt-4o-mini" in message
    assert "Incorrect API key" in message, "the server's own message must be shown"
    assert wrong not in message and KEY not in message
    # No retries: each request was sent at most once, and the batch stopped admitting new ones.
    assert server.stats.snapshot()["max_attempts_per_fingerprint"] == 1
    assert elapsed < 2.0


def test_bad_request_is_not_retried(server: LoopbackOpenAIServer) -> None:
    server.config.script = {"malformed": ["400", "ok"]}
    with OpenAITextGenerator(base_url=server.base_url, **fast()) as gen, pytest.raises(BackendError, match="400"):
        gen.generate([[{"role": "user", "content": "malformed"}]])
    assert server.stats.requests == 1


def test_unknown_model_is_a_clear_404(server: LoopbackOpenAIServer) -> None:
    server.config.models = ["gpt-4o-mini"]
    with OpenAITextGenerator("no-such-model", base_url=server.base_url, **fast()) as gen:
        assert gen.backend.list_models() == ["gpt-4o-mini"]
        with pytest.raises(BackendError, match=r"404.*does not exist"):
            gen.generate(chats(1))
    assert server.stats.snapshot()["by_endpoint"] == {"chat": 1}


def test_persistent_server_errors_raise_after_retries(server: LoopbackOpenAIServer) -> None:
    server.config.fixed_status = 503
    with OpenAITextGenerator(base_url=server.base_url, **fast(max_retries=2)) as gen:
        with pytest.raises(BackendError, match=r"failed after 2 retries.*HTTP 503"):
            gen.generate(chats(4))
        assert {f.reason for f in gen.failures} == {"transient"}
    assert server.stats.requests == 4 * 3


def test_a_server_that_is_down_stops_the_batch_early(server: LoopbackOpenAIServer) -> None:
    server.config.fixed_status = 502
    options = fast(max_retries=1, max_concurrency=4)
    with OpenAITextGenerator(base_url=server.base_url, **options) as gen, pytest.raises(BackendError, match="502"):
        gen.generate(chats(200))
    # 8 consecutive failures stop admitting work; without that, 200 items x 2 attempts.
    assert server.stats.requests < 60


def test_unreachable_server_raises(transport: str) -> None:
    with LoopbackOpenAIServer() as srv:
        url = srv.base_url  # a port that is free again once the server stops
    options = fast(max_retries=1, http_client=transport)
    with OpenAITextGenerator(base_url=url, **options) as gen, pytest.raises(BackendError, match=r"127\.0\.0\.1"):
        gen.generate(chats(2))


def test_refusals_become_none_and_are_recorded(server: LoopbackOpenAIServer) -> None:
    server.config.script = {"refuse me": ["refusal"] * 10, "filter me": ["filter"] * 10, "say nothing": ["empty"] * 10}
    convs = [
        [{"role": "user", "content": "refuse me"}],
        *chats(2),
        [{"role": "user", "content": "filter me"}],
        [{"role": "user", "content": "say nothing"}],
    ]
    with OpenAITextGenerator(base_url=server.base_url, **fast(empty_retries=2)) as gen:
        out = gen.generate(convs, keys=["r", "ok0", "ok1", "f", "e"])
    assert out[0] is None and out[3] is None and out[4] is None
    assert out[1:3] == expected(2)
    reasons = {f.item: f.reason for f in gen.failures}
    assert reasons == {"r": "refusal", "f": "content_filter", "e": "empty"}
    assert server.stats.snapshot()["max_attempts_per_fingerprint"] == 3  # 1 + empty_retries


def test_a_refusal_that_clears_on_retry_is_answered(server: LoopbackOpenAIServer) -> None:
    server.config.script = {"shy": ["refusal", "ok"]}
    with OpenAITextGenerator(base_url=server.base_url, **fast()) as gen:
        assert gen.generate([[{"role": "user", "content": "shy"}]]) == [chat_reply("shy", max_tokens=128)]
        assert gen.failures == []


def test_concurrency_bound_is_respected(server: LoopbackOpenAIServer) -> None:
    server.config.latency = 0.05
    with OpenAITextGenerator(base_url=server.base_url, **fast(max_concurrency=5)) as gen:
        gen.generate(chats(40))
    assert server.stats.max_in_flight == 5


def test_requests_per_minute_limit_slows_requests(server: LoopbackOpenAIServer) -> None:
    # 600/min = 10/s with a burst of one second's worth (10): 25 requests need >= 1.5 s.
    with OpenAITextGenerator(base_url=server.base_url, **fast(requests_per_minute=600)) as gen:
        start = time.monotonic()
        gen.generate(chats(25))
        elapsed = time.monotonic() - start
    assert elapsed >= 1.4
    times = server.stats.request_times
    assert times[9] - times[0] < 0.5, "the burst allowance goes out at once"
    assert times[24] - times[9] >= 1.4, "then one request per 0.1 s"


def test_tokens_per_minute_limit_slows_requests(server: LoopbackOpenAIServer) -> None:
    # Each request is estimated at max_new_tokens (20) plus its prompt (~5): 6000/min = 100/s
    # with a burst of 100, so 8 requests (~200 tokens) need about 1 s.
    with OpenAITextGenerator(base_url=server.base_url, **fast(tokens_per_minute=6000)) as gen:
        start = time.monotonic()
        gen.generate(chats(8), max_new_tokens=20)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.8


# ---------------------------------------------------------------------------------------------
# Cache and resume


def test_restart_over_the_same_cache_sends_no_request(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    cache = tmp_path / "state" / "requests.sqlite"
    keys = [f"vary/r0/{i}" for i in range(20)]
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast()) as gen:
        first = gen.generate(chats(20), seed=3, keys=keys)
    sent = server.stats.requests
    assert sent == 20
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast()) as gen:
        again = gen.generate(chats(20), seed=3, keys=keys)
        usage = gen.usage()
    assert again == first
    assert server.stats.requests == sent
    assert usage["cache_hits"] == 20 and usage["requests"] == 0 and usage["cost_usd"] == 0


def test_failures_are_not_cached(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    cache = tmp_path / "requests.sqlite"
    server.config.script = {"refuse twice": ["refusal", "refusal", "ok"]}
    conv = [[{"role": "user", "content": "refuse twice"}]]
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast(empty_retries=1)) as gen:
        assert gen.generate(conv) == [None]
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast(empty_retries=1)) as gen:
        assert gen.generate(conv) == [chat_reply("refuse twice", max_tokens=128)]
    assert server.stats.requests == 3


def test_item_keys_separate_identical_prompts(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    same = [[{"role": "user", "content": "identical"}]] * 2
    with OpenAITextGenerator(base_url=server.base_url, cache_path=tmp_path / "c.sqlite", **fast()) as gen:
        gen.generate(same, keys=["sample/0", "sample/1"])
        assert server.stats.requests == 2
        gen.generate(same, keys=["sample/2", "sample/2"])  # one sample named twice: one request
        assert server.stats.requests == 3
        gen.generate(same, keys=["sample/0", "sample/1"])  # both cached
        assert server.stats.requests == 3
    with pytest.raises(SptiError, match="one key per item"):
        OpenAITextGenerator(base_url=server.base_url, api_key=KEY).generate(same, keys=["only one"])


def test_api_key_never_reaches_cache_logs_or_reprs(
    server: LoopbackOpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "requests.sqlite"
    server.config.script = {"item 3": ["429", "ok"], "no answer": ["refusal"] * 5}
    server.config.retry_after = 0.01
    caplog.set_level(logging.DEBUG)
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast()) as gen:
        gen.generate([*chats(10), [{"role": "user", "content": "no answer"}]], keys=[str(i) for i in range(11)])
        texts = [repr(gen), repr(gen.backend), json.dumps(gen.usage()), repr(gen.failures)]
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("requests.sqlite"))
    assert len(RequestCache(cache)) == 10
    raw += cache.read_bytes()
    assert KEY.encode() not in raw
    assert all(KEY not in t for t in texts)
    assert KEY not in caplog.text


def test_interrupt_lets_requests_in_flight_finish_and_resume_repeats_none(
    server: LoopbackOpenAIServer, tmp_path: Path
) -> None:
    server.config.latency = 0.3
    cache = tmp_path / "requests.sqlite"
    keys = [f"k{i}" for i in range(40)]
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast(max_concurrency=8)) as gen:
        timer = threading.Timer(0.45, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            gen.generate(chats(40), keys=keys)
        timer.join()
    done = server.stats.snapshot()
    assert 8 <= done["completed_fingerprints"] < 40
    assert len(RequestCache(cache)) == done["completed_fingerprints"], "every answer received was cached"
    with OpenAITextGenerator(base_url=server.base_url, cache_path=cache, **fast(max_concurrency=8)) as gen:
        assert gen.generate(chats(40), keys=keys) == expected(40)
    snap = server.stats.snapshot()
    assert snap["completed_fingerprints"] == 40
    assert snap["max_attempts_per_fingerprint"] == 1, "no request was sent twice"


def test_cache_key_depends_on_everything_that_shapes_the_answer() -> None:
    base = {"endpoint": "chat/completions", "model": "m", "request": {"messages": [1], "t": 1.0}, "item_key": "a"}
    k = cache_key(**base)  # type: ignore[arg-type]
    assert k == cache_key(**{**base, "request": {"t": 1.0, "messages": [1]}})  # type: ignore[arg-type]
    for change in ({"endpoint": "embeddings"}, {"model": "n"}, {"item_key": "b"}, {"request": {"messages": [1]}}):
        assert cache_key(**{**base, **change}) != k  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Usage and cost


def test_usage_and_cost_are_counted(server: LoopbackOpenAIServer) -> None:
    prices = {"loopback-chat": ModelPrice(1.0, 2.0)}
    with OpenAIBackend(base_url=server.base_url, api_key=KEY, prices=prices) as backend:
        OpenAITextGenerator("loopback-chat", backend=backend).generate(chats(5))
        OpenAITextGenerator("gpt-4o-mini-2024-07-18", backend=backend).generate(chats(5, "snap"))
        OpenAITextGenerator("mystery-model", backend=backend).generate(chats(2))
        usage = backend.usage()
    loop = usage["by_model"]["loopback-chat"]
    assert loop["requests"] == 5 and loop["succeeded"] == 5
    assert loop["completion_tokens"] == sum(len(a.split()) for a in expected(5))
    assert loop["cost_usd"] == pytest.approx((loop["prompt_tokens"] * 1.0 + loop["completion_tokens"] * 2.0) / 1e6)
    snap = usage["by_model"]["gpt-4o-mini-2024-07-18"]
    assert snap["cost_known"] and snap["cost_usd"] == pytest.approx(
        (snap["prompt_tokens"] * 0.15 + snap["completion_tokens"] * 0.60) / 1e6
    )
    assert usage["cost_known"] is False and usage["unpriced_models"] == ["mystery-model"]
    assert usage["requests"] == 12
    assert usage["prompt_tokens"] == sum(m["prompt_tokens"] for m in usage["by_model"].values())


# ---------------------------------------------------------------------------------------------
# Captions, embeddings, images


def test_captioner_sends_exactly_one_image_per_request_as_a_data_url(server: LoopbackOpenAIServer) -> None:
    images = [Image.new("RGB", (40 + i, 30), (i * 40, 10, 200)) for i in range(5)]
    images.append(Image.new("L", (2000, 1000), 128))  # grey and large: converted and shrunk
    with OpenAICaptioner("gpt-4o-mini", base_url=server.base_url, api_key=KEY) as captioner:
        out = captioner.caption(images, prompt="Describe the image.", max_new_tokens=30)
    bodies = server.stats.recent_bodies("chat")
    assert len(bodies) == 6
    sizes = set()
    by_text = {}
    for body in bodies:
        assert len(body["messages"]) == 1
        parts = body["messages"][0]["content"]
        image_parts = [p for p in parts if p["type"] == "image_url"]
        assert len(image_parts) == 1
        assert [p["text"] for p in parts if p["type"] == "text"] == ["Describe the image."]
        url = image_parts[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        sizes.add(decoded.size)
        assert body["max_tokens"] == 30
        by_text[prompt_text(body["messages"])] = chat_reply(prompt_text(body["messages"]), max_tokens=30)
    assert (1024, 512) in sizes and (40, 30) in sizes
    assert sorted(out) == sorted(by_text.values())  # type: ignore[type-var]
    assert all(isinstance(c, str) and c for c in out)


def test_captions_are_cached_by_pixels_and_key(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    images = [Image.new("RGB", (16, 16), (i, i, i)) for i in range(4)]
    keys = [f"caption/img_{i}" for i in range(4)]
    cache = tmp_path / "requests.sqlite"
    with OpenAICaptioner(base_url=server.base_url, api_key=KEY, cache_path=cache) as captioner:
        first = captioner.caption(images, keys=keys)
    with OpenAICaptioner(base_url=server.base_url, api_key=KEY, cache_path=cache) as captioner:
        copies = [im.copy() for im in images]
        assert captioner.caption(copies, keys=keys) == first
    assert server.stats.requests == 4


def test_text_embedder_batches_keeps_order_and_caches_each_text(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    texts = [f"caption number {i}" for i in range(10)] + ["caption number 3", ""]
    cache = tmp_path / "requests.sqlite"
    with OpenAITextEmbedder(
        "text-embedding-3-small", base_url=server.base_url, api_key=KEY, batch_size=4, cache_path=cache
    ) as embedder:
        vectors = embedder.embed(texts)
        assert server.stats.requests == 3  # 11 distinct texts, 4 per request
        more = embedder.embed(["caption number 0", "a new caption"])
        assert server.stats.requests == 4
        assert embedder.embed([]).shape == (0, 64)
    assert vectors.dtype == np.float32 and vectors.shape == (12, 64)
    for row, text in zip(vectors, texts, strict=True):
        np.testing.assert_allclose(row, embedding_vector(text or " ", 64), rtol=1e-6)
    np.testing.assert_array_equal(more[0], vectors[0])
    assert all(len(b["input"]) <= 4 for b in server.stats.recent_bodies("embeddings"))


def test_embedding_dimensions_are_passed(server: LoopbackOpenAIServer) -> None:
    with OpenAITextEmbedder(base_url=server.base_url, api_key=KEY, dimensions=16) as embedder:
        assert embedder.embed(["a", "b"]).shape == (2, 16)


def test_image_generator_returns_sized_rgb_images_and_caches_them(server: LoopbackOpenAIServer, tmp_path: Path) -> None:
    cache = tmp_path / "requests.sqlite"
    with OpenAIImageGenerator(
        "loopback-image", base_url=server.base_url, api_key=KEY, seed_param="seed", cache_path=cache
    ) as gen:
        images = gen.generate(["a bedroom", "a face", "a bedroom"], seeds=[1, 2, 3], width=48, height=32)
        again = gen.generate(["a bedroom", "a face", "a bedroom"], seeds=[1, 2, 3], width=48, height=32)
    assert server.stats.requests == 3
    assert [im.size for im in images] == [(48, 32)] * 3 and all(im.mode == "RGB" for im in images)
    top, bottom = image_colors("a bedroom", 1)
    assert images[0].getpixel((0, 0)) == top and images[0].getpixel((0, 31)) == bottom
    assert images[0].tobytes() != images[2].tobytes(), "same prompt, different seed"
    assert [a.tobytes() for a in again] == [im.tobytes() for im in images]
    body = server.stats.recent_bodies("images")[0]
    assert body["size"] == "48x32" and body["response_format"] == "b64_json" and body["n"] == 1


def test_gpt_image_models_are_not_sent_response_format(server: LoopbackOpenAIServer) -> None:
    with OpenAIImageGenerator("gpt-image-1", base_url=server.base_url, api_key=KEY) as gen:
        (image,) = gen.generate(["a quiet bedroom"], width=32, height=32)
    assert image.size == (32, 32)
    assert "response_format" not in server.stats.recent_bodies("images")[0]


def test_image_variation_uses_the_edits_endpoint(server: LoopbackOpenAIServer) -> None:
    source = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))]
    with OpenAIImageGenerator(base_url=server.base_url, api_key=KEY) as gen:
        varied = gen.vary(source, ["make it blue", "make it red"], seeds=[1, 2])
    assert [v.size for v in varied] == [(32, 32), (24, 24)]
    assert server.stats.snapshot()["by_endpoint"] == {"image_edits": 2}
    with (
        OpenAIImageGenerator(base_url=server.base_url, api_key=KEY, supports_edits=False) as gen,
        pytest.raises(SptiError, match="no image-to-image"),
    ):
        gen.vary(source, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Configuration and description


def test_endpoint_description_hides_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    assert describe_endpoint("http://user:pw@10.0.0.5:8000/v1/") == "http://10.0.0.5:8000/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-box:9000/v1")
    assert describe_endpoint() == "http://gpu-box:9000/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert describe_endpoint() == "https://api.openai.com/v1"
    with pytest.raises(SptiError, match="http"):
        describe_endpoint("localhost:8000")


def test_defaults_come_from_the_environment(server: LoopbackOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with OpenAITextGenerator() as gen:
        assert gen.generate(chats(1)) == expected(1)
        assert gen.endpoint_description() == f"{server.base_url} (model gpt-4o-mini)"
        assert gen.backend.is_local


def test_openai_without_a_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SptiError, match="OPENAI_API_KEY"):
        OpenAITextGenerator()


def test_backend_and_options_are_exclusive(server: LoopbackOpenAIServer) -> None:
    with OpenAIBackend(base_url=server.base_url, api_key=KEY) as backend, pytest.raises(SptiError, match="either"):
        OpenAITextGenerator(backend=backend, max_concurrency=3)


def test_server_runs_as_a_separate_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spti.testing.openai_server", "--port", "0", "--latency", "0.01"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        with OpenAITextGenerator(base_url=info["base_url"], api_key="anything") as gen:
            assert gen.generate(chats(3)) == expected(3)
        with urllib.request.urlopen(info["base_url"].replace("/v1", "/_spti/stats"), timeout=5) as response:
            assert json.load(response)["requests"] == 3
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
