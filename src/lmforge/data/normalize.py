"""Text normalization: Unicode form, control characters, odd whitespace, HTML, regexes, boilerplate.

`normalize_text` cleans one document and says what it changed (for the report);
`find_boilerplate` looks across the documents of one source for lines that repeat in most of
them (headers, footers, licence blurbs) so `strip_lines` can delete them.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from lmforge.data.config import NormalizeConfig

# Terminal escape sequences (colours such as ESC[33;1m, cursor moves, OSC titles): removed whole,
# before the control characters, or their printable tail ("[33;1m") would stay in the text.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]+[0-~]|[@-Z\\-_])"
                   r"|\x9b[0-?]*[ -/]*[@-~]")
# C0/C1 controls except tab/newline/CR, zero-width characters, BOM, line/paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ufffe]")
# Unusual spaces become a plain space; the ideographic space U+3000 is kept (it is CJK layout).
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u2028\u2029]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK = re.compile(r"\n{4,}")
_HTML_HINT = re.compile(r"<(?:!doctype|html|head|body|div|p|br|span|a\s|table|tr|td|li|ul|script|style|h[1-6])\b", re.I)
_HTML_DROP = re.compile(r"<(script|style|noscript)\b.*?</\1\s*>", re.I | re.S)
_HTML_BLOCK = re.compile(
    r"</?(?:p|div|br|li|ul|ol|tr|table|h[1-6]|section|article|header|footer|blockquote)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]{0,2000}>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)[^\n]*$", re.M | re.I)


def looks_like_html(text: str) -> bool:
    """At least three tags of common HTML elements in the first 10 KB."""
    return len(_HTML_HINT.findall(text, 0, 10_000)) >= 3


def strip_html(text: str) -> str:
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_DROP.sub("", text)
    text = _HTML_BLOCK.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


def normalize_text(text: str, cfg: NormalizeConfig, patterns: list[re.Pattern] | None = None) -> tuple[str, list[str]]:
    """The cleaned text and the names of the changes made (`html_stripped`, `gutenberg_cut`, ...)."""
    changes: list[str] = []
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.unicode_form != "none" and not text.isascii():
        normalized = unicodedata.normalize(cfg.unicode_form, text)
        if normalized != text:
            changes.append("unicode_normalized")
            text = normalized
    if "\x1b" in text or "\x9b" in text:
        stripped = _ANSI.sub("", text)
        if stripped != text:
            changes.append("ansi_escapes_removed")
            text = stripped
    if not text.isascii() or _CONTROL.search(text):
        cleaned = _ODD_SPACE.sub(" ", _CONTROL.sub("", text))
        if cleaned != text:
            changes.append("control_or_space_cleaned")
            text = cleaned
    if cfg.strip_html and "<" in text and looks_like_html(text):
        text = strip_html(text)
        changes.append("html_stripped")
    if cfg.gutenberg_markers and "utenberg" in text:
        cut = cut_gutenberg(text)
        if cut != text:
            changes.append("gutenberg_cut")
            text = cut
    for pattern in patterns or []:
        text, n = pattern.subn("", text)
        if n:
            changes.append("regex_removed")
    text = _MANY_BLANK.sub("\n\n\n", _TRAILING_SPACE.sub("\n", text)).strip()
    return text, changes


def cut_gutenberg(text: str) -> str:
    """Keep only what lies between Project Gutenberg's START and END marker lines (either may be absent)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def find_boilerplate(texts: Iterable[str], cfg: NormalizeConfig) -> set[str]:
    """Lines (stripped) found in at least `boilerplate_min_docs` and `boilerplate_min_fraction` of `texts`."""
    counts: Counter[str] = Counter()
    n_docs = 0
    for text in texts:
        n_docs += 1
        counts.update({line.strip() for line in text.split("\n") if len(line) >= cfg.boilerplate_min_chars})
    need = max(cfg.boilerplate_min_docs, cfg.boilerplate_min_fraction * n_docs)
    return {line for line, n in counts.items() if n >= need and len(line) >= cfg.boilerplate_min_chars}


def strip_lines(text: str, lines: set[str]) -> tuple[str, int]:
    """`text` without the lines in `lines`, and how many were removed."""
    kept, removed = [], 0
    for line in text.split("\n"):
        if len(line) >= 1 and line.strip() in lines:
            removed += 1
        else:
            kept.append(line)
    return ("\n".join(kept).strip(), removed) if removed else (text, 0)
