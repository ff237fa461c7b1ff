"""Gopher-style quality and repetition filters (Rae et al. 2021, appendix A), CJK-aware.

Each check returns a reason code (`quality_too_few_words`, `repetition_dup_5gram`, ...) or
None. Words are whitespace-separated tokens, as in Gopher; in CJK text (Chinese/Japanese,
which has no spaces) every Han/kana character is a word and punctuation is not, so the
same thresholds measure characters there.

Deviations from the paper, each because Gopher's rules would drop clean verse/drama or
Chinese text:
- duplicate *lines* and *paragraphs* are measured over lines/paragraphs with at least
  `repetition.min_line_words` words: speaker prefixes ("HAMLET."), stage directions
  ("[Exit.]") and refrains are short and repeat by design in plays;
- the mean-word-length bounds are not applied to CJK text (one character per word);
- a text is CJK when Han/kana make up 30% of its *letters* (not of all its characters), so
  Chinese prose with inline commands, paths and box-drawn tables is measured as Chinese;
  box-drawing and arrow characters are layout, not words;
- in CJK text the repetition n-grams span `repetition.cjk_chars_per_word` characters per
  word (a Chinese word is about two characters): Gopher's word 5-grams are 10 characters;
- the stop-word check uses the English list only for English (or unknown-language) text
  and a small Chinese/Japanese list (modern and classical particles, either script) for
  CJK text, which verse-shaped Chinese (below) need not pass; other languages skip it
  (Gopher was English-only);
- `quality.min_chars` (0 by default) is an extra length bound outside Gopher;
- Chinese text must also look ordered, not a bag of characters (Gopher's word-level rules
  cannot see shuffled characters). Evidence of order, any one suffices: (a) at least
  `quality.min_zh_word_pairs` of adjacent Han character pairs are among the 8000 most
  frequent two-character words (jieba's dictionary; traditional characters are mapped to
  simplified first) and more than expected by chance; (b) that excess over the pairs a
  shuffle of the text's own characters would give is at least `quality.min_zh_pair_z`
  standard deviations (classical prose and ci use few modern words, but still more than
  chance); (c) verse shape: at least `quality.min_zh_verse_clauses` of its Han characters
  lie in clauses (Han runs between punctuation) of 3-8 characters. A shuffle of the whole text fails all
  three (about 2% pass); a shuffle inside each clause of verse keeps its shape and is not
  detected.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path

import numpy as np

from lmforge.data.config import QualityConfig, RepetitionConfig

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PUNCT = ("\u2190-\u21ff\u2500-\u25ff\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2010-\u205e"
          "!-/:-@\\[-`{-~\u00a1-\u00bf")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_HAN_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]{2,}")
_KANA = re.compile("[\u3041-\u3096\u30a1-\u30fa]")  # not the middle dot \u30fb Chinese text uses too
# CJK text's words: each Han/kana character, and each other run that starts with a letter or digit
# and goes on to the next space, CJK character or CJK punctuation ("/etc/apt/apt.conf" is one word)
_WIDE_PUNCT = "\u2018-\u201f\u2190-\u21ff\u2500-\u25ff\u3000-\u303f\uff00-\uffef"
_CJK_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}{_PUNCT}][^\\s{_CJK}{_WIDE_PUNCT}]*")
_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")  # one match per whitespace token that has a letter
_LETTER = re.compile(r"[^\W\d_]")
_EN_STOP = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.I)
_CJK_STOP = frozenset("的了是不在我有一之而其也以为于人这他你与の に は を た が で て と し".replace(" ", "")
                      + "兮乎者矣焉哉於與為無所此何如則乃曰亦且這們個來說")  # classical particles; traditional forms
_HAN_CLAUSE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_BULLETS = ("•", "-", "*", "●", "‣", "◦", "▪", "–", "·")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for rolling n-gram hashes (golden ratio)


@dataclass
class Words:
    """A document's words as the filters and MinHash see them."""

    tokens: list[str]
    cjk: bool
    _hashes: tuple[np.ndarray, np.ndarray] | None = None

    def hashes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(stable uint64 hash, length) of every lower-cased word; computed once, shared by the
        repetition filter and MinHash. Latin text is hashed with numpy over its UTF-8 bytes."""
        if self._hashes is None:
            self._hashes = token_hashes(self.tokens) if self.cjk else byte_word_hashes(text)
        return self._hashes


def is_cjk(text: str, sample: int = 4000) -> bool:
    """Chinese/Japanese text: at least 30% of the letters (of a prefix) are Han or kana.

    Letters, not all characters: digits, punctuation and box-drawing tables do not make
    Chinese prose with inline English commands look like English."""
    head = text[:sample]
    cjk = len(_CJK_CHAR.findall(head))
    if cjk == 0:
        return False
    return cjk >= 0.3 * max(1, len(_LETTER.findall(head)))


def split_words(text: str) -> Words:
    if is_cjk(text):
        return Words(_CJK_TOKEN.findall(text), True)
    return Words(text.split(), False)


_P = np.uint64(1099511628211)  # odd, so invertible modulo 2^64
_P_INV = np.uint64(pow(1099511628211, -1, 2**64))
_powers: dict[str, np.ndarray] = {}
_SPACE_BYTES = np.zeros(256, dtype=bool)
_SPACE_BYTES[[9, 10, 11, 12, 13, 32]] = True


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i (mod 2^64) for i < n, cached and grown by doubling."""
    if "p" not in _powers or len(_powers["p"]) < n:
        size = max(n, 2 * len(_powers.get("p", ())), 1 << 16)
        _powers["p"] = _cumpow(_P, size)
        _powers["inv"] = _cumpow(_P_INV, size)
    return _powers["p"], _powers["inv"]


