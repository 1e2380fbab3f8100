"""The release's human side: a contact sheet and ``report.html`` (privacy statement, settings, grid).

Everything here reads ``release/`` and the run's config only: never ``private/``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from private_evolution.files import atomic_write_bytes, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from spti.config import RunConfig
    from spti.rundir import RunDirectory


def write_contact_sheet(paths: Sequence[Path], out: Path, *, max_images: int = 64, thumb: int = 128) -> Path | None:
    from PIL import Image

    chosen = [p for p in paths if p.exists()][:max_images]
    if not chosen:
        return None
    cols = min(8, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, rows * (thumb + pad) + pad), "white")
    for i, path in enumerate(chosen):
        with Image.open(path) as im:
            tile = im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)
        r, c = divmod(i, cols)
        sheet.paste(tile, (pad + c * (thumb + pad), pad + r * (thumb + pad)))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


def write_report(run: RunDirectory, cfg: RunConfig, *, extra_sections: Sequence[str] = ()) -> Path:
    release = run.release
    privacy = json.loads((release / "privacy.json").read_text()) if (release / "privacy.json").exists() else {}
    captions = read_jsonl(release / "captions.jsonl") if (release / "captions.jsonl").exists() else []
    eps = privacy.get("epsilon", "?")
    count = privacy.get("unit_count") or {}
    count_text = (
        f" A DP count put the number of units at about {_fmt(count['value'])} (noise σ = "
        f"{_fmt(count['noise_multiplier'])}); the exact number is not released."
        if count
        else ""
    )
    releases = privacy.get("ledger", {}).get("releases", [])
    if privacy.get("differentially_private", eps != "inf"):
        statement = (
            f"The {len(captions)} descriptions and images in this folder were produced by a mechanism that is "
            f"(ε = {_fmt(eps)}, δ = {_fmt(privacy.get('delta', '?'))})-differentially private with respect to "
            f"adding or removing one {privacy.get('unit_source', privacy.get('privacy_unit', 'image'))} of the "
            f"private data. The private data influenced the output only through {len(releases)} noisy releases "
            f"(Gaussian noise, σ = {_fmt(privacy.get('noise_multiplier', '?'))} per round); rendering and "
            f"upscaling are post-processing.{count_text}"
        )
        box = "statement"
    else:
        statement = (
            f"NOT DIFFERENTIALLY PRIVATE: this run used ε = ∞ (no noise). The {len(captions)} descriptions and "
            "images may reveal the private data; do not share them as private."
        )
        box = "statement notdp"
    sent = privacy.get("private_data_sent_to", {})
    hosted = {
        f"{stage}/{role}": endpoint
        for stage, roles in sent.items()
        for role, endpoint in (roles.items() if isinstance(roles, dict) else [(stage, roles)])
        if endpoint != "local"
    }
    threat = (
        "Private data were processed by local models only."
        if not hosted
        else "Private data were sent to hosted providers for: "
        + ", ".join(f"{html.escape(k)} → {html.escape(v)}" for k, v in hosted.items())
        + ". Differential privacy protects against readers of this release, not against those providers."
    )
    shown = {k: v for k, v in privacy.items() if k not in ("versions", "ledger", "not_dp", "privacy_profile")}
    shown["ledger releases"] = ", ".join(f"{r['name']} (σ = {r['noise_multiplier']:.4g})" for r in releases) or "none"
    shown["not covered by DP"] = "; ".join(f"{k} {v}" for k, v in privacy.get("not_dp", {}).items())
    privacy_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in shown.items()
    )
    settings_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in cfg.to_dict().items()
    )
    cells = []
    for row in captions[:200]:
        img = release / "images" / f"{row['index']:05d}.png"
        src = f"images/{img.name}" if img.exists() else ""
        cells.append(
            "<figure>"
            + (f'<img src="{src}" loading="lazy" alt="synthetic image {row["index"]}">' if src else "")
            + f"<figcaption>{html.escape(row['text'])}</figcaption></figure>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spti release report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.9rem}} th{{background:#f4f4f4}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}}
figure{{margin:0}} img{{width:100%;border-radius:4px}} figcaption{{font-size:.8rem;color:#444}}
.statement{{background:#eef6ee;border-left:4px solid #3a3;padding:1rem}}
.notdp{{background:#fbeaea;border-left-color:#c33}}
</style></head><body>
<h1>Synthetic release ({html.escape(cfg.preset)} preset)</h1>
<h2>Privacy statement</h2>
<p class="{box}">{html.escape(statement)}</p>
<p>{threat}</p>
<table>{privacy_rows}</table>
<h2>Settings</h2>
<table>{settings_rows}</table>
<h2>Released images and descriptions</h2>
<div class="grid">{"".join(cells)}</div>
{"".join(extra_sections)}
</body></html>
"""
    out = release / "report.html"
    atomic_write_text(out, page)
    return out
