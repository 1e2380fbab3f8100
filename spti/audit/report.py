"""The audit's HTML report (NOT DP: kept under ``RUN_DIR/private/``)."""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spti.audit.images import _ImageSet
from spti.audit.settings import NOT_DP_BANNER, NOT_DP_NOTE, AuditSettings, _jsonable
from spti.errors import SptiError

if TYPE_CHECKING:
    from spti.rundir import RunDirectory


# --------------------------------------------------------------------------------------------
# The result: flags, neighbour rows, the JSON document
def _released_flags(features: dict[str, dict], pixel: dict[str, Any], n: int) -> list[list[str]]:
    flags: list[list[str]] = [[] for _ in range(n)]
    for i in np.flatnonzero(pixel["_dup"]):
        flags[i].append("pixel_near_duplicate")
    for spec, f in features.items():
        for i in np.flatnonzero(f["_below"]):
            flags[i].append(f"closer_than_fresh:{spec}")
    return flags


def _neighbour_rows(
    released: _ImageSet, private: _ImageSet, features: dict[str, dict], pixel: dict[str, Any]
) -> list[dict[str, Any]]:
    flags = _released_flags(features, pixel, len(released))
    rows = []
    for i, name in enumerate(released.names):
        nearest = {
            spec: [
                {"private": private.names[j], "distance": float(d)}
                for j, d in zip(f["_nn_idx"][i], f["_nn_dist"][i], strict=True)
            ]
            for spec, f in features.items()
        }
        rows.append(
            {
                "released": name,
                "flags": flags[i],
                "nearest": nearest,
                "pixel": {
                    "private": private.names[int(pixel["_idx"][i])],
                    "ncc": float(pixel["_ncc"][i]),
                    "mean_abs_diff": float(pixel["_mad"][i]),
                },
                "relative_distance": {
                    spec: (float(f["_score"][i]) if math.isfinite(float(f["_score"][i])) else None)
                    for spec, f in features.items()
                },
            }
        )
    return rows


