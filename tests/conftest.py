"""Test-wide settings: never touch a model hub, keep CPU threads predictable."""

from __future__ import annotations

import os

# Model hubs are unreachable in CI; fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are many small ops: one thread avoids two workers waiting on each other when the
# other core is busy (measured: 108 s → 9 s for the vision tests on a loaded 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
