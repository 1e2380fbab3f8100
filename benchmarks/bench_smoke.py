"""End-to-end smoke run: wall time and peak memory of `spti synthesize --preset smoke` on this machine.

    python benchmarks/bench_smoke.py [--folder examples/private_faces]

Runs the CLI in a child process (tiny random models, fully offline), once cold (tiny models built
into the run) and once warm (models reused). The baseline measured in the same run is the bare
cost of importing the libraries the smoke run needs (torch, transformers, diffusers,
sentence-transformers); the budget from the issue is 120 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(ROOT, "examples", "private_faces"))
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    mach = machine()
    imports = "import torch, transformers, diffusers, sentence_transformers"
    base, base_mb = child([sys.executable, "-c", imports], env)
    emit({"bench": "smoke", "machine": mach, "what": "import floor", "seconds": base, "peak_rss_mb": base_mb})
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra_env in (
            ("cold (builds tiny models)", {}),
            ("warm (tiny models reused)", {"SPTI_TINY_MODEL_DIR": os.path.join(tmp, "m")}),
        ):
            if extra_env:  # build once so that the measured run reuses them
                child(
                    [
                        sys.executable,
                        "-m",
                        "spti.cli",
                        "synthesize",
                        args.folder,
                        "-o",
                        os.path.join(tmp, "w0"),
                        "--preset",
                        "smoke",
                        "--quiet",
                    ],
                    {**env, **extra_env},
                )
            out = os.path.join(tmp, label.split()[0])
            seconds, mb = child(
                [
                    sys.executable,
                    "-m",
                    "spti.cli",
                    "synthesize",
                    args.folder,
                    "-o",
                    out,
                    "--preset",
                    "smoke",
                    "--quiet",
                ],
                {**env, **extra_env},
            )
            images = len(os.listdir(os.path.join(out, "release", "images")))
            emit(
                {
                    "bench": "smoke",
                    "machine": mach,
                    "what": label,
                    "seconds": seconds,
                    "peak_rss_mb": mb,
                    "images": images,
                    "ratio_vs_import_floor": seconds / base,
                    "budget_s": 120,
                    "meets_budget": seconds < 120,
                }
            )


if __name__ == "__main__":
    main()
