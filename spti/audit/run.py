"""The whole audit: every check of a run, written to ``RUN_DIR/private/`` (owner only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spti.audit.canaries import run_canary_audit
from spti.audit.captions import text_overlap
from spti.audit.images import (
    _build_embedders,
    _embed_images,
    _ImageSet,
    _private_entries,
    _released_images,
    resolve_private_dir,
)
from spti.audit.nearest import _feature_audit, split_units
from spti.audit.pixels import _pixel_audit
from spti.audit.report import _assemble, _neighbour_rows, _render_html
from spti.audit.settings import AuditSettings, _QuietReporter
from spti.errors import SptiError

if TYPE_CHECKING:
    from spti.backends.base import ImageEmbedder


# --------------------------------------------------------------------------------------------
# The whole audit
# --------------------------------------------------------------------------------------------
def run_audit(
    run_dir: str | Path,
    private_dir: str | Path | None = None,
    *,
    settings: AuditSettings | None = None,
    canaries: int = 0,
    reporter: Any = None,
    canary_pipeline: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Audit a run; write ``private/audit.json``, ``private/audit.html`` and ``private/audit_neighbours.jsonl``.

    Returns the JSON-safe result (what ``audit.json`` holds). Nothing is written outside
    ``RUN_DIR/private/``.
    """
    from private_evolution.files import atomic_write_json, atomic_write_jsonl, read_jsonl
    from spti.rundir import RunDirectory

    s = (settings or AuditSettings()).validate()
    reporter = reporter or _QuietReporter()
    run = RunDirectory(run_dir)
    if not run.exists():
        raise SptiError(f"{run.root} is not an spti run directory (no config.toml)")
    released_paths = _released_images(run)
    captions_path = run.release / "captions.jsonl"
    released_rows = read_jsonl(captions_path) if captions_path.exists() else []
    if not released_paths and not released_rows:
        raise SptiError(f"{run.root} has released nothing yet (no release/images, no release/captions.jsonl)")
    # a text-only release (evolve without render, or bring-your-own captions) needs no private folder
    needs_images = bool(released_paths) or canaries > 0
    private_root = resolve_private_dir(run, private_dir) if needs_images or private_dir is not None else None

    embedders: dict[str, ImageEmbedder] = {}
    released = _ImageSet([], [], [])
    private = _ImageSet([], [], [])
    skipped: dict[str, str] = {}
    if private_root is not None and released_paths:
        entries = _private_entries(run, private_root, reporter)
        embedders = _build_embedders(s, skipped)
        for spec, reason in skipped.items():
            reporter.warn(f"audit: skipped the {spec} feature space: {reason}")
        if len(embedders) < 2 and not skipped:
            reporter.warn("audit: one feature space only; a copy it maps far away is left to the pixel check")
        released = _embed_images(
            [f"images/{p.name}" for p in released_paths],
            released_paths,
            [p.name for p in released_paths],
            embedders,
            s,
            reporter,
            "released",
        )
        rels = [rel for rel, _ in entries]
        private = _embed_images(
            rels, [private_root / r for r in rels], [u for _, u in entries], embedders, s, reporter, "private"
        )
        if len(private) == 0:
            raise SptiError(f"no private image of the run could be read under {private_root}")
    in_a = split_units(private.units, s.seed)
    features = {spec: _feature_audit(spec, released, private, in_a, s) for spec in embedders}
    pixel = _pixel_audit(released, private, in_a, s)

    # text
    text: dict[str, Any] | None = None
    private_caps_path = run.private / "captions.jsonl"
    if released_rows and private_caps_path.exists():
        from private_evolution.files import recover_jsonl

        found = recover_jsonl(private_caps_path)  # read only: a torn tail is ignored, never cut here
        for lineno in found.bad_lines:
            reporter.warn(f"audit: {private_caps_path}, line {lineno}: not a JSON object; skipped")
        caps = [r for r in found.rows if r.get("caption")]
        if caps:
            text = text_overlap(
                [str(r.get("text", "")) for r in released_rows],
                [r["caption"] for r in caps],
                private_units=[str(r.get("unit", r.get("relpath", i))) for i, r in enumerate(caps)],
                settings=s,
            )
            text["_private_keys"] = [str(r.get("relpath", i)) for i, r in enumerate(caps)]

    canary = None
    if canaries:
        canary = run_canary_audit(
            run.root,
            private_root,
            canaries,
            settings=s,
            reporter=reporter,
            pipeline=canary_pipeline,
            _shared=(embedders, private) if embedders else None,
        )

    result = _assemble(run, private_root, released, private, in_a, features, pixel, text, released_rows, canary, s)
    if skipped:
        result["features_skipped"] = skipped  # feature spaces left out (a model not available offline)
    run.ensure_private()
    atomic_write_jsonl(run.private / "audit_neighbours.jsonl", _neighbour_rows(released, private, features, pixel))
    atomic_write_json(run.private / "audit.json", result)
    from private_evolution.files import atomic_write_text

    atomic_write_text(
        run.private / "audit.html",
        _render_html(result, released, private, features, pixel, text, released_rows, canary, s),
    )
    run.seal_private()
    return result
