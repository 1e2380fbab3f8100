"""The owner's HTML page: a NOT-DP banner, the metrics table, the plots, the text statistics."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np


def headline(result: dict[str, Any]) -> str:
    """One short cell for a metric: its number(s), or why there is none."""
    if result.get("status") != "ok":
        return f"unavailable: {result.get('reason', '')}"
    if "precision" in result:
        return f"precision {result['precision']:.3f}, recall {result['recall']:.3f} (k={result['k']})"
    text = f"{result['value']:.4g}"
    if "private_reference" in result:
        text += f" (private images ↔ captions: {result['private_reference']:.4g})"
    return text


def png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_figures(report: dict[str, Any], plot_data: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, PNG data URI) per plot. ``Figure`` objects, not pyplot: no global backend is touched."""
    from matplotlib.figure import Figure

    figures: list[tuple[str, str]] = []
    metrics = report["metrics"]

    def spectrum_bars(title: str, series: list[tuple[str, dict[str, float]]]) -> None:
        bands = list(series[0][1])
        fig = Figure(figsize=(9, 3.2))
        ax = fig.subplots()
        width = 0.8 / len(series)
        x = np.arange(len(bands))
        for i, (label, fractions) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [fractions[b] for b in bands], width, label=label)
        ax.set_xticks(x, bands, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("energy fraction")
        ax.set_xlabel("band (coarse → fine)")
        ax.legend()
        figures.append((title, png_uri(fig)))

    wave = metrics.get("wavelet", {})
    if wave.get("status") == "ok":
        spectrum_bars(
            f"Wavelet energy spectrum at {wave['analysis_size']}², private vs released",
            [("private", wave["private"]["fractions"]), ("released", wave["released"]["fractions"])],
        )
        up = wave.get("upscaler", {})
        if up.get("model"):
            spectrum_bars(
                f"Released images at full size: {up['upscaler']} ×{up['factor']} vs a Lanczos round trip",
                [("Lanczos", up["lanczos"]["fractions"]), (up["upscaler"], up["model"]["fractions"])],
            )
    if "nn" in plot_data:
        released_nn, private_nn = plot_data["nn"]
        fig = Figure(figsize=(6, 3.2))
        ax = fig.subplots()
        bins = np.histogram_bin_edges(np.concatenate([released_nn, private_nn]), bins=20)
        ax.hist(private_nn, bins=bins, alpha=0.6, label="private → nearest other private")
        ax.hist(released_nn, bins=bins, alpha=0.6, label="released → nearest private")
        ax.set_xlabel(f"distance ({metrics['precision-recall']['extractor']})", fontsize=8)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        figures.append(("Nearest-neighbour distances (copy check)", png_uri(fig)))
        pr = metrics["precision-recall"]
        fig = Figure(figsize=(3.5, 3.2))
        ax = fig.subplots()
        ax.bar(["precision", "recall"], [pr["precision"], pr["recall"]], color=["tab:blue", "tab:orange"])
        ax.set_ylim(0, 1)
        figures.append((f"Improved precision / recall (k={pr['k']})", png_uri(fig)))
    if "text_lengths" in plot_data:
        private_len, released_len = plot_data["text_lengths"]
        fig = Figure(figsize=(6, 3.2))
        ax = fig.subplots()
        both = [*private_len, *released_len]
        bins = np.histogram_bin_edges(both, bins=min(20, max(1, len(set(both))))) if both else 10
        if private_len:
            ax.hist(private_len, bins=bins, alpha=0.6, label="private captions")
        if released_len:
            ax.hist(released_len, bins=bins, alpha=0.6, label="released descriptions")
        ax.set_xlabel("length (words)")
        ax.set_ylabel("texts")
        ax.legend(fontsize=8)
        figures.append(("Text lengths", png_uri(fig)))
    rounds = [r for r in (report.get("metrics_by_round") or {}).get("rounds", []) if r["fd_voting_space"] is not None]
    if rounds:
        fig = Figure(figsize=(6, 3.2))
        ax = fig.subplots()
        ax.plot([r["round"] for r in rounds], [r["fd_voting_space"] for r in rounds], marker="o")
        ax.set_xlabel("PE round")
        ax.set_ylabel("Fréchet distance (voting space)")
        ax.set_xticks([r["round"] for r in rounds])
        figures.append(("Fréchet distance between each round's selected candidates and the private set", png_uri(fig)))
    return figures


def rounds_table(report: dict[str, Any]) -> str:
    """The per-round metrics as a table (the numbers behind the by-round plot)."""
    esc = html.escape
    section = report.get("metrics_by_round")
    if not section:
        return ""

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{cell(r['fd_voting_space'])}</td><td>{cell(r['num_selected'])}</td></tr>"
        for r in section["rounds"]
    )
    skipped = f" {section['bad_rows']} malformed row(s) skipped." if section.get("bad_rows") else ""
    return (
        "<h2>By PE round (NOT DP)</h2>"
        f"<p>{esc(section['explains'])} From <code>{esc(section['file'])}</code>.{esc(skipped)}</p>"
        f"<table><tr><th>round</th><th>FD in the voting space</th><th>selected</th></tr>{rows}</table>"
    )


