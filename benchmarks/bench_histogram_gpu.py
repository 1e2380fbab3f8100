"""The canonical DP vote on a GPU: ours (torch backend) vs the bare bf16 torch.mm of the same shapes.

    python benchmarks/bench_histogram_gpu.py              # N=1,000,000 × M=14,000 × d=2048 (Inception size)
    python benchmarks/bench_histogram_gpu.py --n 200000   # smaller
    python benchmarks/bench_histogram_gpu.py --cpu-check  # the same code path on the CPU, tiny sizes

The floor is a chunked bf16 ``torch.mm`` of the same shapes: exact nearest-neighbour search cannot
do less than the N×M×d multiply-adds. Ours searches in bf16 (or TF32), shortlists with a proven
rounding margin, and re-scores each row's shortlist exactly in float64, in row blocks, never an
N×M allocation. Bar: at most 1.5× the floor, and votes identical to a float64 brute-force
reference (checked on the first rows). Without CUDA it prints a skip line and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine


def reference_votes(q, y) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Float64 brute force with the canonical rule (identical candidates: lowest index)."""
    from private_evolution.histogram import merge_identical

    q64 = np.asarray(q, dtype=np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    first, _ = merge_identical(y64)
    yu = y64[first]
    d2 = (q64 * q64).sum(1)[:, None] - 2 * q64 @ yu.T + (yu * yu).sum(1)[None, :]
    return first[np.argmin(d2, axis=1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=14_000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-rows", type=int, default=4096, help="rows compared with the float64 reference")
    ap.add_argument("--cpu-check", action="store_true", help="run the same path on the CPU at tiny sizes")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skip: torch is not installed")
        return
    if args.cpu_check:
        device, args.n, args.m, args.d = "cpu", 3000, 500, 64
    elif not torch.cuda.is_available():
        print("skip: no CUDA device on this machine (GPU benchmarks need one; --cpu-check runs the path on CPU)")
        return
    else:
        device = "cuda"
    from private_evolution.histogram import GPU_CHUNK_BYTES, nearest_neighbors

    mach = machine()
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(args.n, args.d, device=device, generator=gen)
    y = torch.randn(args.m, args.d, device=device, generator=gen)
    y[args.m // 2 : args.m // 2 + 100] = y[:100]  # bit-identical duplicates, as PE populations have
    chunk = max(1, GPU_CHUNK_BYTES // (args.m * 4))
    q16, yt16 = q.to(torch.bfloat16), y.to(torch.bfloat16).T.contiguous()

    def floor() -> None:
        for s in range(0, args.n, chunk):
            torch.mm(q16[s : s + chunk], yt16).min(dim=1)

    results: dict[str, np.ndarray] = {}

    def ours(precision: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            results[precision] = nearest_neighbors(q, y, k=1, backend="torch", search_precision=precision)[0][:, 0]

        return run

    runs = [("bf16 torch.mm floor", floor)] + [(f"ours-{p}", ours(p)) for p in ("bf16", "tf32", "float32")]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, float] = {}
    reference = reference_votes(q[: args.check_rows].cpu().numpy(), y.cpu().numpy())
    for name, fn in runs:
        fn()  # warm-up (cuBLAS heuristics, allocator)
        sync()
        best = float("inf")
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        times[name] = best
        precision = name.removeprefix("ours-")
        identical = None
        if precision in results:
            identical = bool(np.array_equal(results[precision][: args.check_rows], reference))
        emit(
            {
                "bench": "histogram_gpu",
                "machine": mach,
                "impl": name,
                "N": args.n,
                "M": args.m,
                "d": args.d,
                "seconds": best,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                "tflops": 2 * args.n * args.m * args.d / best / 1e12,
                "ratio_vs_bf16_floor": best / times["bf16 torch.mm floor"],
                "votes_identical_to_float64": identical,
            }
        )
    if device == "cpu":
        assert all(np.array_equal(v[: args.check_rows], reference) for v in results.values()), "votes differ"
        print("cpu-check: votes of every precision equal the float64 reference")


if __name__ == "__main__":
    main()
