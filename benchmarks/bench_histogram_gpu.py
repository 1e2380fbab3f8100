"""DP voting histogram on a GPU: ours (torch backend) vs a bare chunked torch.mm of the same shapes.

    python benchmarks/bench_histogram_gpu.py              # N=1,000,000 × M=14,000 × d=2048 (Inception size)
    python benchmarks/bench_histogram_gpu.py --n 200000   # smaller

The bare matmul is the compute floor: exact nearest-neighbour search cannot do less than the
N×M×d multiply-adds. Ours adds the norm offset, the per-row min and the vote bincount, in chunks
(the reference PE torch backend builds the full N×M matrix and runs out of memory at this size).
Skips with a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=14_000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skip: torch is not installed")
        return
    if not torch.cuda.is_available():
        print("skip: no CUDA device on this machine (GPU benchmarks need one)")
        return
    from private_evolution.histogram import GPU_CHUNK_BYTES, clean_vote_histogram

    mach = machine()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, dtype, tf32 in (
        ("fp32-tf32", torch.float32, True),
        ("fp32-strict", torch.float32, False),
        ("fp16", torch.float16, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        q = torch.randn(args.n, args.d, device="cuda", dtype=dtype, generator=gen)
        y = torch.randn(args.m, args.d, device="cuda", dtype=dtype, generator=gen)
        bench_one(q, y, label, args.repeats, mach, GPU_CHUNK_BYTES, clean_vote_histogram)
        del q, y
        torch.cuda.empty_cache()


def bench_one(q, y, label, repeats, mach, chunk_bytes, clean_vote_histogram) -> None:  # type: ignore[no-untyped-def]
    import torch

    (n, d), m = q.shape, y.shape[0]
    chunk = max(1, chunk_bytes // (m * 4))
    yt = y.T.contiguous()

    def floor() -> None:
        for s in range(0, n, chunk):
            torch.mm(q[s : s + chunk], yt)

    def ours() -> None:
        clean_vote_histogram(q, y, k=1, backend="torch")

    for fn in (floor, ours):  # warm-up (cuBLAS heuristics, allocator)
        fn()
    torch.cuda.synchronize()
    times: dict[str, float] = {}
    for name, fn in (("torch.mm floor", floor), ("ours", ours)):
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        times[name] = best
        emit(
            {
                "bench": "histogram_gpu",
                "machine": mach,
                "impl": name,
                "dtype": label,
                "N": n,
                "M": m,
                "d": d,
                "seconds": best,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                "tflops": 2 * n * m * d / best / 1e12,
                "ratio_vs_floor": best / times["torch.mm floor"],
            }
        )


if __name__ == "__main__":
    main()
