"""What a run will ask of hosted models, and what it will cost, before it sends anything.

:func:`plan_run` counts, for resolved settings and a number of private images, the requests each
model role makes (the same schedule the pipeline follows: a caption per private image, the random
API's first population, ``variation_folds`` variations of each kept description per round, the
embedding requests in the batches the embedder sends, an image per vote candidate and seed, the
final renders), estimates their tokens, and prices them from a dated table
(``spti/prices.toml``, or ``--prices FILE``). :func:`save_usage` keeps what a run really used in
``RUN_DIR/private/usage.json``, summed over every process of the run (resumes included). It lives under
``private/`` because the usage of the roles that read private data (one caption per private image) counts them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spti.backends.openai.usage import ModelPrice, PriceTable, load_price_table, price_for, price_model_usage
from spti.config import ROLE_FIELDS, RunConfig
from spti.errors import SptiError

HOSTED_HOSTS = frozenset({"api.openai.com"})
# How the pipeline batches embedding requests (spti.vote_spaces.TextVoteSpace: 256 texts per
# embed call; spti.backends.openai.embeddings.OpenAITextEmbedder: 64 texts per request).
EMBED_CALL = 256
EMBED_REQUEST = 64
TOKENS_PER_WORD = 4 / 3  # English text, roughly
DEFAULT_IMAGE_INPUT_TOKENS = 765  # a 1024² image at detail auto: 85 + 4 tiles × 170
USAGE_FILE = "usage.json"
COUNT_KEYS = (
    "requests",
    "succeeded",
    "retries",
    "cache_hits",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "images",
    "unmetered_images",
)


def prices(path: str | Path | None = None) -> PriceTable:
    """The shipped table, with ``path``'s entries over it."""
    shipped = load_price_table()
    return shipped if path is None else load_price_table(path, base=shipped)


def is_hosted(url: str) -> bool:
    return any((urlsplit(u.strip()).hostname or "") in HOSTED_HOSTS for u in url.split(","))


def price_at(table: PriceTable, url: str, model: str) -> tuple[ModelPrice | None, str]:
    """The price of ``model`` at ``url`` and where it came from: the table (api.openai.com), an
    ``[endpoints]`` entry, or ``self-served`` (0: a server that is not api.openai.com)."""
    own = table.endpoints.get(url.rstrip("/"), {})
    if model in own:
        return own[model], "endpoint price"
    if is_hosted(url):
        price = price_for(model, table.models)
        return price, "list price" if price is not None else "price unknown"
    return ModelPrice(0.0), "self-served: 0 unless priced"


def _resolve_url(cfg: RunConfig, role: str) -> str:
    from spti.backends.openai.helpers import resolve_base_url

    return resolve_base_url(cfg.endpoint_base_url(cfg.model_spec(role)))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass
class RolePlan:
    role: str
    model: str
    endpoint: str
    requests: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    images: int = 0
    image_size: str | None = None
    cost_usd: float = 0.0
    priced: bool = True
    price_note: str = ""
    kinds: dict[str, int] = field(default_factory=dict)  # requests per kind (caption, random, vary, ...)


