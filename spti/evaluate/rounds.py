"""Per-round owner-only metrics the PE loop appends to ``RUN_DIR/private/metrics_by_round.jsonl``.

One JSON object per line, ``{"round": t, "fd_voting_space": float, "num_selected": int}``
(:func:`spti.metrics.round_metrics` computes the numbers). They compare each round's selected
candidates with the private set outside the DP mechanism: NOT differentially private, which is why
the file lives under ``private/`` and only the owner's evaluation page shows it.
"""

from __future__ import annotations

import math
from typing import Any

from spti.evaluate.common import read_rows
from spti.rundir import RunDirectory

ROUND_METRICS_FILE = "metrics_by_round.jsonl"


def _number(value: Any, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(value)
    out = kind(value)
    return out if not isinstance(out, float) or math.isfinite(out) else None


def read_round_metrics(run: RunDirectory) -> dict[str, Any] | None:
    """The by-round section of the report, or ``None`` when the run wrote no such file.

    A torn last line (a run killed mid-append) is ignored; a row without an integer ``round`` or
    with non-numeric values is counted in ``bad_rows`` and skipped. A resumed run may append a
    round again: the last row of each round wins. Rows come out sorted by round.
    """
    path = run.private / ROUND_METRICS_FILE
    if not path.is_file():
        return None
    by_round: dict[int, dict[str, Any]] = {}
    bad = 0
    for row in read_rows(path):
        try:
            if not isinstance(row.get("round"), int) or isinstance(row.get("round"), bool):
                raise TypeError(row.get("round"))
            entry = {
                "round": row["round"],
                "fd_voting_space": _number(row.get("fd_voting_space"), float),
                "num_selected": _number(row.get("num_selected"), int),
            }
        except (TypeError, ValueError, AttributeError):
            bad += 1
            continue
        by_round[entry["round"]] = entry
    return {
        "file": str(path),
        "rounds": [by_round[t] for t in sorted(by_round)],
        "bad_rows": bad,
        "not_dp": True,
        "explains": (
            "Fréchet distance, in the space in which the private data vote, between the candidates each "
            "PE round selected and the private set: how the population approached the private data "
            "round by round. Computed from private data outside the DP mechanism."
        ),
    }