def _assemble(
    run: RunDirectory,
    private_root: Path | None,
    released: _ImageSet,
    private: _ImageSet,
    in_a: np.ndarray,
    features: dict[str, dict],
    pixel: dict[str, Any],
    text: dict[str, Any] | None,
    released_rows: list[dict[str, Any]],
    canary: dict[str, Any] | None,
    s: AuditSettings,
) -> dict[str, Any]:
    from spti import __version__

    flags = _released_flags(features, pixel, len(released))
    flagged = []
    for i in (i for i, f in enumerate(flags) if f):
        item: dict[str, Any] = {"released": released.names[i], "reasons": flags[i]}
        item["pixel"] = {"private": private.names[int(pixel["_idx"][i])], "ncc": float(pixel["_ncc"][i])}
        for spec, f in features.items():
            if len(f["_nn_idx"][i]):
                item[spec] = {
                    "private": private.names[int(f["_nn_idx"][i][0])],
                    "distance": float(f["_nn_dist"][i][0]),
                    "relative_distance": float(f["_score"][i]),
                }
        flagged.append(item)
    text_flagged = []
    if text is not None:
        for row, r in zip(released_rows, text["items"], strict=True):
            if r["verbatim"] or r["near_verbatim"]:
                text_flagged.append(
                    {
                        "index": row.get("index"),
                        "text": row.get("text"),
                        "private": text["_private_keys"][r["match"]],
                        "private_caption": text["_index"].texts[r["match"]],
                        "kind": "verbatim" if r["verbatim"] else "near_verbatim",
                        "lcs_words": r["lcs_words"],
                        "lcs_chars": r["lcs_chars"],
                        "shared": r.get("shared", ""),
                    }
                )
    feature_summary = {spec: {k: v for k, v in f.items() if k != "spec"} for spec, f in features.items()}
    suspected_spaces = [spec for spec, f in features.items() if f.get("suspected")]
    closer = [spec for spec, f in features.items() if f.get("closer_than_fresh")]
    near_dups = pixel["num_near_duplicates"]
    n_text = len(text_flagged)
    memorisation = bool(near_dups or suspected_spaces)
    parts = []
    if len(released) == 0:
        parts.append("no released images, so no image check")
    elif near_dups:
        parts.append(f"{near_dups} released image(s) are pixel near-duplicates of private images")
    else:
        parts.append("no released image is a pixel near-duplicate of a private image")
    if suspected_spaces:
        parts.append(f"too many released images are closer than fresh private samples in {', '.join(suspected_spaces)}")
    if closer:
        parts.append(f"released images are closer to the private set than fresh samples overall in {', '.join(closer)}")
    if text is not None:
        parts.append(
            f"{n_text} released description(s) copy a private caption (verbatim or near-verbatim)"
            if n_text
            else "no released description copies a private caption"
        )
    if canary is not None:
        parts.append(canary["statement"])
    verdict = {
        "memorization_suspected": memorisation,
        "text_copy_suspected": bool(n_text),
        "near_duplicates": near_dups,
        "feature_spaces_suspected": suspected_spaces,
        "closer_than_fresh": closer,
        "summary": "; ".join(p.rstrip(".") for p in parts) + ".",
    }
    result = {
        "not_dp": True,
        "warning": NOT_DP_NOTE,
        "banner": NOT_DP_BANNER,
        "run_dir": str(run.root),
        "private_dir": str(private_root) if private_root is not None else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spti_version": __version__,
        "verdict": verdict,
        "extractors": list(features),
        "num_released_images": len(released),
        "num_released_texts": len(released_rows),
        "num_private_images": len(private),
        "split": {
            "seed": s.seed,
            "by": "privacy unit",
            "units_a": len(set(np.asarray(private.units)[in_a].tolist())),
            "units_b": len(set(np.asarray(private.units)[~in_a].tolist())),
            "images_a": int(in_a.sum()),
            "images_b": int((~in_a).sum()),
        },
        "settings": asdict(s),
        "features": feature_summary,
        "pixel": pixel,
        "num_flagged": len(flagged),
        "flagged": flagged[:1000],
        "text": (
            None
            if text is None
            else {
                **{k: v for k, v in text.items() if not k.startswith("_") and k != "items"},
                "flagged": text_flagged[:1000],
            }
        ),
        "text_note": None if text is not None else "no private captions (image voting) or no released descriptions",
        "canary": canary,
        "details": "audit_neighbours.jsonl (one row per released image: nearest private images, flags)",
    }
    return _jsonable(result)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def _thumb(path: Path | None, size: int = 96) -> str:
    if path is None:
        return ""
    from PIL import Image as PILImage

    from spti.data import load_image

    try:
        image = load_image(path)
    except SptiError:
        return ""
    image.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    # small images are shown at the same size as the others (pixelated), so pairs line up
    scale = size / max(image.width, image.height)
    width, height = round(image.width * scale), round(image.height * scale)
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="">'


def _fmt_overlap(values: dict[str, float | None] | None) -> str:
    return ", ".join(f"{n}-grams {v:.1%}" for n, v in (values or {}).items() if v is not None) or "n/a"


def _fmt_quantiles(q: dict[str, float] | None) -> str:
    if not q:
        return "n/a"
    return f"median {q['p50']:.3g}, 95th percentile {q['p95']:.3g}, max {q['max']:.3g}"


