"""DP voting histogram on CPU: ours vs faiss.IndexFlatL2 vs a naive full-matrix numpy baseline.

    python benchmarks/bench_histogram.py            # N=200,000 × M=14,000 × d=384, plus the N curve
    python benchmarks/bench_histogram.py --quick    # smaller sizes

Each measurement runs in its own process (honest peak RSS). Data are random float32; the cost of
exact search does not depend on the values. Ratios compare against faiss measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine, run_child

PRELUDE = """
import json, resource, time, numpy as np
rng = np.random.default_rng(0)
q = rng.standard_normal(({n}, {d}), dtype=np.float32)
y = rng.standard_normal(({m}, {d}), dtype=np.float32)
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base_mb = peak_mb()
"""

BODIES = {
    "ours-auto": """
from private_evolution import histogram as H
t = time.perf_counter(); h = H.clean_vote_histogram(q, y, k=1); s = time.perf_counter() - t
assert abs(h.sum() - {n}) < 1e-6
backend = H._resolve_backend("auto", q, y, None)
print(json.dumps({{"seconds": s, "peak_rss_mb": peak_mb(), "data_mb": base_mb, "backend": backend}}))
""",
    "ours-numpy": """
from private_evolution.histogram import clean_vote_histogram
t = time.perf_counter(); h = clean_vote_histogram(q, y, k=1, backend="numpy"); s = time.perf_counter() - t
print(json.dumps({{"seconds": s, "peak_rss_mb": peak_mb(), "data_mb": base_mb}}))
""",
    "ours-torch": """
import torch
from private_evolution.histogram import clean_vote_histogram
t = time.perf_counter(); h = clean_vote_histogram(q, y, k=1, backend="torch"); s = time.perf_counter() - t
print(json.dumps({{"seconds": s, "peak_rss_mb": peak_mb(), "data_mb": base_mb}}))
""",
    "faiss-IndexFlatL2": """
import faiss
t = time.perf_counter()
index = faiss.IndexFlatL2({d}); index.add(y); D, I = index.search(q, 1)
h = np.bincount(I[:, 0], minlength={m})
s = time.perf_counter() - t
print(json.dumps({{"seconds": s, "peak_rss_mb": peak_mb(), "data_mb": base_mb}}))
""",
    "naive-numpy-full-matrix": """
t = time.perf_counter()
dist = (q * q).sum(1)[:, None] - 2 * q @ y.T + (y * y).sum(1)[None, :]
h = np.bincount(dist.argmin(1), minlength={m})
s = time.perf_counter() - t
print(json.dumps({{"seconds": s, "peak_rss_mb": peak_mb(), "data_mb": base_mb}}))
""",
}


def measure(impl: str, n: int, m: int, d: int, env: dict | None) -> dict:
    code = PRELUDE.format(n=n, m=m, d=d) + BODIES[impl].format(n=n, m=m, d=d)
    return run_child(code, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--native-blas",
        action="store_true",
        help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE (this workplace pins an older kernel) for the children",
    )
    args = ap.parse_args()
    env = {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None} if args.native_blas else None
    n, m, d = (20_000, 14_000, 384) if args.quick else (200_000, 14_000, 384)
    mach = machine()
    common = {"bench": "histogram_cpu", "machine": mach, "native_blas": args.native_blas}
    results = {}
    for impl in ("faiss-IndexFlatL2", "ours-auto", "ours-numpy", "ours-torch"):
        r = measure(impl, n, m, d, env)
        results[impl] = r
        emit(
            {
                **common,
                "impl": impl,
                "N": n,
                "M": m,
                "d": d,
                **r,
                "ratio_vs_faiss": r["seconds"] / results["faiss-IndexFlatL2"]["seconds"],
            }
        )
    # the naive baseline materialises N×M: measure it where it fits, against faiss at the same size
    n_small = 10_000
    faiss_small = measure("faiss-IndexFlatL2", n_small, m, d, env)
    for impl in ("naive-numpy-full-matrix", "ours-auto", "ours-numpy"):
        r = measure(impl, n_small, m, d, env)
        emit(
            {
                **common,
                "impl": impl,
                "N": n_small,
                "M": m,
                "d": d,
                **r,
                "ratio_vs_faiss": r["seconds"] / faiss_small["seconds"],
            }
        )
    # scaling over N (ours, auto backend)
    for n_curve in (5_000, 10_000, 20_000) if args.quick else (25_000, 50_000, 100_000, 200_000):
        r = measure("ours-auto", n_curve, m, d, env)
        emit(
            {
                **common,
                "impl": "ours-auto",
                "curve": "N",
                "N": n_curve,
                "M": m,
                "d": d,
                **r,
                "us_per_private_row": 1e6 * r["seconds"] / n_curve,
            }
        )


if __name__ == "__main__":
    main()
