"""Prompt sets: the public text that drives captioning and the random / variation APIs.

A prompt set is a ``prompts.toml`` file: shipped ones live in ``spti/prompt_sets/<name>/`` (generic,
faces, bedrooms); ``--domain PATH`` accepts a user's own directory or file of the same shape.
Attribute lists and tones are public data chosen by a person, so using them costs no privacy.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from spti.errors import SptiError

SHIPPED_DOMAINS = ("generic", "faces", "bedrooms")


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

    def all_attributes(self) -> list[tuple[str, str]]:
        """Every (key, value) pair, in file order: the public seeds of the random API."""
        return [(key, value) for key, values in self.attributes.items() for value in values]


def _domain_file(domain: str | Path) -> Path:
    if str(domain) in SHIPPED_DOMAINS:
        return Path(str(resources.files("spti") / "prompt_sets" / str(domain) / "prompts.toml"))
    path = Path(domain).expanduser()
    if path.is_dir():
        path = path / "prompts.toml"
    if not path.exists():
        raise SptiError(
            f"prompt set '{domain}' not found: use one of {', '.join(SHIPPED_DOMAINS)} or a directory "
            "holding prompts.toml (copy spti/prompt_sets/generic/prompts.toml as a start)"
        )
    return path


def _need(table: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in table:
        raise SptiError(f"{path}: missing '{key}' in {where}; see spti/prompt_sets/generic/prompts.toml")
    return table[key]


def load_prompt_set(domain: str | Path = "generic") -> PromptSet:
    """Load and check a prompt set; placeholders are checked so a typo fails now, not mid-run."""
    path = _domain_file(domain)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SptiError(f"cannot read prompt set {path}: {exc}") from exc
    rnd = _need(data, "random", "the file", path)
    var = _need(data, "variation", "the file", path)
    attributes = {str(k): tuple(str(v) for v in vals) for k, vals in data.get("attributes", {}).items()}
    if not attributes or not any(attributes.values()):
        raise SptiError(f"{path}: [attributes] needs at least one non-empty list of public attribute values")
    tones = tuple(str(t) for t in _need(rnd, "tones", "[random]", path))
    if not tones:
        raise SptiError(f"{path}: [random].tones must list at least one tone")
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
        examples=tuple(FewShotExample(str(e["masked"]), str(e["filled"])) for e in var.get("examples", [])),
        source=str(path),
    )
    _check_placeholders(ps, path)
    return ps


def _check_placeholders(ps: PromptSet, path: Path) -> None:
    checks = {
        "[random].template": (ps.random_template, {"subject": "", "attribute": "", "tone": ""}),
        "[variation].fill_in_template": (ps.fill_in_template, {"subject": "", "word_count": 1, "masked": ""}),
        "[variation].rephrase_template": (ps.rephrase_template, {"subject": "", "word_count": 1, "text": ""}),
    }
    for where, (template, fields) in checks.items():
        try:
            template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise SptiError(
                f"{path}: {where} uses an unknown placeholder {exc}; allowed: {', '.join(sorted(fields))}"
            ) from exc