def _histograms(features: dict[str, dict], pixel: dict[str, Any]) -> str:
    """Nearest-neighbour distances of released images vs fresh private samples, one panel per space."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(spec, f) for spec, f in features.items() if f.get("folds")]
    total = len(panels) + (1 if "_reference" in pixel else 0)
    if total == 0:
        return ""
    fig = Figure(figsize=(4.2 * total, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, total, squeeze=False)[0]
    for ax, (spec, f) in zip(axes, panels, strict=False):
        ref = np.concatenate([f["folds"][k]["_reference"] for k in ("A", "B")])
        rel = np.concatenate([f["folds"][k]["_released"] for k in ("A", "B")])
        bins = np.histogram_bin_edges(np.concatenate([ref, rel]), bins=30)
        ax.hist(ref, bins=bins, alpha=0.6, density=len(ref) > 0, label="private → other half (fresh)")
        ax.hist(rel, bins=bins, alpha=0.6, density=len(rel) > 0, label="released → half")
        for k in ("A", "B"):
            ax.axvline(f["folds"][k]["threshold"], color="red", linestyle="--", linewidth=1)
        ax.set_title(spec[:40], fontsize=9)
        ax.set_xlabel("nearest-neighbour distance", fontsize=8)
        ax.legend(fontsize=7)
    if "_reference" in pixel:
        ax = axes[-1]
        bins = np.linspace(-1, 1, 41)
        ax.hist(pixel["_reference"], bins=bins, alpha=0.6, density=True, label="private → other half")
        ax.hist(pixel["_ncc"], bins=bins, alpha=0.6, density=len(pixel["_ncc"]) > 0, label="released → private")
        ax.axvline(pixel["ncc_threshold"], color="red", linestyle="--", linewidth=1)
        ax.set_title("pixel NCC (higher = closer)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="nearest-neighbour distance histograms">'


def _render_html(
    result: dict[str, Any],
    released: _ImageSet,
    private: _ImageSet,
    features: dict[str, dict],
    pixel: dict[str, Any],
    text: dict[str, Any] | None,
    released_rows: list[dict[str, Any]],
    canary: dict[str, Any] | None,
    s: AuditSettings,
) -> str:
    esc = html.escape
    flags = _released_flags(features, pixel, len(released))
    # pairs to show: every flagged image, then the closest by NCC and by each space
    order: list[int] = [i for i, f in enumerate(flags) if f][:200]
    candidates = [np.argsort(-pixel["_ncc"])] + [np.argsort(f["_score"]) for f in features.values() if "folds" in f]
    for ranking in candidates:
        for i in ranking[: max(1, s.html_pairs // len(candidates))]:
            if int(i) not in order:
                order.append(int(i))
    thumbs: dict[Path, str] = {}

    def thumb(path: Path) -> str:
        if path not in thumbs:
            thumbs[path] = _thumb(path)
        return thumbs[path]

    pair_rows = []
    for i in order:
        j = int(pixel["_idx"][i])
        cells = [f"<td>{thumb(released.paths[i])}<br>{esc(released.names[i])}</td>"]
        cells.append(f"<td>{thumb(private.paths[j])}<br>{esc(private.names[j])}<br>NCC {pixel['_ncc'][i]:.3f}</td>")
        for f in features.values():
            if not len(f["_nn_idx"][i]):
                cells.append("<td></td>")
                continue
            j = int(f["_nn_idx"][i][0])
            rel = float(f["_score"][i])
            rel_txt = f"<br>×{rel:.2f} of threshold" if math.isfinite(rel) else ""
            cells.append(
                f"<td>{thumb(private.paths[j])}<br>{esc(private.names[j])}<br>"
                f"distance {f['_nn_dist'][i][0]:.4g}{rel_txt}</td>"
            )
        cells.append(f"<td class='{'flag' if flags[i] else ''}'>{esc(', '.join(flags[i])) or 'none'}</td>")
        pair_rows.append("<tr>" + "".join(cells) + "</tr>")
    pair_header = "".join(f"<th>nearest private: {esc(spec)}</th>" for spec in features)

    feature_rows = []
    for spec, f in features.items():
        if not f.get("folds"):
            feature_rows.append(f"<tr><th>{esc(spec)}</th><td colspan=5>{esc(f.get('note', ''))}</td></tr>")
            continue
        fa, fb = f["folds"]["A"], f["folds"]["B"]
        mw = "n/a" if f["closer_than_fresh_p"] is None else f"{f['closer_than_fresh_p']:.3g}"
        feature_rows.append(
            f"<tr><th>{esc(spec)}</th><td>{f['num_flagged']}/{len(released)}</td>"
            f"<td>≤ {f['expected_fraction_at_most']:.3g}</td><td>{f['excess_p']:.3g}</td>"
            f"<td>{mw}</td><td>A: {fa['threshold']:.4g}, B: {fb['threshold']:.4g}</td></tr>"
        )

    text_html = "<p>No text check: " + esc(result.get("text_note") or "") + "</p>"
    if text is not None:
        trs = []
        ranked = sorted(range(len(text["items"])), key=lambda i: -text["items"][i]["lcs_words"])
        for i in ranked[:50]:
            r, row = text["items"][i], released_rows[i]
            kind = "verbatim" if r["verbatim"] else ("near-verbatim" if r["near_verbatim"] else "")
            cap = text["_index"].texts[r["match"]] if r["match"] is not None else ""
            ov = ", ".join(f"{n}-gram {v:.2f}" for n, v in r["overlap"].items() if v is not None)
            trs.append(
                f"<tr><td>{esc(str(row.get('index', i)))}</td><td>{esc(str(row.get('text', '')))}</td>"
                f"<td>{esc(cap)}</td><td>{r['lcs_words']} words / {r['lcs_chars']} chars</td><td>{esc(ov)}</td>"
                f"<td class='{'flag' if kind else ''}'>{kind}</td></tr>"
            )
        ref = text.get("reference") or {}
        ref_txt = (
            f"Reference (held-out private captions vs the other half): mean n-gram overlap "
            f"{_fmt_overlap(ref.get('mean_ngram_overlap'))}; longest shared run "
            f"{_fmt_quantiles(ref.get('lcs_words_quantiles'))} words."
            if ref
            else ""
        )
        text_html = (
            f"<p>{text['num_verbatim']} verbatim and {text['num_near_verbatim']} near-verbatim of "
            f"{text['num_released']} released descriptions against {text['num_private']} private captions; "
            f"mean n-gram overlap {_fmt_overlap(text['mean_ngram_overlap'])}. {ref_txt}</p>"
            "<table><tr><th>#</th><th>released description</th><th>closest private caption</th>"
            "<th>longest common substring</th><th>n-gram overlap</th><th>flag</th></tr>" + "".join(trs) + "</table>"
        )

    canary_html = ""
    if canary is not None:
        c = canary["counts"]
        ratio = canary["ratio"] if canary["ratio"] is not None else canary["ratio_note"]
        tiles = "".join(
            f"<tr><td>{_thumb(cp)}</td><td>{_thumb(rp)}</td><td>{'planted' if pl else 'held out'}</td>"
            f"<td class='{'flag' if m else ''}'>{'matched' if m else 'not matched'}</td></tr>"
            for cp, rp, pl, m in canary.get("_pairs", [])
        )
        canary_html = (
            "<h2>Canary audit</h2>"
            f"<p>{esc(canary['statement'])}</p>"
            f"<table><tr><th>planted matched</th><td>{c['planted_matched']}/{c['planted']}</td></tr>"
            f"<tr><th>held-out matched (same run)</th><td>{c['held_out_matched']}/{c['held_out']}</td></tr>"
            f"<tr><th>control run matched</th><td>{c['control_matched']}/{c['planted']}</td></tr>"
            f"<tr><th>ratio</th><td>{esc(str(ratio))}</td></tr></table>"
            "<table><tr><th>canary</th><th>nearest released (canary run, pixels)</th><th></th><th></th></tr>"
            + tiles
            + "</table>"
        )

    verdict = result["verdict"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spti audit (NOT DP)</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1300px;color:#222}}
.banner{{background:#b00020;color:#fff;padding:1rem 1.5rem;font-size:1.3rem;font-weight:bold;border-radius:4px}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.85rem}} th{{background:#f4f4f4}} td.flag{{background:#fde2e2;font-weight:bold}}
img{{image-rendering:pixelated}}
</style></head><body>
<div class="banner">{esc(NOT_DP_BANNER)}</div>
<p>{esc(NOT_DP_NOTE)}</p>
<h1>Audit of {esc(result["run_dir"])}</h1>
<p><b>{"Memorisation suspected" if verdict["memorization_suspected"] else "No memorisation detected"}.</b>
{esc(verdict["summary"])}</p>
<p>{result["num_released_images"]} released images, {result["num_private_images"]} private images in
{esc(str(result["private_dir"]))}; split by privacy unit (seed {s.seed}): {result["split"]["images_a"]} in A,
{result["split"]["images_b"]} in B.</p>
<h2>Feature spaces</h2>
<table><tr><th>space</th><th>flagged (closer than fresh)</th><th>expected fraction</th>
<th>excess p (binomial)</th><th>closer-than-fresh p (Mann–Whitney)</th><th>thresholds</th></tr>
{"".join(feature_rows)}</table>
<p>Pixel check: {pixel["num_near_duplicates"]} near-duplicate(s) (NCC ≥ {s.ncc_threshold} on
{s.pixel_size}² grayscale, shifts ±{s.max_shift}).</p>
{_histograms(features, pixel)}
<h2>Flagged and closest released–private pairs</h2>
<table><tr><th>released</th><th>nearest private: pixels</th>{pair_header}<th>flags</th></tr>
{"".join(pair_rows)}</table>
<h2>Text overlap</h2>
{text_html}
{canary_html}
<div class="banner">{esc(NOT_DP_BANNER)}</div>
</body></html>
"""
