"""Cleaning LLM answers into descriptions, and telling junk from a description.

Instruction-tuned LLMs open with "Here is the filled-in description:", wrap answers in quotes or
markdown, add notes, stop mid-sentence, refuse, echo the instructions or leave the blanks they were
asked to fill. :func:`clean_description` strips what is not the description; :func:`junk_reason`
says why what is left is still unusable (so the caller regenerates it or falls back), and
:func:`mask_words` makes the fill-in-the-blanks prompts of the variation API.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

# -- cleaning ------------------------------------------------------------------------------
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}
_LABEL = re.compile(
    r"^\s*(?:the\s+|my\s+)?(?:(?:final|revised|new|filled[- ]in|completed|rephrased|edited|short|image)\s+)?"
    r"(?:description|caption|answer|output|result|response|text|version|paragraph|prompt|filled[- ]in|rephrased)"
    r"(?:\s*\(\s*\d+\s+words?\s*\))?\s*[:：]\s*",
    re.IGNORECASE,
)
# Openers that introduce the answer rather than belong to it ("Sure! Here's the filled-in description: …").
_COURTESY = re.compile(
    r"^\s*(?:sure|certainly|of course|absolutely|okay|ok|great|alright|yes|no problem|happy to help)\b[^\w\n]*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\s*(?:here(?:'s| is| are)|below is|this is (?:the|a|my) (?:\w+[- ])*(?:description|version|text|rewrite)|"
    r"i(?:'ve| have) (?:filled|rephrased|rewritten|written|completed)|the following is|what's left to \w+)\b"
    r"[^\n]*?(?::|\.\.\.|…)\s*",
    re.IGNORECASE,
)
_TITLE_LINE = re.compile(r"^\s*(?:#{1,6}\s+.*|\*\*[^*]{1,80}\*\*:?\s*|[^.!?]{1,100}:\s*)$")
_COMMENTARY = re.compile(
    r"^\s*(?:\(|\[|-{3,}|\*{3,}|notes?\b|word count\b|explanation\b|i hope\b|hope this\b|let me know\b|"
    r"feel free\b|this (?:description|version|text|rewrite|answer)\b|in this (?:description|version)\b|"
    r"alternatively\b|or\s*:|another (?:version|option)\b|i (?:have|'ve|tried|made|kept|used)\b)",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+")
_WORD_COUNT_NOTE = re.compile(
    r"\s*[(\[][^()\[\]]*\b\d+\s*words?\b[^()\[\]]*[)\]]|\s*\bword count\s*[:=]?\s*\d+\.?", re.IGNORECASE
)
_MARKDOWN = [
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # bold
    (re.compile(r"__([A-Za-z0-9](?:[^_]*?[A-Za-z0-9])?)__"), r"\1"),  # bold with underscores (never blanks)
    (re.compile(r"(?<![\w*])\*(?!\s)([^*]+?)(?<!\s)\*(?![\w*])"), r"\1"),  # italics
    (re.compile(r"`+"), ""),
]
_END = re.compile(r"[.!?…][\"'”’)\]]*$")


def _strip_markdown(line: str) -> str:
    line = re.sub(r"^\s*>+\s?", "", line)  # block quote
    line = re.sub(r"^\s*#{1,6}\s+", "", line)
    line = _BULLET.sub("", line)
    for pattern, repl in _MARKDOWN:
        line = pattern.sub(repl, line)
    return line.replace("*", "").strip()


def _strip_openers(text: str) -> str:
    """Courtesy words, preambles and labels at the start of the text, repeatedly ("Sure! Here is: Answer: …")."""
    while True:
        before = text
        text = _COURTESY.sub("", text, count=1)
        text = _PREAMBLE.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1)
        text = text.lstrip(" \t-–—:")
        if text == before:
            return text


def _unquote(text: str) -> str:
    text = text.strip()
    if text and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        end = text.rfind(close, 1)
        # a quoted answer followed by a remark: keep what is quoted; an unclosed quote (cut-off answer): drop it
        text = text[1:end] if end > 0 and end >= len(text) * 0.5 else text[1:]
    if text and text[-1] in _QUOTES.values() and text.count(text[-1]) % 2 == 1 and text[-1] not in "'’":
        text = text[:-1]
    return text.strip()


def _trim_cut_sentence(text: str) -> str:
    """An answer cut by the token limit ends mid-sentence: drop the fragment if most of the text remains."""
    if _END.search(text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?…][\"'”’)\]]*(?=\s)", text)]
    if ends and len(text[: ends[-1]].split()) >= 2 / 3 * len(text.split()):
        return text[: ends[-1]]
    return text


def clean_description(text: str | None, *, max_words: int | None = None) -> str | None:
    """The description inside an LLM answer, or ``None`` when nothing is left.

    Strips courtesy openers and preambles ("Sure! Here is the filled-in description:"), labels
    ("Description:"), markdown (headings, bullets, bold, italics, code), enclosing quotes, word-count notes
    and a sentence cut off by the token limit; keeps the first paragraph of content (later ones are
    remarks or alternatives), collapses whitespace and, with ``max_words``, keeps at most that many words.
    """
    if not text:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("’", "'").replace("\u00a0", " ")
    text = re.sub(r"<\|[^|>]*\|>|</?s>|\[/?INST\]", " ", text)  # leaked chat-template tokens
    kept: list[str] = []
    for raw in text.split("\n"):
        if raw.strip().startswith("```"):
            continue
        if not raw.strip():
            if kept:
                break  # end of the first content paragraph
            continue
        line = _strip_openers(_strip_markdown(raw)) if not kept else _strip_markdown(raw)
        if not line:
            continue
        if not kept and _TITLE_LINE.match(raw.strip()) and not _BULLET.match(raw):
            continue  # a heading or "Here is the description:" on its own line
        if kept and (_COMMENTARY.match(line) or (_TITLE_LINE.match(raw.strip()) and raw.strip().endswith(":"))):
            break
        if kept and _BULLET.match(raw) and not _END.search(kept[-1]):
            kept[-1] += "."
        kept.append(line)
    out = _WORD_COUNT_NOTE.sub("", " ".join(kept))
    out = _unquote(_strip_openers(out))
    out = " ".join(out.split())
    if max_words is not None:
        out = " ".join(out.split()[:max_words])
    out = _trim_cut_sentence(out)
    return out or None


# -- junk ----------------------------------------------------------------------------------
_BLANK = re.compile(r"(?<![A-Za-z0-9])_+(?![A-Za-z0-9])|\[\s*(?:blank|\.\.\.|…|_+)?\s*\]|<\s*blank\s*>", re.I)
_REFUSAL_START = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|i cannot\b|i can'?t\b|i can not\b|i'?m unable|i am unable|"
    r"i'?m not able|i am not able|i won'?t\b|unfortunately,? i\b|i'?m afraid)",
    re.IGNORECASE,
)
_REFUSAL_ANY = re.compile(
    r"\bas an ai\b|\bas a language model\b|\bai language model\b|\bi do(?: not|n'?t) have (?:the ability|access)\b|"
    r"\bcannot (?:view|see) (?:the )?images?\b|\bi can'?t (?:view|see) (?:the )?images?\b",
    re.IGNORECASE,
)
_ECHO_NGRAM = 6


def _ngrams(text: str, n: int = _ECHO_NGRAM) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def instruction_ngrams(*templates: str) -> frozenset[tuple[str, ...]]:
    """Word 6-grams of the fixed text of prompt templates (placeholders split it; their values are not included)."""
    grams: set[tuple[str, ...]] = set()
    for template in templates:
        for part in re.split(r"\{[A-Za-z_]+\}", template):
            grams |= _ngrams(part)
    return frozenset(grams)


def junk_reason(
    text: str | None, *, min_words: int, instructions: frozenset[tuple[str, ...]] = frozenset()
) -> str | None:
    """Why a cleaned answer is unusable, or ``None`` if it is a description.

    Reasons, checked in this order: ``empty``; ``refusal`` ("I'm sorry", "As an AI"); ``echo`` (a 6-word
    run of the instructions repeated); ``blanks`` (a "_" or "[blank]" left); ``non_text`` (mostly symbols
    or digits, or one word repeated); ``too_short`` (fewer than ``min_words`` words).
    """
    if not text or not text.strip():
        return "empty"
    text = text.replace("’", "'")
    if _REFUSAL_START.search(text) or _REFUSAL_ANY.search(text):
        return "refusal"
    if instructions and _ngrams(text) & instructions:
        return "echo"
    if _BLANK.search(text):
        return "blanks"
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    words = re.findall(r"[^\W\d_]{2,}", text)
    if letters < 0.6 * len(visible) or not words:
        return "non_text"
    if len(words) >= 8 and Counter(w.lower() for w in words).most_common(1)[0][1] > 0.4 * len(words):
        return "non_text"
    if len(text.split()) < min_words:
        return "too_short"
    return None


def mask_words(text: str, probability: float, rng: np.random.Generator) -> str:
    """Replace each word by ``_`` with the given probability (at least one blank); punctuation around a word stays."""
    words = text.split()
    if not words:
        return "_"
    mask = rng.random(len(words)) < probability
    if not mask.any():
        mask[rng.integers(len(words))] = True
    out = []
    for word, masked in zip(words, mask, strict=True):
        if not masked:
            out.append(word)
            continue
        m = re.fullmatch(r"(\W*)(.*?)(\W*)", word)
        out.append(f"{m.group(1)}_{m.group(3)}" if m is not None and m.group(2) else "_")
    return " ".join(out)