@dataclass
class CostPlan:
    roles: list[RolePlan]
    local_roles: list[str]
    prices_date: str
    prices_path: str
    notes: list[str]
    num_images: int
    num_units: int

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.roles)

    @property
    def images(self) -> int:
        return sum(r.images for r in self.roles)

    @property
    def cost_usd(self) -> float:
        return sum(r.cost_usd for r in self.roles)

    @property
    def complete(self) -> bool:
        return all(r.priced for r in self.roles)

    @property
    def paid(self) -> bool:
        """Whether any request goes to a hosted (billed) endpoint, or is priced above 0."""
        return any(r.requests and (is_hosted(r.endpoint) or r.cost_usd > 0) for r in self.roles)

    def total_text(self) -> str:
        cost = f"~${self.cost_usd:.2f}" + ("" if self.complete else " (a lower bound: some prices unknown)")
        return f"{self.requests} requests, {self.images} images, {cost}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_units": self.num_units,
            "requests": self.requests,
            "images": self.images,
            "cost_usd": round(self.cost_usd, 6),
            "cost_complete": self.complete,
            "prices": {"date": self.prices_date, "file": self.prices_path},
            "by_role": [asdict(r) for r in self.roles],
            "local_roles": self.local_roles,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        out = [
            f"cost plan for {self.num_images} private images ({self.num_units} privacy units); "
            f"prices of {self.prices_date} ({self.prices_path})"
        ]
        head = f"{'role':<15} {'model':<24} {'requests':>8} {'prompt tok':>11} {'answer tok':>11} {'images':>6}  cost"
        out.append(head)
        for r in self.roles:
            cost = f"${r.cost_usd:.2f}" if r.priced else f"price unknown (≥ ${r.cost_usd:.2f})"
            if r.price_note.startswith("self-served"):
                cost += " (self-served)"
            size = f" @{r.image_size}" if r.images and r.image_size else ""
            out.append(
                f"{r.role:<15} {r.model[:24]:<24} {r.requests:>8} {r.prompt_tokens:>11,} {r.answer_tokens:>11,} "
                f"{r.images:>6}  {cost}{size}  → {r.endpoint}"
            )
        out.append(f"total: {self.total_text()}")
        if self.local_roles:
            out.append("local (no requests, no API cost): " + ", ".join(self.local_roles))
        out += [f"note: {n}" for n in self.notes]
        return out


def _tokens(words: float) -> int:
    return max(1, math.ceil(words * TOKENS_PER_WORD))


