"""Throughput of the OpenAI-compatible provider against the loopback server in another process.

What it measures (one JSON line each, then a summary line):

1. ``ideal``: N chat requests at mean latency L and concurrency C; wall time against the ideal
   N/C·L (bar: ≤ 1.15×).
2. ``bare``: the same requests from a bare ``AsyncOpenAI`` client with ``asyncio.Semaphore(C)``
   in the same run; ours must not be slower (bar: ours ≤ 1.05 × bare, noise allowance).
3. ``rate_limited``: the same with 5 % of attempts answered 429 with ``Retry-After`` = L
   (1 s in the full run) (bar ≤ 1.5×).
4. ``interrupt_resume``: a real SIGINT half-way, then a new provider over the same cache runs
   the whole batch: the server must have completed every request exactly once.
5. ``ceiling``: requests/s at zero latency and at 100 ms (ours and bare), i.e. the CPU cost
   per request of client + server sharing this machine.
6. ``fleet``: the same N requests against one endpoint and then against a fleet of three (each
   server in its own process, each endpoint with concurrency C), one of them crashed on purpose
   (SIGUSR1: connections reset, port closed) a third of the way through (at least 1.5 L, so it
   answered a first wave): requests/s of both, and
   from the servers' own counters that every request was answered exactly once overall
   (bar: fleet ≥ 1.5 × one endpoint, 0 lost, 0 answered twice). For scale, one endpoint with
   concurrency 3C (the client's cost of that many requests in flight, without routing).

Usage::

    python benchmarks/bench_openai_throughput.py            # full: 640 requests, C=64, L=1 s
    python benchmarks/bench_openai_throughput.py --quick    # about 15 s
    python benchmarks/bench_openai_throughput.py --only-fleet --out benchmarks/results/openai_throughput.jsonl

Exit status 1 if a bar is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spti.backends.openai_api import OpenAITextGenerator

MODEL = "loopback-chat"
MAX_TOKENS = 32


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import openai

    return {
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine during the run
        "openai": openai.__version__,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Server:
    """The loopback server as a child process, controlled over HTTP."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spti.testing.openai_server", "--port", "0", "--latency", str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the loopback server did not start")
        self.base_url: str = json.loads(line)["base_url"]
        self.root = self.base_url.removesuffix("/v1")

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.root + path, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def configure(self, **settings: Any) -> None:
        self._call("/_spti/config", settings)
        self._call("/_spti/reset", {})

    def stats(self) -> dict[str, Any]:
        return self._call("/_spti/stats")

    def completions(self) -> dict[str, int]:
        """Answers delivered per request fingerprint (after :meth:`crash`: the final count)."""
        if self.final is not None:
            return dict(self.final["completions"])
        return self._call("/_spti/completions")

    final: dict[str, Any] | None = None

    def crash(self) -> None:
        """SIGUSR1: the server resets its connections, closes its port, prints its counters, exits."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{") and '"killed"' in line:
                self.final = json.loads(line)
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def rss_mb(self) -> float | None:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except Exception:
            return None

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def server(latency: float) -> Iterator[Server]:
    srv = Server(latency)
    try:
        yield srv
    finally:
        srv.close()


def conversations(tag: str, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag}: write a short description number {i}"}] for i in range(n)]


def run_ours(base_url: str, convs: list[list[dict[str, str]]], concurrency: int, **options: Any) -> float:
    with OpenAITextGenerator(
        MODEL, base_url=base_url, api_key="sk-bench", max_concurrency=concurrency, **options
    ) as gen:
        start = time.perf_counter()
        out = gen.generate(convs, temperature=1.0, top_p=1.0, max_new_tokens=MAX_TOKENS)
        elapsed = time.perf_counter() - start
    missing = sum(1 for o in out if o is None)
    if missing:
        raise RuntimeError(f"{missing} requests got no answer")
    return elapsed


def run_bare(base_url: str, convs: list[list[dict[str, str]]], concurrency: int) -> float:
    from openai import AsyncOpenAI

    async def main() -> float:
        client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(messages: list[dict[str, str]]) -> str | None:
            async with semaphore:
                response = await client.chat.completions.create(
                    model=MODEL, messages=messages, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS
                )
                return response.choices[0].message.content

        start = time.perf_counter()
        await asyncio.gather(*(one(m) for m in convs))
        elapsed = time.perf_counter() - start
        await client.close()
        return elapsed

    return asyncio.run(main())


def emit(record: dict[str, Any], results: list[dict[str, Any]], srv: Server | None = None) -> None:
    record = {"bench": "openai_throughput", **record, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if srv is not None:
        rss = srv.rss_mb()
        record["server_rss_mb"] = None if rss is None else round(rss, 1)
    record["machine"] = machine()
    results.append(record)
    print(json.dumps(record), flush=True)


def bench_latency(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    n, c, latency = args.requests, args.concurrency, args.latency
    ideal = n / c * latency
    with server(latency) as srv:
        # Warm both clients first: the SDK imports and builds its response models on first use.
        srv.configure(latency=0.0)
        run_ours(srv.base_url, conversations("warm-ours", c), c)
        run_bare(srv.base_url, conversations("warm-bare", c), c)
        srv.configure(latency=latency)
        ours = run_ours(srv.base_url, conversations("ours", n), c)
        stats = srv.stats()
        emit(
            {
                "measurement": "ideal",
                "requests": n,
                "concurrency": c,
                "latency_s": latency,
                "seconds": round(ours, 3),
                "ideal_s": ideal,
                "ratio": round(ours / ideal, 3),
                "bar": 1.15,
                "pass": ours / ideal <= 1.15 and stats["requests"] == n and stats["max_in_flight"] <= c,
                "server_requests": stats["requests"],
                "server_max_in_flight": stats["max_in_flight"],
            },
            results,
            srv,
        )
        srv.configure()
        bare = run_bare(srv.base_url, conversations("bare", n), c)
        emit(
            {
                "measurement": "bare",
                "requests": n,
                "concurrency": c,
                "latency_s": latency,
                "seconds": round(bare, 3),
                "ours_seconds": round(ours, 3),
                "ratio": round(ours / bare, 3),
                "ratio_to_ideal": round(bare / ideal, 3),
                "bar": 1.05,
                "pass": ours <= bare * 1.05,
                "server_max_in_flight": srv.stats()["max_in_flight"],
            },
            results,
            srv,
        )

        retry_after = latency  # 1 s in the full run
        srv.configure(rate_429=0.05, retry_after=retry_after)
        limited = run_ours(srv.base_url, conversations("limited", n), c)
        stats = srv.stats()
        emit(
            {
                "measurement": "rate_limited",
                "requests": n,
                "concurrency": c,
                "latency_s": latency,
                "rate_429": 0.05,
                "retry_after_s": retry_after,
                "seconds": round(limited, 3),
                "ideal_s": ideal,
                "ratio": round(limited / ideal, 3),
                "bar": 1.5,
                "pass": limited / ideal <= 1.5,
                "server_requests": stats["requests"],
                "server_429": stats["by_status"].get("429", 0),
            },
            results,
            srv,
        )

        srv.configure(rate_429=0.0)
        convs = conversations("resume", n)
        keys = [f"resume/{i}" for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "state" / "requests.sqlite"
            # Half-way, in the middle of a wave, so requests are in flight when it arrives.
            timer = threading.Timer(ideal / 2 + latency / 2, os.kill, (os.getpid(), signal.SIGINT))
            interrupted = False
            start = time.perf_counter()
            with OpenAITextGenerator(
                MODEL, base_url=srv.base_url, api_key="sk-bench", max_concurrency=c, cache_path=cache
            ) as gen:
                timer.start()
                try:
                    gen.generate(convs, max_new_tokens=MAX_TOKENS, keys=keys)
                except KeyboardInterrupt:
                    interrupted = True
            first = time.perf_counter() - start
            timer.cancel()
            before = srv.stats()
            start = time.perf_counter()
            with OpenAITextGenerator(
                MODEL, base_url=srv.base_url, api_key="sk-bench", max_concurrency=c, cache_path=cache
            ) as gen:
                out = gen.generate(convs, max_new_tokens=MAX_TOKENS, keys=keys)
                hits = gen.usage()["cache_hits"]
            second = time.perf_counter() - start
        after = srv.stats()
        ok = (
            interrupted
            and all(o is not None for o in out)
            and after["completed_fingerprints"] == n
            and after["max_attempts_per_fingerprint"] == 1
            and after["duplicated_completions"] == 0
        )
        emit(
            {
                "measurement": "interrupt_resume",
                "requests": n,
                "concurrency": c,
                "latency_s": latency,
                "interrupted": interrupted,
                "first_run_seconds": round(first, 3),
                "interrupt_at_s": ideal / 2 + latency / 2,
                "completed_before_resume": before["completed_fingerprints"],
                "resume_cache_hits": hits,
                "resume_seconds": round(second, 3),
                "server_requests": after["requests"],
                "unique_fingerprints": after["unique_fingerprints"],
                "max_attempts_per_fingerprint": after["max_attempts_per_fingerprint"],
                "pass": ok,
            },
            results,
            srv,
        )


def bench_ceiling(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    for latency in (0.0, 0.1):
        n, c = args.ceiling_requests, args.concurrency
        with server(latency) as srv:
            srv.configure()
            run_ours(srv.base_url, conversations("warm", 2 * c), c)  # warm imports and the server
            srv.configure()
            ours = run_ours(srv.base_url, conversations("ceiling-ours", n), c)
            srv.configure()
            bare = run_bare(srv.base_url, conversations("ceiling-bare", n), c)
            emit(
                {
                    "measurement": "ceiling",
                    "requests": n,
                    "concurrency": c,
                    "latency_s": latency,
                    "seconds": round(ours, 3),
                    "requests_per_s": round(n / ours, 1),
                    "bare_seconds": round(bare, 3),
                    "bare_requests_per_s": round(n / bare, 1),
                    "ideal_requests_per_s": None if latency == 0 else c / latency,
                },
                results,
                srv,
            )


def ideal_fleet_seconds(n: int, slots: int, latency: float, endpoints: int, kill_at: float) -> float:
    """Finish time of n requests of exactly ``latency`` each on ``endpoints`` x ``slots`` slots with
    no client cost, when one endpoint dies at ``kill_at`` and its requests in flight start over
    on the others at once: the best any client could do."""
    import heapq

    free = [(0.0, e) for e in range(endpoints) for _ in range(slots)]  # (when the slot is free, endpoint)
    ready = [0.0] * n  # when each request may start (a lost one: at the crash)
    heapq.heapify(free)
    finish = 0.0
    while ready:
        at, endpoint = heapq.heappop(free)
        start = max(at, ready[0])
        if endpoint == 0 and start + latency > kill_at:  # endpoint 0 dies at kill_at
            if start < kill_at:
                heapq.heapreplace(ready, kill_at)  # in flight at the crash: sent again
            continue  # the slot is gone
        heapq.heappop(ready)
        finish = max(finish, start + latency)
        heapq.heappush(free, (start + latency, endpoint))
    return finish


def bench_fleet(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    n, c, latency = args.requests, args.concurrency, args.latency
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(server(latency)) for _ in range(3)]
        for srv in servers:  # warm imports, SDK models and every server
            srv.configure(latency=0.0)
            run_ours(srv.base_url, conversations(f"warm-{srv.base_url}", c), c)
            srv.configure(latency=latency)
        single = run_ours(servers[0].base_url, conversations("single", n), c)
        single_stats = servers[0].stats()
        # One endpoint as wide as the whole fleet: the client's cost of 3C in flight, no routing.
        servers[0].configure(latency=latency)
        wide = run_ours(servers[0].base_url, conversations("wide", n), 3 * c)
        wide_ideal = ideal_fleet_seconds(n, 3 * c, latency, 1, float("inf"))
        for srv in servers:
            srv.configure(latency=latency)

        victim = servers[1]
        fleet_ideal = n / (3 * c) * latency  # without the crash
        kill_at = max(fleet_ideal / 3, 1.5 * latency)  # mid-wave, after it answered a first one
        convs = conversations("fleet", n)
        urls = ",".join(s.base_url for s in servers)
        with OpenAITextGenerator(
            MODEL, base_url=urls, api_key="sk-bench", max_concurrency=c, backoff_initial=0.05, backoff_max=0.5
        ) as gen:
            timer = threading.Timer(kill_at, victim.crash)
            start = time.perf_counter()
            timer.start()
            out = gen.generate(convs, temperature=1.0, top_p=1.0, max_new_tokens=MAX_TOKENS)
            fleet = time.perf_counter() - start
            timer.join()
            usage = gen.usage()
        answered: dict[str, int] = {}
        for srv in servers:
            for fingerprint, count in srv.completions().items():
                answered[fingerprint] = answered.get(fingerprint, 0) + count
        lost = sum(1 for o in out if o is None)
        twice = sum(1 for count in answered.values() if count > 1)
        per_endpoint = {
            label: {k: entry[k] for k in ("requests", "succeeded", "retries", "state", "times_down")}
            for label, entry in usage["by_endpoint"].items()
        }
        ideal_with_crash = ideal_fleet_seconds(n, c, latency, 3, kill_at)
        emit(
            {
                "measurement": "fleet",
                "requests": n,
                "concurrency_per_endpoint": c,
                "latency_s": latency,
                "single_seconds": round(single, 3),
                "single_requests_per_s": round(n / single, 1),
                "single_max_in_flight": single_stats["max_in_flight"],
                "wide_single_concurrency": 3 * c,
                "wide_single_seconds": round(wide, 3),
                "wide_single_ratio_to_ideal": round(wide / wide_ideal, 3),
                "fleet_endpoints": 3,
                "killed_endpoint": victim.base_url,
                "killed_at_s": round(kill_at, 3),
                "fleet_seconds": round(fleet, 3),
                "fleet_requests_per_s": round(n / fleet, 1),
                "speedup": round(single / fleet, 3),
                "fleet_ideal_with_crash_s": round(ideal_with_crash, 3),
                "ratio_to_ideal": round(fleet / ideal_with_crash, 3),
                "answered_requests": len(answered),
                "lost": lost,
                "answered_twice": twice,
                "killed_server_answered": len(victim.final["completions"]) if victim.final else None,
                "retries": usage["retries"],
                "per_endpoint": per_endpoint,
                "bar": "fleet >= 1.5 x single, 0 lost, 0 answered twice",
                "pass": single / fleet >= 1.5 and lost == 0 and twice == 0 and len(answered) == n,
            },
            results,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="192 requests, C=32, L=0.5 s, 500 for the ceiling")
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--ceiling-requests", type=int, default=2000)
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--skip-fleet", action="store_true")
    parser.add_argument("--only-fleet", action="store_true", help="run the fleet measurement only")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.latency, args.ceiling_requests = 192, 32, 0.5, 500
    results: list[dict[str, Any]] = []
    if not args.only_fleet:
        bench_latency(args, results)
        if not args.skip_ceiling:
            bench_ceiling(args, results)
    if not args.skip_fleet:
        bench_fleet(args, results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for record in results:
                f.write(json.dumps(record) + "\n")
    failed = [r["measurement"] for r in results if r.get("pass") is False]
    print(json.dumps({"bench": "openai_throughput", "summary": True, "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
