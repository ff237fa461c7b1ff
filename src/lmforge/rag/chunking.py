"""Split a document into chunks for retrieval; every chunk keeps its char offsets into the document.

Three strategies (`chunk_text`), sizes and overlaps counted in tokens of the embedder's tokenizer:

- `fixed`: windows of `size` tokens, each starting `size - overlap` tokens after the previous one;
  the token offsets of the tokenizer map each window back to a char span of the document.
- `sentence`: whole sentences packed into windows of at most `size` tokens; the next window starts
  with the last sentences of the previous one that fit in `overlap` tokens. A sentence longer than
  `size` is cut like `fixed`.
- `semantic`: consecutive sentences stay together until the cosine similarity of their embeddings
  drops below `threshold` (default: the 5th percentile of the document's neighbour similarities, i.e.
  a cut at the 95th percentile of its distances, as LangChain's SemanticChunker does); a segment longer
  than `size` tokens is then packed like `sentence`.

Sentences end at . ! ? (before white space) and at the CJK 。！？ (no space needed; Chinese has
none), with closing quotes or brackets after them kept in the sentence; a blank line ends one too.
`chunk.text == document[chunk.start:chunk.end]` always holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.errors import UserError

STRATEGIES = ("fixed", "sentence", "semantic")
SEMANTIC_PERCENTILE = 5.0  # default threshold: this percentile of the document's neighbour cosines

_CLOSE = "\"')\\]}’”」』）》】"
_SENTENCE_END = re.compile(rf"(?:[.!?]+[{_CLOSE}]*(?=\s|$)|[。！？!?]+[{_CLOSE}]*|\n[ \t]*\n\s*)")
CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"  # kana, Han, Hangul: a regex class
_FALLBACK_TOKEN = re.compile(rf"[{CJK_CHARS}]|\w+|[^\w\s]")


@dataclass
class Chunk:
    """A piece of a document: its text and where it is (`source`, char offsets `start:end`)."""

    text: str
    source: str
    start: int
    end: int


# ---- sentences and tokens -------------------------------------------------------------------------


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Char spans of the sentences of `text`, white space around them left out."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        _append_stripped(text, start, match.end(), spans)
        start = match.end()
    _append_stripped(text, start, len(text), spans)
    return spans


def _append_stripped(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    if right > left:
        spans.append((start + left, start + right))


def token_spans(text: str, tokenizer: Any = None) -> list[tuple[int, int]]:
    """Char spans of the tokens of `text`: the tokenizer's offsets (an lmforge `Tokenizer`, or a
    `tokenizers.Tokenizer`), or, without one, words / single CJK characters / punctuation marks."""
    if tokenizer is None:
        return [m.span() for m in _FALLBACK_TOKEN.finditer(text)]
    backend = getattr(tokenizer, "backend", tokenizer)
    spans = backend.encode(text, add_special_tokens=False).offsets
    out: list[tuple[int, int]] = []
    for start, end in spans:  # byte-level BPE can give several tokens one char span: keep them all
        out.append((start, max(start, end)))
    return out


def count_tokens(texts: Sequence[str], tokenizer: Any = None) -> list[int]:
    """How many tokens each text has (without special tokens)."""
    if tokenizer is None:
        return [len(_FALLBACK_TOKEN.findall(t)) for t in texts]
    backend = getattr(tokenizer, "backend", tokenizer)
    return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]


# ---- strategies ------------------------------------------------------------------------------------


def chunk_text(text: str, source: str, strategy: str = "sentence", *, size: int = 256, overlap: int = 32,
               tokenizer: Any = None, embed: Callable[[list[str]], np.ndarray] | None = None,
               threshold: float | None = None) -> list[Chunk]:
    """The chunks of one document (see the module docstring); `embed` (texts -> unit vectors) is
    needed by `semantic` only. Empty or white-space-only text has no chunks."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown chunking {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if size < 1 or overlap < 0 or (overlap >= size and strategy != "semantic"):  # semantic chunks do not overlap
        raise UserError(f"chunk size {size} / overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    if strategy == "fixed":
        spans = _fixed(text, 0, len(text), size, overlap, tokenizer)
    elif strategy == "sentence":
        spans = _pack(split_sentences(text), text, size, overlap, tokenizer)
    else:
        if embed is None:
            raise UserError("semantic chunking needs an embedder (embed=...)")
        spans = _semantic(text, size, tokenizer, embed, threshold)
    out = []
    for start, end in spans:  # token windows may begin or end on white space (a char tokenizer's)
        start, end = start + len(text[start:end]) - len(text[start:end].lstrip()), start + len(text[start:end].rstrip())
        if end > start:
            out.append(Chunk(text[start:end], source, start, end))
    return out


def _fixed(text: str, lo: int, hi: int, size: int, overlap: int, tokenizer: Any) -> list[tuple[int, int]]:
    """Windows of `size` tokens over text[lo:hi], stride size - overlap, as char spans of the text."""
    tokens = [(s + lo, e + lo) for s, e in token_spans(text[lo:hi], tokenizer) if e > s]
    if not tokens:
        return []
    out = []
    step = size - overlap
    for first in range(0, len(tokens), step):
        window = tokens[first:first + size]
        out.append((window[0][0], max(e for _, e in window)))
        if first + size >= len(tokens):
            break
    return out


def _pack(sentences: list[tuple[int, int]], text: str, size: int, overlap: int,
          tokenizer: Any) -> list[tuple[int, int]]:
    """Sentence spans packed into windows of at most `size` tokens, `overlap` tokens of whole
    sentences carried into the next window; an over-long sentence is cut by `_fixed`."""
    counts = count_tokens([text[s:e] for s, e in sentences], tokenizer)
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(sentences):
        if counts[i] > size:
            out += _fixed(text, sentences[i][0], sentences[i][1], size, overlap, tokenizer)
            i += 1
            continue
        j, total = i, 0
        while j < len(sentences) and counts[j] <= size and total + counts[j] <= size:
            total += counts[j]
            j += 1
        out.append((sentences[i][0], sentences[j - 1][1]))
        if j >= len(sentences):
            break
        back, carried = j, 0  # the next window starts with sentences worth <= overlap tokens
        while back - 1 > i and carried + counts[back - 1] <= overlap:
            back -= 1
            carried += counts[back]
        i = back
    return out


def _semantic(text: str, size: int, tokenizer: Any, embed: Callable[[list[str]], np.ndarray],
              threshold: float | None) -> list[tuple[int, int]]:
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return _pack(sentences, text, size, 0, tokenizer)
    vectors = np.asarray(embed([text[s:e] for s, e in sentences]), dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = (vectors[:-1] * vectors[1:]).sum(axis=1)  # sentence i vs i + 1
    cut = float(np.percentile(similarity, SEMANTIC_PERCENTILE)) if threshold is None else threshold
    groups, first = [], 0
    for i, sim in enumerate(similarity):
        if sim < cut:
            groups.append(sentences[first:i + 1])
            first = i + 1
    groups.append(sentences[first:])
    out: list[tuple[int, int]] = []
    for group in groups:
        out += _pack(group, text, size, 0, tokenizer)
    return out
