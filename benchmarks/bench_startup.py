"""Start-up cost: `spti --help` and `spti budget` against a bare `python -c pass` (median of repeats).

    python benchmarks/bench_startup.py [--repeats 7]

Bar: under 0.5 s more than the bare interpreter. Heavy imports (torch, transformers, diffusers,
openai) are deferred to the commands that need them; `budget` needs dp-accounting, which imports
scipy.stats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    spti = [py, "-m", "spti.cli"]
    wall([py, "-c", "pass"], 2)  # warm the page cache
    wall([*spti, "--help"], 2)
    base = wall([py, "-c", "pass"], args.repeats)
    mach = machine()
    emit({"bench": "startup", "machine": mach, "command": "python -c pass", "seconds": base})
    for name, cmd in (
        ("spti --help", [*spti, "--help"]),
        ("spti budget", [*spti, "budget", "--epsilon", "1", "--delta", "1e-5", "--iterations", "10", "--json"]),
    ):
        s = wall(cmd, args.repeats)
        emit(
            {
                "bench": "startup",
                "machine": mach,
                "command": name,
                "seconds": s,
                "extra_over_python": s - base,
                "ratio_vs_python": s / base,
                "bar_extra_seconds": 0.5,
                "meets_bar": s - base < 0.5,
            }
        )


if __name__ == "__main__":
    main()