def _approx(text: str) -> int:
    return max(1, len(text) // 4)


def embed_requests(n: int, cached_first: int = 0) -> int:
    """Embedding requests for ``n`` texts embedded in calls of :data:`EMBED_CALL`, the first
    ``cached_first`` already cached (the kept descriptions, embedded the round before)."""
    total = 0
    for start in range(0, n, EMBED_CALL):
        end = min(n, start + EMBED_CALL)
        missing = end - max(start, min(end, cached_first))
        total += -(-missing // EMBED_REQUEST)
    return total


def _pe(cfg: RunConfig, num_units: int) -> tuple[Any, list[str]]:
    from spti.pipeline import pe_config

    pe = pe_config(cfg)
    notes = []
    if pe.auto_population:
        from private_evolution.count import NoisyCount

        try:
            sigma = pe.noise_plan().round_noise_multiplier
        except ValueError as exc:
            raise SptiError(f"invalid privacy settings: {exc}") from None
        pe = pe.sized_for(NoisyCount(float(num_units), 0.0), sigma)
        notes.append(
            f"--population auto sizes the population from the DP count of units; planned with the public "
            f"count of files ({num_units} units): {pe.kept(0)} kept per round"
        )
    return pe, notes


def plan_run(
    cfg: RunConfig, *, num_images: int, num_units: int | None = None, table: PriceTable | None = None
) -> CostPlan:
    """Requests, tokens, images and cost per model role of a run over ``num_images`` private images."""
    from spti.prompts import load_prompt_set
    from spti.text_evolution import VariationSettings

    table = table or prices()
    units = num_units if num_units is not None else num_images
    if cfg.max_private is not None and units > cfg.max_private:
        num_images = max(1, round(num_images * cfg.max_private / units))
        units = cfg.max_private
    pe, notes = _pe(cfg, units)
    ps = load_prompt_set(cfg.domain)
    vs = VariationSettings(word_count_std=cfg.word_count_std, min_words=cfg.min_words, max_words=cfg.max_words)
    T = cfg.iterations
    pops = [pe.population_at(t) for t in range(T)]
    kept = [pe.kept(t) for t in range(T)]
    desc_words = max(cfg.min_words, 40) if cfg.max_words is None else min(max(cfg.min_words, 40), cfg.max_words)
    desc_tokens = _tokens(desc_words)
    caption_tokens = min(cfg.caption_max_tokens, _tokens(30))

    work: dict[str, dict[str, Any]] = {r: {"kinds": {}, "p": 0, "a": 0, "images": 0, "size": None} for r in ROLE_FIELDS}

    def add(role: str, kind: str, requests: int, prompt: int, answer: int, images: int = 0) -> None:
        w = work[role]
        w["kinds"][kind] = w["kinds"].get(kind, 0) + requests
        w["p"] += requests * prompt
        w["a"] += requests * answer
        w["images"] += images

    if cfg.voting == "text":
        price, _ = price_at(table, _url_or_local(cfg, "caption"), cfg.caption_model)
        vision = (price.image_input_tokens if price and price.image_input_tokens else None) or (
            DEFAULT_IMAGE_INPUT_TOKENS
        )
        add("caption", "caption", num_images, _approx(ps.caption_prompt) + vision, caption_tokens)
    random_prompt = _approx(ps.random_system + ps.random_template) + 10
    add("llm", "random", pops[0], random_prompt, min(vs.random_max_new_tokens, desc_tokens))
    few_shot = sum(_approx(ex.masked) + _approx(ex.filled) + _approx(ps.fill_in_template) for ex in ps.examples)
    vary_prompt = _approx(ps.variation_system + ps.fill_in_template) + few_shot + desc_tokens
    vary_answer = min(vs.token_budget(desc_words), desc_tokens)
    varied = sum(kept[t] * cfg.variation_folds for t in range(T - 1))
    add("llm", "vary", varied, vary_prompt, vary_answer)
    if cfg.lookahead:
        add("llm", "lookahead", cfg.lookahead * sum(pops), vary_prompt, vary_answer)
        notes.append("lookahead: each round's candidates are varied and embedded lookahead times more")
    if cfg.voting == "text":
        add("text_embedding", "private captions", embed_requests(num_images), EMBED_REQUEST * caption_tokens, 0)
        for t in range(T):
            if cfg.lookahead:
                n = cfg.lookahead * embed_requests(pops[t])
            else:
                n = embed_requests(pops[t], kept[t - 1] if t else 0)
            add("text_embedding", "candidates", n, EMBED_REQUEST * desc_tokens, 0)
        # an embedding request carries up to 64 texts: tokens are per text, not per request
        emb = work["text_embedding"]
        emb["p"] = num_images * caption_tokens + desc_tokens * sum(
            (cfg.lookahead or 1) * (pops[t] - (kept[t - 1] if t and not cfg.lookahead else 0)) for t in range(T)
        )
    else:
        vote_size = cfg.vote_render_size if isinstance(cfg.vote_render_size, int) else cfg.render_size
        work["image"]["size"] = f"{vote_size}x{vote_size}"
        for t in range(T):
            new = pops[t] if t == 0 else kept[t - 1] * cfg.variation_folds
            if cfg.lookahead:
                new = cfg.lookahead * pops[t]
            n = new * cfg.vote_seeds
            add("image", "vote renders", n, desc_tokens, 0, images=n)
        if cfg.model_spec("image").provider == "openai":
            notes.append("image voting: candidates drawn the same in two rounds are drawn once (fewer, not more)")
    release_role = "release_image" if cfg.separate_release_model else "image"
    if not cfg.keeps_vote_renders():
        work[release_role]["size"] = work[release_role]["size"] or f"{cfg.render_size}x{cfg.render_size}"
        if release_role == "image" and work["image"]["size"] != f"{cfg.render_size}x{cfg.render_size}":
            work["image"]["size"] = f"{cfg.render_size}x{cfg.render_size}"  # the release dominates its price
        add(release_role, "final renders", cfg.num_samples, desc_tokens, 0, images=cfg.num_samples)

    roles: list[RolePlan] = []
    local: list[str] = []
    for role, w in work.items():
        requests = sum(w["kinds"].values())
        if role in ("upscaler", "image_features") or not requests:
            continue
        spec = cfg.model_spec(role)
        if spec.provider != "openai":
            local.append(f"{role} ({spec.model})")
            continue
        url = _resolve_url(cfg, role)
        price, note = price_at(table, url, spec.model)
        counts = {"requests": requests, "prompt_tokens": w["p"], "images": w["images"]}
        if w["images"]:  # the server may not report image tokens: price each image by its size
            counts["unmetered_images"] = w["images"]
        else:
            counts["completion_tokens"] = w["a"]
        cost, known = price_model_usage(spec.model, counts, price, image_size=w["size"])
        roles.append(
            RolePlan(
                role,
                spec.model,
                url,
                requests,
                w["p"],
                w["a"],
                w["images"],
                w["size"],
                cost,
                known,
                note if known else f"price unknown for {spec.model} at {w['size'] or url}",
                dict(w["kinds"]),
            )
        )
    if any(r.requests for r in roles if r.role == "llm"):
        notes.append("junk answers are asked again once: a few more llm requests than planned")
    if not all(r.priced for r in roles):
        notes.append("price unknown for " + ", ".join(r.model for r in roles if not r.priced) + ": give it in --prices")
    return CostPlan(roles, local, table.date, table.path, notes, num_images, units)


def _url_or_local(cfg: RunConfig, role: str) -> str:
    spec = cfg.model_spec(role)
    return _resolve_url(cfg, role) if spec.provider == "openai" else "local"


def count_private(private_dir: Path, cfg: RunConfig) -> tuple[int, int]:
    """Images and privacy units in a private folder (headers only; nothing is written)."""
    from spti.data import scan_private_folder

    folder = scan_private_folder(private_dir, privacy_unit=cfg.privacy_unit, verify=False)  # type: ignore[arg-type]
    return len(folder.images), folder.num_units


# --------------------------------------------------------------------------------------------
# The gate before the first paid request
# --------------------------------------------------------------------------------------------
def check_cost(
    plan: CostPlan,
    *,
    max_cost: float | None,
    yes: bool,
    interactive: bool,
    echo: Any,
    confirm: Any,
) -> None:
    """Refuse a plan above ``max_cost`` (one line, before anything is sent or written); ask on a
    terminal before a paid run (``yes`` skips); else say the estimate."""
    if max_cost is not None:
        if plan.cost_usd > max_cost:
            raise SptiError(
                f"estimated cost ~${plan.cost_usd:.2f} ({plan.requests} requests, {plan.images} images) is above "
                f"--max-cost ${max_cost:.2f}; nothing was sent (see `spti plan`)"
            )
        if not plan.complete:
            unknown = ", ".join(r.model for r in plan.roles if not r.priced)
            raise SptiError(
                f"cannot check --max-cost ${max_cost:.2f}: price unknown for {unknown} (estimate ≥ "
                f"${plan.cost_usd:.2f}); give its price in --prices FILE"
            )
    if not plan.paid:
        return
    line = f"cost estimate: {plan.total_text()} (prices of {plan.prices_date}; `spti plan` for the details)"
    if interactive and not yes:
        if not confirm(f"{line}. Start?"):
            raise SptiError("cancelled before the first paid request; nothing was sent")
    else:
        echo(line)


# --------------------------------------------------------------------------------------------
# What a run really used: RUN_DIR/private/usage.json (owner-only: caption counts reveal N)
# --------------------------------------------------------------------------------------------
def _process_id() -> str:
    global _PROCESS_ID
    if _PROCESS_ID is None:
        _PROCESS_ID = f"{os.getpid()}-{int(time.time() * 1000)}"
    return _PROCESS_ID


_PROCESS_ID: str | None = None


def _role_groups(cfg: RunConfig) -> dict[tuple[str, str], list[str]]:
    """Roles by (endpoint URL, model): roles on one server with one model share its counters."""
    groups: dict[tuple[str, str], list[str]] = {}
    for role in ROLE_FIELDS:
        if getattr(cfg, ROLE_FIELDS[role]) is None and role != "release_image":
            continue
        if role == "release_image" and not cfg.separate_release_model:
            continue
        spec = cfg.model_spec(role)
        if spec.provider != "openai":
            continue
        groups.setdefault((_resolve_url(cfg, role), spec.model), []).append(role)
    return groups


def _image_size(cfg: RunConfig, roles: list[str]) -> str | None:
    sizes = set()
    if "image" in roles and cfg.voting == "image":
        side = cfg.vote_render_size if isinstance(cfg.vote_render_size, int) else cfg.render_size
        sizes.add(side)
    releases = "release_image" in roles or ("image" in roles and not cfg.separate_release_model)
    if releases and not cfg.keeps_vote_renders():
        sizes.add(cfg.render_size)
    if len(sizes) != 1:
        return None  # two sizes on one counter: an image the server did not meter cannot be priced
    side = sizes.pop()
    return f"{side}x{side}"


def usage_by_role(cfg: RunConfig, usage: dict[str, Any], table: PriceTable) -> dict[str, dict[str, Any]]:
    """This process's usage (``Models.usage()``) per role group (``caption+llm`` when two roles use
    one model on one server), priced with ``table`` and the endpoint rule of :func:`price_at`."""
    endpoints = usage.get("by_endpoint") or {}
    out: dict[str, dict[str, Any]] = {}
    for (url, model), roles in _role_groups(cfg).items():
        counts = dict.fromkeys(COUNT_KEYS, 0)
        for name, report in endpoints.items():
            if name == url or name.startswith(url + " ("):
                for key in COUNT_KEYS:
                    counts[key] += int((report.get("by_model") or {}).get(model, {}).get(key, 0))
        price, _ = price_at(table, url, model)
        cost, known = price_model_usage(model, counts, price, image_size=_image_size(cfg, roles))
        out["+".join(roles)] = {"model": model, "endpoint": url, **counts, "cost_usd": cost, "cost_known": known}
    return out


def _sum(entries: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = dict.fromkeys(COUNT_KEYS, 0) | {"cost_usd": 0.0, "cost_known": True}
    for e in entries:
        for key in COUNT_KEYS:
            total[key] += int(e.get(key, 0))
        total["cost_usd"] += float(e.get("cost_usd", 0.0))
        total["cost_known"] = total["cost_known"] and bool(e.get("cost_known", True))
    total["cost_usd"] = round(total["cost_usd"], 6)
    return total


def save_usage(run: Any, cfg: RunConfig, usage: dict[str, Any], table: PriceTable | None = None) -> dict[str, Any]:
    """Write ``RUN_DIR/private/usage.json``: this process's usage (replacing what it saved before, so
    saving twice counts once) beside every earlier process's, and the sums. Returns the file's object."""
    from private_evolution.files import atomic_write_json
    from spti.backends.openai.usage import load_price_table as _load

    table = table or _load()
    path = Path(run.private) / USAGE_FILE
    data: dict[str, Any] = {}
    if path.exists():
        import json

        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    processes: dict[str, Any] = data.get("processes") or {}
    mine = usage_by_role(cfg, usage, table)
    if any(e["requests"] or e["cache_hits"] for e in mine.values()) or _process_id() in processes:
        processes[_process_id()] = {"saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by_role": mine}
    by_role: dict[str, list[dict[str, Any]]] = {}
    by_endpoint: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, dict[str, str]] = {}
    for proc in processes.values():
        for role, entry in proc["by_role"].items():
            by_role.setdefault(role, []).append(entry)
            by_endpoint.setdefault(entry["endpoint"], []).append(entry)
            meta[role] = {"model": entry["model"], "endpoint": entry["endpoint"]}
    out = {
        "format": 1,
        "prices": {"date": table.date, "file": table.path},
        "total": _sum([e for entries in by_role.values() for e in entries]),
        "by_role": {role: meta[role] | _sum(entries) for role, entries in by_role.items()},
        "by_endpoint": {url: _sum(entries) for url, entries in by_endpoint.items()},
        "processes": processes,
    }
    if processes:
        atomic_write_json(path, out)
    return out