def _cumpow(base: np.uint64, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        out[1:] = np.cumprod(np.full(n - 1, base, dtype=np.uint64))
    return out


def _finalize(h: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: every input bit affects every output bit (MinHash needs good low bits)
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def byte_word_hashes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Hash and byte length of every whitespace-separated lower-cased word, without a Python loop.

    A polynomial hash over the UTF-8 bytes: with prefix sums H[k] = sum_{i<k} (b_i+1) P^i, the
    word [s, e) hashes to (H[e] - H[s]) * P^-s, the same wherever it occurs (mod 2^64).
    """
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    space = _SPACE_BYTES[data]
    word = ~space
    starts = np.flatnonzero(word & np.concatenate(([True], space[:-1])))
    ends = np.flatnonzero(word & np.concatenate((space[1:], [True]))) + 1
    powers, inverse = _power_tables(n)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[:n], out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
    return _finalize(hashes), (ends - starts).astype(np.int64)


def token_hashes(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hash and length of explicit tokens (CJK characters and words), via xxh3."""
    import xxhash

    xxh = xxhash.xxh3_64_intdigest
    hashes = np.fromiter((xxh(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    return hashes, np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))


def quality_reason(text: str, words: Words, lang: str, cfg: QualityConfig) -> str | None:
    """The first Gopher quality rule `text` breaks, as `quality_<rule>`, or None."""
    tokens = words.tokens
    n = len(tokens)
    if len(text) < cfg.min_chars:
        return "quality_too_short"
    if len(text) > cfg.max_chars:
        return "quality_too_long"
    if n < cfg.min_words:
        return "quality_too_few_words"
    if n > cfg.max_words:
        return "quality_too_many_words"
    if not words.cjk:
        mean = sum(map(len, tokens)) / n
        if mean < cfg.min_mean_word_length or mean > cfg.max_mean_word_length:
            return "quality_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "quality_symbol_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if lines:
        if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
            return "quality_bullet_lines"
        if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "quality_ellipsis_lines"
    if words.cjk:
        alpha = sum(1 for t in tokens if _LETTER.search(t))
    else:
        alpha = len(_ALPHA_TOKEN.findall(text))
    if alpha / n < cfg.min_alpha_words_ratio:
        return "quality_alpha_words"
    if cfg.min_stop_words > 0 and _stop_words(text, words, lang, cfg.min_stop_words) < cfg.min_stop_words:
        # CJK verse (a Tang poem has no particles) shows by its shape that it is not a list of words
        if not (words.cjk and zh_verse_clause_share(text) >= cfg.min_zh_verse_clauses):
            return "quality_stop_words"
    # Chinese: CJK text without kana, whatever variety langid names (shuffled text often reads as yue or wuu)
    if words.cjk and cfg.min_zh_word_pairs > 0 and lang != "ja" and not _KANA.search(text, 0, 4000):
        if not zh_looks_ordered(text, cfg):
            return "quality_zh_word_pairs"
    return None


def _stop_words(text: str, words: Words, lang: str, enough: int) -> int:
    """Stop words of `text` (an English count stops at `enough`); `enough` for languages without a list."""
    if words.cjk:
        return sum(1 for t in words.tokens if t in _CJK_STOP)
    if lang in ("en", ""):
        return len(list(islice(_EN_STOP.finditer(text), enough)))
    return enough


@lru_cache(maxsize=1)
def _zh_words() -> frozenset[str]:
    return frozenset(_resource_lines("zh_words.txt"))


@lru_cache(maxsize=1)
def _zh_word_seconds() -> dict[str, str]:
    """{first character: the second characters of the common words that start with it}."""
    seconds: dict[str, str] = {}
    for word in _zh_words():
        seconds[word[0]] = seconds.get(word[0], "") + word[1]
    return seconds


@lru_cache(maxsize=1)
def _t2s_table() -> dict[int, str]:
    """str.translate table: traditional -> simplified characters (those of the word list)."""
    return {ord(line[0]): line[1:] for line in _resource_lines("zh_t2s.txt")}


def _resource_lines(name: str) -> list[str]:
    path = Path(__file__).parent / "resources" / "cjk" / name
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


def zh_word_pair_ratio(text: str) -> float:
    """Share of adjacent Han character pairs that are common two-character Chinese words."""
    return zh_word_pair_stats(text)[0]


def zh_word_pair_stats(text: str) -> tuple[float, float]:
    """(share of adjacent Han pairs that are common words, z-score of that count against a shuffle).

    The z-score compares the hits with what the text's own characters give in random order:
    a pair is a word with probability p = sum over words ab of f(a) f(b), f the characters'
    frequencies in the text. Traditional characters are read as simplified."""
    words = _zh_words()
    runs = _HAN_RUN.findall(text.translate(_t2s_table()))
    total = hits = 0
    for run in runs:
        total += len(run) - 1
        hits += sum(1 for i in range(len(run) - 1) if run[i : i + 2] in words)
    if not total:
        return 1.0, 0.0
    counts = Counter("".join(runs))
    n = sum(counts.values())
    seconds = _zh_word_seconds()
    p = sum(c * sum(counts[b] for b in seconds.get(a, "")) for a, c in counts.items()) / (n * n)
    z = (hits - total * p) / max(math.sqrt(total * p * (1 - p)), 1.0)
    return hits / total, z


def zh_verse_clause_share(text: str) -> float:
    """Share of the Han characters in clauses (runs between other characters) 3-8 characters long;
    0 for a text of fewer than 8 clauses. Verse and parallel prose ~1; shuffled text ~0.5."""
    lengths = [len(c) for c in _HAN_CLAUSE.findall(text)]
    return sum(n for n in lengths if 3 <= n <= 8) / sum(lengths) if len(lengths) >= 8 else 0.0


def zh_looks_ordered(text: str, cfg: QualityConfig) -> bool:
    """Chinese text that is not a bag of shuffled characters (the module docstring's three kinds of evidence)."""
    ratio, z = zh_word_pair_stats(text)
    if (ratio >= cfg.min_zh_word_pairs and z >= 1.0) or z >= cfg.min_zh_pair_z:
        return True
    return zh_verse_clause_share(text) >= cfg.min_zh_verse_clauses


def _dup_fraction(units: list[str]) -> tuple[float, float]:
    """(share of units that repeat an earlier one, share of characters in those repeats)."""
    if not units:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for unit in units:
        if unit in seen:
            dup += 1
            dup_chars += len(unit)
        else:
            seen.add(unit)
    total_chars = sum(map(len, units))
    return dup / len(units), dup_chars / max(1, total_chars)


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Rolling hash of every n consecutive words (uint64, wrapping arithmetic)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = word_hashes[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = out * _MIX + word_hashes[k : k + m]
    return out


def repetition_reason(text: str, words: Words, cfg: RepetitionConfig) -> str | None:
    """The first Gopher repetition rule `text` breaks, as `repetition_<rule>`, or None."""
    min_words = cfg.min_line_words

    def long_enough(unit: str) -> bool:
        # spaces + 1 counts the words of a stripped line (a double space only over-counts);
        # CJK: characters and other words, not table borders
        return (len(_CJK_TOKEN.findall(unit)) >= min_words) if words.cjk else (unit.count(" ") + 1 >= min_words)

    lines = [s for s in (line.strip() for line in text.split("\n")) if s and long_enough(s)]
    line_frac, line_chars = _dup_fraction(lines)
    if line_frac > cfg.max_dup_line_fraction:
        return "repetition_dup_lines"
    if line_chars > cfg.max_dup_line_char_fraction:
        return "repetition_dup_line_chars"
    paras = [s for s in (p.strip() for p in _PARAGRAPH.split(text)) if s and long_enough(s)]
    para_frac, para_chars = _dup_fraction(paras)
    if para_frac > cfg.max_dup_para_fraction:
        return "repetition_dup_paragraphs"
    if para_chars > cfg.max_dup_para_char_fraction:
        return "repetition_dup_paragraph_chars"

    hashes, lengths = words.hashes(text)
    if len(hashes) < 2:
        return None
    scale = cfg.cjk_chars_per_word if words.cjk else 1  # CJK words are characters: n words ~ n * scale of them
    refrains = words.cjk and zh_verse_clause_share(text) >= cfg.cjk_verse_refrains  # verse: refrains by design
    if not refrains and (reason := _top_ngram_reason(hashes, lengths, scale, cfg)):
        return reason
    return _dup_ngram_reason(hashes, lengths, scale, cfg)


def _top_ngram_reason(hashes: np.ndarray, lengths: np.ndarray, scale: int, cfg: RepetitionConfig) -> str | None:
    total = max(1, int(lengths.sum()))
    for n, limit in zip((2, 3, 4), cfg.top_ngram_max_fraction):
        grams = ngram_hashes(hashes, n * scale)
        if len(grams) < 2:
            break
        values, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = int(counts.argmax())
        if counts[top] > 1:
            start = int(first[top])
            if int(lengths[start : start + n * scale].sum()) * int(counts[top]) / total > limit:
                return f"repetition_top_{n}gram"
    return None


def _dup_ngram_reason(hashes: np.ndarray, lengths: np.ndarray, scale: int, cfg: RepetitionConfig) -> str | None:
    # Duplicate-n-gram coverage can only shrink as n grows, so when n=5 is already under the
    # smallest limit every other n passes too (the common case for clean text: one sort, not six).
    total = max(1, int(lengths.sum()))
    smallest = min(cfg.dup_ngram_max_fraction)
    for n, limit in zip(range(5, 11), cfg.dup_ngram_max_fraction):
        fraction = _dup_ngram_fraction(hashes, lengths, n * scale, total)
        if fraction > limit:
            return f"repetition_dup_{n}gram"
        if n == 5 and fraction <= smallest:
            break
    return None


def _dup_ngram_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    """Share of word characters covered by n-grams that occur more than once (each word once)."""
    grams = ngram_hashes(hashes, n)
    if len(grams) < 2:
        return 0.0
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if len(starts) == 0:
        return 0.0
    delta = np.zeros(len(hashes) + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0
    return int(lengths[covered].sum()) / total
