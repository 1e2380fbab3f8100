"""The release's human side: a contact sheet and ``report.html`` for a reviewer.

The report puts the privacy statement first (what is guaranteed, at which ε and δ, for which
unit, by which releases), then the warnings that matter to a reviewer, then what it cost, the
settings, and the images with their descriptions. It reads ``release/``, the run's config, the
public bookkeeping in ``state/`` (render record) and, from ``private/usage.json``, only the usage
of roles that never see private data; it is written again by every stage that changes
``release/``, so it always matches what is on disk.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from private_evolution.files import atomic_write_bytes, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from spti.config import RunConfig
    from spti.rundir import RunDirectory

CONTACT_SHEET_MAX = 64
REPORT_GRID_MAX = 200


# --------------------------------------------------------------------------------------------
# The contact sheet
# --------------------------------------------------------------------------------------------
def write_contact_sheet(
    paths: Sequence[Path], out: Path, *, max_images: int = CONTACT_SHEET_MAX, thumb: int = 128
) -> Path | None:
    """A grid of the first ``max_images`` released images, each labelled with its index, and a
    title line saying how many of how many it shows."""
    from PIL import Image, ImageDraw

    existing = [p for p in paths if p.exists()]
    chosen = existing[:max_images]
    if not chosen:
        return None
    cols = min(8, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    pad, label_h, title_h = 4, 14, 20
    width = cols * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, title_h + rows * (thumb + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), f"{len(chosen)} of {len(existing)} released images (index under each)", fill="black")
    for i, path in enumerate(chosen):
        with Image.open(path) as im:
            tile = im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)
        r, c = divmod(i, cols)
        x, y = pad + c * (thumb + pad), title_h + r * (thumb + label_h + pad)
        sheet.paste(tile, (x, y))
        draw.text((x, y + thumb + 1), path.stem, fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# Formatting: no Python reprs in front of a reviewer
# --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.6g}"
    if value == "inf":
        return "∞"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


def _rows(items: Iterable[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in items)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------
def _statement(privacy: dict[str, Any], num_descriptions: int) -> tuple[str, str]:
    eps = privacy.get("epsilon", "?")
    releases = privacy.get("ledger", {}).get("releases", [])
    unit = privacy.get("unit_source", privacy.get("privacy_unit", "image"))
    if not privacy.get("differentially_private", eps != "inf"):
        return (
            "notdp",
            f"NOT DIFFERENTIALLY PRIVATE. This run used ε = ∞ (no noise): the {num_descriptions} descriptions "
            "and images may reveal the private data. Do not share them as private.",
        )
    count = privacy.get("unit_count") or {}
    count_text = (
        f" A DP count put the number of units at about {_fmt(count.get('value'))} (noise σ = "
        f"{_fmt(count.get('noise_multiplier'))}); the exact number is not released."
        if count
        else ""
    )
    return (
        "dp",
        f"The {num_descriptions} descriptions and images in this folder were produced by a mechanism that is "
        f"(ε = {_fmt(eps)}, δ = {_fmt(privacy.get('delta'))})-differentially private with respect to adding or "
        f"removing one {unit} of the private data. The private data influenced the output only through "
        f"{len(releases)} noisy releases (Gaussian noise, σ = {_fmt(privacy.get('noise_multiplier'))} per round); "
        f"rendering and upscaling are post-processing.{count_text}",
    )


def _threat_model(privacy: dict[str, Any]) -> str:
    sent = privacy.get("private_data_sent_to", {}) or {}
    hosted = [
        f"{stage} / {role} → {endpoint}"
        for stage, roles in sent.items()
        for role, endpoint in (roles.items() if isinstance(roles, dict) else [(stage, roles)])
        if endpoint != "local"
    ]
    if not hosted:
        return "Private data were processed by local models only."
    return (
        "Private data were sent to hosted models for: "
        + "; ".join(hosted)
        + ". Differential privacy protects against readers of this release, not against those providers."
    )


def _privacy_table(privacy: dict[str, Any]) -> str:
    releases = privacy.get("ledger", {}).get("releases", [])
    count = privacy.get("unit_count") or {}
    conventional = privacy.get("conventional_delta") or {}
    seeding = privacy.get("seeding") or {}
    versions = privacy.get("versions", {})
    items: list[tuple[str, Any]] = [
        ("ε (spent)", privacy.get("epsilon")),
        ("δ", privacy.get("delta")),
        ("where δ comes from", privacy.get("delta_source")),
        ("ε budget", privacy.get("epsilon_budget")),
        ("Gaussian DP μ", privacy.get("gdp_mu")),
        ("noise σ per round", privacy.get("noise_multiplier")),
        ("rounds T", privacy.get("iterations")),
        ("neighbouring relation", privacy.get("neighbouring_relation")),
        ("privacy unit", privacy.get("unit_source", privacy.get("privacy_unit"))),
        (
            "DP count of units",
            f"{_fmt(count.get('value'))} (σ {_fmt(count.get('noise_multiplier'))}; 99.9% bounds "
            f"{_fmt(count.get('lower_bound'))} – {_fmt(count.get('upper_bound'))})"
            if count
            else None,
        ),
        (
            "ε at the conventional δ = 1/(N̂ ln N̂)",
            f"{_fmt(conventional.get('epsilon'))} at δ = {_fmt(conventional.get('delta'))}" if conventional else None,
        ),
        (
            "privacy profile",
            ", ".join(f"ε {_fmt(p['epsilon'])} at δ {_fmt(p['delta'])}" for p in privacy.get("privacy_profile", []))
            or None,
        ),
        ("ledger releases", ", ".join(f"{r['name']} (σ {_fmt(r['noise_multiplier'])})" for r in releases) or None),
        ("ledger hash (sha256)", privacy.get("ledger", {}).get("sha256")),
        ("redrawn releases", privacy.get("redrawn_releases") or "none"),
        ("DP seeding", f"yes (σ {_fmt(seeding.get('noise_multiplier'))})" if seeding.get("used") else "no"),
        ("population", privacy.get("population")),
        ("mechanism", privacy.get("mechanism")),
        ("noise sampler", privacy.get("noise_source")),
        ("not covered by DP", "; ".join(f"{k}: {v}" for k, v in (privacy.get("not_dp") or {}).items())),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("created", privacy.get("created_at")),
    ]
    return _rows((k, v) for k, v in items if v is not None)


def _warnings(privacy: dict[str, Any], render: dict[str, Any]) -> list[str]:
    out = list(privacy.get("warnings", []))
    truncated = render.get("truncated_prompts")
    if truncated:
        out.append(
            f"{truncated} descriptions were longer than the text encoder's limit and were cut at a word boundary "
            "before rendering"
        )
    return out


# Roles that only ever see public data (prompts, DP-selected descriptions): their usage is public.
PUBLIC_ROLES = frozenset({"llm", "image", "release_image", "upscaler"})


def _usage_section(usage: dict[str, Any]) -> str:
    """Requests and cost of the roles that see only public data. The usage of the roles that read
    private data (one caption request per private image, embeddings of private captions) counts
    the private items, so it stays in ``private/usage.json`` and is not shown in the release."""
    by_role = usage.get("by_role") or {}
    public = {name: entry for name, entry in by_role.items() if set(name.split("+")) <= PUBLIC_ROLES}
    if not by_role:
        return ""
    keys = ("model", "endpoint", "requests", "images", "prompt_tokens", "completion_tokens", "cost_usd", "cost_known")
    rows = _rows((name, "; ".join(f"{k} {_fmt(e.get(k))}" for k in keys)) for name, e in public.items())
    withheld = sorted(set(by_role) - set(public))
    note = (
        f"<p>Usage of {', '.join(withheld)} is not shown: it counts the private items. It is in "
        "private/usage.json for the data owner.</p>"
        if withheld
        else ""
    )
    return f"<h2>Hosted usage and cost (public roles)</h2><table>{rows}</table>{note}"


def write_report(run: RunDirectory, cfg: RunConfig, *, extra_sections: Sequence[str] = ()) -> Path:
    release = run.release
    privacy = _read_json(release / "privacy.json")
    captions = read_jsonl(release / "captions.jsonl") if (release / "captions.jsonl").exists() else []
    render = _read_json(run.state / "render.json")
    # Only its public roles are shown (see _usage_section): nothing else of private/ is read.
    usage = _read_json(run.private / "usage.json")
    box, statement = _statement(privacy, len(captions))
    warnings = _warnings(privacy, render)
    warning_html = (
        "<h2>Warnings</h2><ul class='warnings'>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else ""
    )
    settings_rows = _rows(cfg.to_dict().items())
    cells = []
    shown = captions[:REPORT_GRID_MAX]
    for row in shown:
        img = release / "images" / f"{row['index']:05d}.png"
        picture = (
            f'<img src="images/{img.name}" alt="synthetic image {row["index"]}">'
            if img.exists()
            else "<p class='missing'>not rendered yet</p>"
        )
        cells.append(
            f"<figure>{picture}<figcaption><b>{row['index']}</b> · {html.escape(row['text'])}</figcaption></figure>"
        )
    more = f"<p>{len(shown)} of {len(captions)} released descriptions shown.</p>" if len(captions) > len(shown) else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spti release report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px;color:#222}}
h1{{font-size:1.4rem;margin:.2rem 0 .8rem}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.85rem}} th{{background:#f4f4f4;white-space:nowrap}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}}
figure{{margin:0}} img{{width:100%;border-radius:4px}} figcaption{{font-size:.8rem;color:#444}}
.dp{{background:#eef6ee;border-left:4px solid #3a3;padding:1rem}}
.notdp{{background:#fbeaea;border-left:4px solid #c33;padding:1rem;font-weight:600}}
.warnings li{{color:#8a5300}}
</style></head><body>
<h1>spti release report · {html.escape(cfg.preset)} preset</h1>
<section id="privacy-statement">
<h2>Privacy statement</h2>
<p class="{box}">{html.escape(statement)}</p>
<p>{html.escape(_threat_model(privacy))}</p>
</section>
{warning_html}
<h2>Privacy details</h2>
<table>{_privacy_table(privacy)}</table>
{_usage_section(usage)}
<h2>Released images and descriptions</h2>
{more}
<div class="grid">{"".join(cells)}</div>
<h2>Settings</h2>
<table>{settings_rows}</table>
{"".join(extra_sections)}
</body></html>
"""
    out = release / "report.html"
    atomic_write_text(out, page)
    return out