def render_html(report: dict[str, Any], plot_data: dict[str, Any] | None = None) -> str:
    """The owner-only page: a NOT-DP banner, the metrics table, the plots, and the text statistics."""
    esc = html.escape
    rows = []
    for name, result in report["metrics"].items():
        notes = [*result.get("notes", [])]
        if result.get("status") == "ok" and "nearest_neighbour" in result:
            ratio = result["nearest_neighbour"].get("closest_over_typical")
            if ratio is not None:
                notes.append(f"closest released/private pair at {ratio:.3g}× the median private NN distance")
        rows.append(
            "<tr>"
            f"<th>{esc(name)}</th><td>{esc(headline(result))}</td><td>{esc(str(result.get('extractor', '')))}</td>"
            f"<td>{esc(str(result.get('n_private', '')))}</td><td>{esc(str(result.get('n_released', '')))}</td>"
            f"<td>{esc('; '.join(notes))}</td></tr>"
        )
    try:
        figures = make_figures(report, plot_data or {})
        plots = "".join(
            f'<figure><img src="{uri}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>'
            for title, uri in figures
        )
    except ImportError:
        plots = "<p>Plots need matplotlib: <code>pip install 'spti[eval]'</code>.</p>"
    text = report["metrics"].get("text-fd", {}).get("text_stats")
    text_table = ""
    if text:
        keys = ("n_texts", "total_words", "vocabulary_size", "type_token_ratio")

        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = [
            f"<tr><th>{esc(k)}</th>" + "".join(f"<td>{esc(fmt(text[s].get(k)))}</td>" for s in text) + "</tr>"
            for k in keys
        ]
        for stat in ("mean", "std", "median", "p95"):
            lines.append(
                f"<tr><th>words {stat}</th>"
                + "".join(f"<td>{esc(fmt((text[s].get('words') or {}).get(stat, '')))}</td>" for s in text)
                + "</tr>"
            )
        lines.append(
            "<tr><th>top words</th>"
            + "".join(f"<td>{esc(', '.join(f'{w} ({c})' for w, c in text[s]['top_words']))}</td>" for s in text)
            + "</tr>"
        )
        text_table = (
            "<h2>Text statistics</h2><table><tr><th></th>"
            + "".join(f"<th>{esc(s)}</th>" for s in text)
            + "</tr>"
            + "".join(lines)
            + "</table>"
        )
    samples = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in report["samples"].items() if v is not None
    )
    details = esc(json.dumps(report["metrics"], indent=1, ensure_ascii=False))
    protocol = report.get("protocol") or {}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>spti evaluation (NOT differentially private)</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}}
.banner{{background:#fde8e8;border:3px solid #c00;color:#900;padding:1rem;font-weight:600}}
table{{border-collapse:collapse;margin:1rem 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:.9rem}} th{{background:#f4f4f4}}
figure{{display:inline-block;margin:.5rem}} figure img{{max-width:100%}} figcaption{{font-size:.85rem}}
pre{{background:#f8f8f8;padding:1rem;overflow:auto;font-size:.75rem}}
</style></head><body>
<p class="banner">NOT DIFFERENTIALLY PRIVATE: OWNER ONLY. DO NOT SHARE. {esc(report["warning"])}</p>
<h1>Evaluation of {esc(report["run_dir"])}</h1>
<p>Created {esc(report["created_at"])}. Private images from {esc(str(report["private_dir"]))}.
The release itself (<code>release/</code>) is covered by the run's DP guarantee; these numbers are not.</p>
<p>Protocol {esc(protocol.get("name", "native"))}: {esc(protocol.get("explains", ""))}.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>result</th><th>feature extractor</th><th>private n</th><th>released n</th>
<th>notes</th></tr>{"".join(rows)}</table>
<h2>Plots</h2>
{plots}
{rounds_table(report)}
{text_table}
<h2>Samples</h2>
<table>{samples}</table>
<details><summary>All numbers (evaluation.json)</summary><pre>{details}</pre></details>
</body></html>
"""
