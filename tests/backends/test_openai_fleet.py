"""Endpoint fleets against real loopback servers on 127.0.0.1 (no mocks, a few seconds in all).

Each server counts what it answered per request fingerprint (the SHA-256 of the body, the same
whichever endpoint it goes to), so "answered exactly once overall" is checked by summing the
servers' own counters, including the counters of a server killed mid-run.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from spti.backends.openai import Endpoint, OpenAIBackend, OpenAITextGenerator
from spti.backends.openai.endpoints import parse_endpoints
from spti.backends.openai_api import describe_endpoint
from spti.errors import BackendError, SptiError
from spti.testing.openai_server import FaultConfig, LoopbackOpenAIServer, chat_reply

KEY = "sk-fleet-test-0123456789"


@pytest.fixture
def fleet() -> Iterator[list[LoopbackOpenAIServer]]:
    servers = [LoopbackOpenAIServer(FaultConfig(latency=0.03, api_key=KEY, keep_bodies=0)).start() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def chats(n: int, prefix: str = "fleet item") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{prefix} {i}"}] for i in range(n)]


def expected(n: int, prefix: str = "fleet item") -> list[str]:
    return [chat_reply(f"{prefix} {i}", max_tokens=128) for i in range(n)]


def answered(servers: list[LoopbackOpenAIServer]) -> collections.Counter[str]:
    """Answers delivered per request fingerprint, summed over the servers."""
    total: collections.Counter[str] = collections.Counter()
    for server in servers:
        total.update(server.stats.completion_counts())
    return total


def options(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"api_key": KEY, "backoff_initial": 0.05, "backoff_max": 0.2, "timeout": 10.0}
    base.update(overrides)
    return base


def test_a_killed_endpoint_loses_no_request_and_none_is_answered_twice(fleet: list[LoopbackOpenAIServer]) -> None:
    n = 300
    endpoints = [Endpoint(s.base_url, max_concurrency=4) for s in fleet]
    victim = fleet[1]
    with OpenAIBackend(endpoints=endpoints, **options()) as backend:
        gen = OpenAITextGenerator("loopback-chat", backend=backend)
        timer = threading.Timer(0.35, victim.kill)  # really stops it: connections reset, port closed
        timer.start()
        start = time.monotonic()
        out = gen.generate(chats(n))
        elapsed = time.monotonic() - start
        timer.join()
        usage = backend.usage()
    assert out == expected(n)
    counts = answered(fleet)
    assert len(counts) == n and set(counts.values()) == {1}, "every request answered exactly once overall"
    assert victim.stats.killed and victim.stats.snapshot()["completed_fingerprints"] > 0
    by_endpoint = usage["by_endpoint"]
    assert list(by_endpoint) == [describe_endpoint(s.base_url) for s in fleet]
    for server in fleet:
        entry = by_endpoint[describe_endpoint(server.base_url)]
        assert entry["succeeded"] == server.stats.snapshot()["completed_fingerprints"]
        if server is victim:  # refused connections never reached it
            assert entry["requests"] >= server.stats.requests
        else:
            assert entry["requests"] == server.stats.requests
    live = [by_endpoint[describe_endpoint(s.base_url)]["succeeded"] for s in (fleet[0], fleet[2])]
    assert min(live) >= n / 4, f"the load is spread over the live endpoints: {live}"
    dead = by_endpoint[describe_endpoint(victim.base_url)]
    assert dead["state"] in ("down", "probing") and dead["times_down"] >= 1
    assert dead["requests"] > dead["succeeded"], "requests were in flight on it when it died, and moved"
    assert usage["retries"] >= dead["requests"] - dead["succeeded"]
    assert usage["succeeded"] == n and usage["failures"] == 0
    assert usage["requests"] == sum(e["requests"] for e in by_endpoint.values())
    assert usage["prompt_tokens"] == sum(e["prompt_tokens"] for e in by_endpoint.values())
    for server in (fleet[0], fleet[2]):
        assert server.stats.max_in_flight <= 4, "each endpoint keeps its own concurrency bound"
    assert elapsed < 10


def test_an_endpoint_down_at_start_is_skipped_without_waiting(fleet: list[LoopbackOpenAIServer]) -> None:
    with LoopbackOpenAIServer() as gone:
        dead_url = gone.base_url  # nothing listens there once it has stopped
    urls = ",".join([dead_url, fleet[0].base_url, fleet[1].base_url])
    # Back-off of 2-4 s per retry: only a fail-over that does not wait finishes in time.
    with OpenAITextGenerator(base_url=urls, max_concurrency=4, **options(backoff_initial=2.0, backoff_max=4.0)) as gen:
        start = time.monotonic()
        out = gen.generate(chats(80))
        elapsed = time.monotonic() - start
        usage = gen.usage()
    assert out == expected(80)
    counts = answered(fleet)
    assert len(counts) == 80 and set(counts.values()) == {1}
    dead = usage["by_endpoint"][describe_endpoint(dead_url)]
    assert dead["succeeded"] == 0 and dead["state"] == "down"
    assert dead["requests"] <= 8, "marked down after a few refused connections"
    assert elapsed < 1.8


def test_retry_after_on_one_endpoint_sends_traffic_to_the_others(fleet: list[LoopbackOpenAIServer]) -> None:
    limited = fleet[0]
    limited.config.rate_429 = 1.0
    limited.config.retry_after = 5.0
    endpoints = [Endpoint(s.base_url, max_concurrency=4) for s in fleet]
    with OpenAIBackend(endpoints=endpoints, **options()) as backend:
        start = time.monotonic()
        out = OpenAITextGenerator(backend=backend).generate(chats(90))
        elapsed = time.monotonic() - start
        usage = backend.usage()
    assert out == expected(90)
    assert elapsed < 4.0, "nobody waited out the 5 s Retry-After"
    assert limited.stats.requests <= 4, "after its 429s the limited endpoint got nothing new"
    assert limited.stats.snapshot()["completed_fingerprints"] == 0
    counts = answered(fleet)
    assert len(counts) == 90 and set(counts.values()) == {1}
    assert usage["by_endpoint"][describe_endpoint(limited.base_url)]["state"] == "cooling"


def test_a_key_out_of_credit_is_taken_out_and_the_others_carry_on(fleet: list[LoopbackOpenAIServer]) -> None:
    broke = fleet[0]
    broke.config.fixed_status, broke.config.fixed_code = 429, "insufficient_quota"
    with OpenAITextGenerator(base_url=f"{broke.base_url},{fleet[1].base_url}", max_concurrency=3, **options()) as gen:
        assert gen.generate(chats(30)) == expected(30)
        assert gen.usage()["by_endpoint"][describe_endpoint(broke.base_url)]["state"] == "disabled"
    assert broke.stats.requests <= 3
    with (
        OpenAITextGenerator(base_url=broke.base_url, **options()) as gen,
        pytest.raises(BackendError, match="out of credit"),
    ):
        gen.generate(chats(2))


def test_a_down_endpoint_is_probed_again_and_comes_back(fleet: list[LoopbackOpenAIServer]) -> None:
    first, second = fleet[0], fleet[1]
    port = first.port
    first.kill()
    options_ = options(endpoint_down_seconds=0.3)
    with OpenAITextGenerator(base_url=f"{first.base_url},{second.base_url}", max_concurrency=4, **options_) as gen:
        assert gen.generate(chats(40)) == expected(40)
        label = describe_endpoint(first.base_url)
        assert gen.usage()["by_endpoint"][label]["state"] == "down"
        revived = LoopbackOpenAIServer(FaultConfig(latency=0.03, api_key=KEY), port=port).start()
        try:
            time.sleep(0.4)
            assert gen.generate(chats(40, "later")) == expected(40, "later")
            assert revived.stats.snapshot()["completed_fingerprints"] > 5, "traffic returns after a probe"
            assert gen.usage()["by_endpoint"][label]["state"] == "up"
        finally:
            revived.stop()


def test_one_cache_serves_the_whole_fleet_whichever_replica_answered(
    fleet: list[LoopbackOpenAIServer], tmp_path: Path
) -> None:
    cache = tmp_path / "requests.sqlite"
    keys = [f"k{i}" for i in range(30)]
    urls = ",".join(s.base_url for s in fleet[:2])
    with OpenAITextGenerator(base_url=urls, cache_path=cache, **options()) as gen:
        first = gen.generate(chats(30), seed=1, keys=keys)
    served = [s.stats.requests for s in fleet[:2]]
    assert sum(served) == 30 and min(served) > 0
    # Another replica of the same model resumes the run: nothing is sent again.
    with OpenAITextGenerator(base_url=fleet[2].base_url, cache_path=cache, **options()) as gen:
        assert gen.generate(chats(30), seed=1, keys=keys) == first
        assert gen.usage()["cache_hits"] == 30
    assert fleet[2].stats.requests == 0


def test_per_endpoint_limits_and_keys(fleet: list[LoopbackOpenAIServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_KEY_A", KEY)
    monkeypatch.setenv("FLEET_KEY_B", KEY)
    endpoints = parse_endpoints(
        endpoints=[
            {"base_url": fleet[0].base_url, "api_key_env": "FLEET_KEY_A", "max_concurrency": 2},
            {"base_url": fleet[0].base_url, "api_key_env": "FLEET_KEY_B", "max_concurrency": 2},
            {"base_url": fleet[1].base_url, "api_key_env": "FLEET_KEY_A", "max_concurrency": 6, "name": "big"},
        ]
    )
    with OpenAIBackend(endpoints=endpoints, backoff_initial=0.05) as backend:
        OpenAITextGenerator(backend=backend).generate(chats(60))
        usage = backend.usage()
        assert backend.max_concurrency == 10
    url = describe_endpoint(fleet[0].base_url)
    assert list(usage["by_endpoint"]) == [f"{url} [FLEET_KEY_A]", f"{url} [FLEET_KEY_B]", "big"]
    assert fleet[0].stats.max_in_flight <= 4 and fleet[1].stats.max_in_flight <= 6
    assert all(e["succeeded"] > 0 for e in usage["by_endpoint"].values())
    # gpt-4o-mini is priced: the cost is split per endpoint and adds up to the total.
    assert all(e["cost_usd"] > 0 for e in usage["by_endpoint"].values())
    assert sum(e["cost_usd"] for e in usage["by_endpoint"].values()) == pytest.approx(usage["cost_usd"])
    assert usage["by_endpoint"]["big"]["by_model"]["gpt-4o-mini"]["requests"] == usage["by_endpoint"]["big"]["requests"]
    assert KEY not in repr(endpoints) and KEY not in repr(usage)


def test_fleet_formats_and_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    one = parse_endpoints("http://a:8000/v1/, http://b:8000/v1", api_key_env="ROLE_KEY")
    assert [(e.base_url, e.api_key_env) for e in one] == [
        ("http://a:8000/v1", "ROLE_KEY"),
        ("http://b:8000/v1", "ROLE_KEY"),
    ]
    tables = parse_endpoints(endpoints=[{"base_url": "http://a:1/v1"}, "http://b:2/v1"], api_key_env="K")
    assert [e.api_key_env for e in tables] == ["K", "K"]
    assert tables[0].as_table() == {"base_url": "http://a:1/v1", "api_key_env": "K"}
    assert describe_endpoint("http://u:p@a:1/v1,http://b:2/v1") == "http://a:1/v1, http://b:2/v1"
    with pytest.raises(SptiError, match="api_key_env"):
        parse_endpoints(endpoints=[{"base_url": "http://a:1/v1", "api_key": "sk-secret"}])
    with pytest.raises(SptiError, match="unknown key 'url'"):
        parse_endpoints(endpoints=[{"url": "http://a:1/v1"}])
    with pytest.raises(SptiError, match="not both"):
        parse_endpoints("http://a:1/v1", endpoints=["http://b:1/v1"])
    with pytest.raises(SptiError, match="empty entry"):
        parse_endpoints("http://a:1/v1,,http://b:1/v1")
    with pytest.raises(SptiError, match="never the key itself"):
        Endpoint("http://a:1/v1", api_key_env="sk-abcdefghijkl")
    monkeypatch.delenv("NO_SUCH_FLEET_KEY", raising=False)
    with pytest.raises(SptiError, match=r"\$NO_SUCH_FLEET_KEY.*not set"):
        OpenAIBackend(endpoints=[Endpoint("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_FLEET_KEY")])
    with OpenAIBackend(base_url="http://127.0.0.1:9/v1,http://localhost:10/v1", api_key="x") as backend:
        assert backend.is_local
        assert backend.endpoint_description("m") == "http://127.0.0.1:9/v1, http://localhost:10/v1 (model m)"
