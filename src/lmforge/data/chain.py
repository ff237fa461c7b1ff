"""The per-document filter chain of `lmforge data prepare`, as data: a list of named steps.

A batch of records is normalized (`normalize_batch`: Unicode, controls, escape sequences,
HTML, regexes, then the boilerplate lines of each source), and every document then runs
through `filter_steps(cfg)` in order: each `Step` is a small function that returns the reason
it removes the document, or None to pass it on (a step may also annotate or rewrite the
document: language, PII placeholders). The steps and their order:

    normalize (empty) -> langid -> quality (Gopher) -> repetition (Gopher) -> safety
    (blocklist) -> pii (scrub, never removes)

A step that is switched off in the config is not in the list. The accounting (`tally`) is
the runner's: a step with a tally `name` counts the documents and bytes that enter it and
the ones it removes, with an example.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lmforge.data import tally
from lmforge.data.config import DataPrepConfig
from lmforge.data.filters import Words, quality_reason, repetition_reason, split_words
from lmforge.data.langid import detect_language
from lmforge.data.normalize import find_boilerplate, normalize_text, strip_lines
from lmforge.data.readers import Record
from lmforge.data.safety import blocked_ratio, load_blocklists, scrub_pii


def utf8_size(text: str) -> int:
    """UTF-8 size of `text` (fast for ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def count(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


@dataclass
class Doc:
    """A document on its way through the chain: the record, its current text and what steps learned."""

    rec: Record
    text: str
    lang: str = ""
    lang_score: float = 0.0
    pii: Counter = field(default_factory=Counter)

    @cached_property
    def words(self) -> Words:
        """The words the quality, repetition and blocklist steps (and MinHash) share; computed once."""
        return split_words(self.text)


@dataclass
class Chain:
    """What the steps read: the config, the shard's tally and the loaded blocklists."""

    cfg: DataPrepConfig
    t: dict[str, Any]
    blocklists: dict[str, frozenset[str]]


@dataclass(frozen=True)
class Step:
    """One filter: `name` is its tally step ('' counts nothing); `run` returns a removal reason or None."""

    name: str
    run: Callable[[Doc, Chain], str | None]


def _not_empty(doc: Doc, chain: Chain) -> str | None:
    return None if doc.text.strip() else "empty"


def _langid(doc: Doc, chain: Chain) -> str | None:
    cfg = chain.cfg.langid
    doc.lang, doc.lang_score = detect_language(doc.text, cfg.sample_chars)
    if cfg.allowed and doc.lang not in cfg.allowed:
        return "lang_not_allowed"
    if doc.lang_score < cfg.min_confidence:
        return "lang_low_confidence"
    count(chain.t["langs"], doc.lang)
    return None


def _quality(doc: Doc, chain: Chain) -> str | None:
    return quality_reason(doc.text, doc.words, doc.lang, chain.cfg.quality)


def _repetition(doc: Doc, chain: Chain) -> str | None:
    return repetition_reason(doc.text, doc.words, chain.cfg.repetition)


def _blocklist(doc: Doc, chain: Chain) -> str | None:
    if not chain.blocklists:
        return None
    ratio = blocked_ratio(doc.text, len(doc.words.tokens), doc.words.cjk, chain.blocklists)
    return "blocklist" if ratio > chain.cfg.safety.max_blocked_ratio else None


def _scrub_pii(doc: Doc, chain: Chain) -> str | None:
    doc.words  # noqa: B018 - the words (MinHash's too) stay those of the text before scrubbing
    doc.text = scrub_pii(doc.text, doc.pii)
    for kind, n in doc.pii.items():
        count(chain.t["pii"], kind, n)
    return None


def filter_steps(cfg: DataPrepConfig) -> list[Step]:
    """The chain for `cfg`, in order (module docstring); steps switched off are left out."""
    steps = [Step("", _not_empty)]  # normalize's own removal: entered while normalizing
    if cfg.langid.enabled:
        steps.append(Step("langid", _langid))
    if cfg.quality.enabled:
        steps.append(Step("quality", _quality))
    if cfg.repetition.enabled:
        steps.append(Step("repetition", _repetition))
    steps.append(Step("safety", _blocklist))
    if cfg.safety.pii:
        steps.append(Step("", _scrub_pii))
    return steps


def run_steps(doc: Doc, steps: list[Step], chain: Chain) -> bool:
    """Run `doc` through `steps`; False (and the removal counted) at the first step that removes it."""
    text, size = doc.text, utf8_size(doc.text)
    for step in steps:
        if doc.text is not text:  # a step rewrote it
            text, size = doc.text, utf8_size(doc.text)
        if step.name:
            tally.enter(chain.t, step.name, size)
        reason = step.run(doc, chain)
        if reason is not None:
            # the example shown is the text the step saw (the original, when normalizing left nothing)
            tally.remove(chain.t, step.name or "normalize", reason, size,
                         doc.text if doc.text.strip() else doc.rec.text)
            return False
    return True


def make_chain(cfg: DataPrepConfig, t: dict[str, Any]) -> Chain:
    return Chain(cfg, t, load_blocklists(cfg.safety.blocklist_dir) if cfg.safety.blocklist else {})


# ---- normalization of a batch (before the chain: boilerplate needs the whole batch) --------------


def source_group(rec: Record) -> str:
    """The source a record's boilerplate is looked for in: a file that holds many documents is
    its own source; one-document files (.txt) of one directory form one together (so e-book
    licence blurbs repeat across them)."""
    return os.path.dirname(rec.source) if rec.id == rec.source else rec.source


def normalize_batch(batch: list[Record], cfg: DataPrepConfig, t: dict[str, Any]) -> list[Doc]:
    """Read and normalize every record of `batch` (counted), then strip each source's boilerplate lines."""
    patterns = [re.compile(p) for p in cfg.normalize.remove_patterns]
    docs: list[Doc] = []
    for rec in batch:
        size = utf8_size(rec.text)
        t["documents_in"] += 1
        t["bytes_in"] += size
        tally.enter(t, "read", size)
        tally.enter(t, "normalize", size)
        if rec.invalid_utf8:
            if cfg.normalize.invalid_utf8 == "drop":
                tally.remove(t, "normalize", "invalid_utf8", size, rec.text)
                continue
            count(t["changes"], "invalid_utf8_repaired")
        text, changes = normalize_text(rec.text, cfg.normalize, patterns)
        for change in changes:
            count(t["changes"], change)
        docs.append(Doc(rec, text))
    _strip_boilerplate(docs, cfg, t)
    return docs


def _strip_boilerplate(docs: list[Doc], cfg: DataPrepConfig, t: dict[str, Any]) -> None:
    groups: dict[str, list[Doc]] = defaultdict(list)
    for doc in docs:
        groups[source_group(doc.rec)].append(doc)
    for members in groups.values():
        if len(members) < cfg.normalize.boilerplate_min_docs:
            continue
        lines = find_boilerplate((d.text for d in members), cfg.normalize)
        if not lines:
            continue
        for doc in members:
            text, n = strip_lines(doc.text, lines)
            if n:
                count(t["changes"], "boilerplate_lines_removed", n)
                doc.text = text
