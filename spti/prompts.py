"""Prompt sets: the public text that drives captioning and the random / variation APIs.

A prompt set is a ``prompts.toml`` file. Shipped sets live in the top-level ``prompts/<name>/`` folder of
the source tree, one per domain (generic, faces, bedrooms, pets, histopathology, ui-screenshots, artwork,
products); the wheel installs them as ``spti/prompt_sets/<name>/`` (in the source tree that path is a
link to ``prompts/``). ``--domain PATH`` accepts a user's own directory or file of the same shape.

Attribute lists, tones and examples are public data chosen by a person, so using them costs no privacy.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from spti.errors import SptiError

SHIPPED_DOMAINS = (
    "generic",
    "faces",
    "bedrooms",
    "pets",
    "histopathology",
    "ui-screenshots",
    "artwork",
    "products",
)
_STARTER = "prompts/generic/prompts.toml in the spti source (or `spti.prompts.shipped_prompt_file('generic')`)"


@dataclass(frozen=True)
class FewShotExample:
    masked: str
    filled: str


@dataclass(frozen=True)
class PromptSet:
    name: str
    subject: str
    caption_prompt: str
    random_system: str
    random_template: str
    tones: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]]
    variation_system: str
    fill_in_template: str
    rephrase_template: str
    examples: tuple[FewShotExample, ...]
    source: str
    attributes_per_prompt: int = 1
    # caption words that count as an attribute word when seeding matches captions ("nordic" →
    # "scandinavian"): one word (hyphenated allowed) to the values' word
    synonyms: dict[str, str] = field(default_factory=dict)

    def all_attributes(self) -> list[tuple[str, str]]:
        """Every (key, value) pair, in file order: the public seeds of the random API."""
        return [(key, value) for key, values in self.attributes.items() for value in values]


def _shipped_roots() -> list[Path]:
    """Where shipped sets may live: inside the installed package (wheel), then the source tree's ``prompts/``.

    The second covers editable installs and checkouts where the ``spti/prompt_sets`` link is not
    materialised (e.g. git on Windows without symlinks).
    """
    package = Path(str(resources.files("spti")))
    return [package / "prompt_sets", package.parent / "prompts"]


def shipped_prompt_file(name: str) -> Path:
    """The ``prompts.toml`` of a shipped prompt set."""
    if name not in SHIPPED_DOMAINS:
        raise SptiError(f"'{name}' is not a shipped prompt set: use one of {', '.join(SHIPPED_DOMAINS)}")
    for root in _shipped_roots():
        path = root / name / "prompts.toml"
        if path.is_file():
            return path
    raise SptiError(
        f"the shipped prompt set '{name}' is missing from this installation (looked in "
        f"{', '.join(str(r) for r in _shipped_roots())}); reinstall spti"
    )


def _domain_file(domain: str | Path) -> Path:
    if str(domain) in SHIPPED_DOMAINS:
        return shipped_prompt_file(str(domain))
    path = Path(domain).expanduser()
    if path.is_dir():
        path = path / "prompts.toml"
    if not path.is_file():
        raise SptiError(
            f"prompt set '{domain}' not found: use one of {', '.join(SHIPPED_DOMAINS)} or a directory "
            f"holding prompts.toml (copy {_STARTER} as a start)"
        )
    return path


def _need(table: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in table:
        raise SptiError(f"{path}: missing '{key}' in {where}; see {_STARTER}")
    return table[key]


def _strings(value: Any, where: str, path: Path) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SptiError(f"{path}: {where} must be a list of strings")
    return tuple(str(v) for v in value)


def load_prompt_set(domain: str | Path = "generic") -> PromptSet:
    """Load and check a prompt set by shipped name or path; placeholders are checked so a typo fails now."""
    path = _domain_file(domain)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SptiError(f"cannot read prompt set {path}: {exc}") from exc
    rnd = _need(data, "random", "the file", path)
    var = _need(data, "variation", "the file", path)
    raw_attributes = data.get("attributes", {})
    if not isinstance(raw_attributes, dict):
        raise SptiError(f"{path}: [attributes] must be a table of lists")
    attributes = {str(k): _strings(v, f"[attributes].{k}", path) for k, v in raw_attributes.items()}
    attributes = {k: v for k, v in attributes.items() if v}
    if not attributes:
        raise SptiError(f"{path}: [attributes] needs at least one non-empty list of public attribute values")
    # Tones are shared by the random API and the rephrase variation; older files kept them in [random].
    tones = _strings(data["tones"] if "tones" in data else _need(rnd, "tones", "the file", path), "tones", path)
    if not tones:
        raise SptiError(f"{path}: tones must list at least one tone")
    per_prompt = rnd.get("attributes_per_prompt", 1)
    if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
        raise SptiError(f"{path}: [random].attributes_per_prompt must be an integer >= 1, got {per_prompt!r}")
    raw_synonyms = data.get("synonyms", {})
    if not isinstance(raw_synonyms, dict):
        raise SptiError(f'{path}: [synonyms] must be a table: word = ["synonym", ...]')
    synonyms: dict[str, str] = {}
    for word, others in raw_synonyms.items():
        for other in _strings(others, f"[synonyms].{word}", path):
            if not other or " " in other.strip():
                raise SptiError(f"{path}: [synonyms].{word}: {other!r} must be one word (hyphens are fine)")
            synonyms[other.strip().lower()] = str(word).lower()
    examples = []
    for i, ex in enumerate(var.get("examples", [])):
        if not isinstance(ex, dict) or "masked" not in ex or "filled" not in ex:
            raise SptiError(f"{path}: [[variation.examples]] entry {i + 1} needs 'masked' and 'filled'")
        examples.append(FewShotExample(str(ex["masked"]), str(ex["filled"])))
    ps = PromptSet(
        name=str(data.get("name", path.parent.name)),
        subject=str(_need(data, "subject", "the file", path)),
        caption_prompt=str(data.get("caption_prompt", "Describe the image.")),
        random_system=str(rnd.get("system", "")),
        random_template=str(_need(rnd, "template", "[random]", path)),
        tones=tones,
        attributes=attributes,
        variation_system=str(var.get("system", "")),
        fill_in_template=str(_need(var, "fill_in_template", "[variation]", path)),
        rephrase_template=str(_need(var, "rephrase_template", "[variation]", path)),
        examples=tuple(examples),
        source=str(path),
        attributes_per_prompt=min(per_prompt, len(attributes)),
        synonyms=synonyms,
    )
    _check_placeholders(ps, path)
    return ps


def _check_placeholders(ps: PromptSet, path: Path) -> None:
    checks = {
        "[random].template": (ps.random_template, {"subject": "", "attribute": "", "tone": ""}),
        "[variation].fill_in_template": (ps.fill_in_template, {"subject": "", "word_count": 1, "masked": ""}),
        "[variation].rephrase_template": (
            ps.rephrase_template,
            {"subject": "", "word_count": 1, "text": "", "tone": ""},
        ),
    }
    for where, (template, fields) in checks.items():
        try:
            template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise SptiError(
                f"{path}: {where} uses an unknown placeholder {exc}; allowed: {', '.join(sorted(fields))}"
            ) from exc
