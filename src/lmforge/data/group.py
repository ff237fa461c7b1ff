"""Split groups: documents whose spelling-normalized word shingles overlap strongly share one split.

Exact and near-duplicate removal (`lmforge.data.dedup`) keeps one copy of a text; it does not
keep *related* texts apart. A corpus can hold the same passage twice in forms that are too
different to be duplicates but close enough to leak: the Shakespeare corpus has a modern and
a First Folio edition of most plays ("haue"/"have", "vpon"/"upon", other line breaks, so the
passages of the two editions begin and end in different places). Split independently, the
Folio twin of a held-out passage sits in the training split 9 times in 10. With `split.group`
(on by default), `lmforge data prepare` joins such documents into one group, and the split of
every document is decided by its group (its smallest exact hash), so no group straddles splits.

How, reusing dedup's machinery with other tokens and a lower threshold:

- tokens: `normalized_words` (word skeletons that map the two spellings together, the same
  normalization `lmforge data make-tasks` checks held-out text with); CJK text: characters;
- shingles: `split.group_shingle_words` (4) consecutive tokens, hashed as dedup hashes words;
- a MinHash signature (`split.group_num_perm` = 128 permutations), LSH with
  `split.group_bands` x `split.group_rows` (64 x 2), candidates verified when at least
  `split.group_threshold` (0.1) of their signature values agree, then union-find
  (`dedup.roots_from_pairs`, starting from the near-duplicate clusters).

Why these values (measured on the demo corpus, docs/DATA.md "Split groups"): the passages of
the two editions begin and end in different places, so twins have a Jaccard similarity of
their skeleton 5-gram sets of 0.1-0.7 (median 0.36), unrelated passages below 0.02. Joining
at 0.1 keeps groups small (the largest: 20 of 4,331 documents; none joins two plays except
The Passionate Pilgrim with the poems of Love's Labour's Lost it reprints) while make-tasks
keeps 91% of the held-out speeches instead of 15%; 0.15 / 0.2 keep 83% / 78%. LSH with rows
of 2 makes a pair at s = 0.1 / 0.2 / 0.3 a candidate with probability 0.47 / 0.93 / 0.997
(groups are transitive, so a missed pair is often joined through another member); 4-word
shingles (s of twins a little higher than with 5) find more of them at the same cost (91% of
the speeches kept vs 88% with 5 words, as with 256 permutations). At least 13 of 128 values
must agree: an unrelated pair (s = 0.02) passes with probability 2e-6, one at s = 0.05 with 1%.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np

from lmforge.data import dedup
from lmforge.data.filters import Words, byte_word_hashes

_FOLD = str.maketrans("jvy", "iui")
_LETTERS = re.compile(r"[^\W\d_]+")
_DOUBLED = re.compile(r"(.)\1+")
_INNER_VOWEL = re.compile(r"(?<=[^\W\d_])[aeiou]")
# ASCII text, byte by byte: is it a letter; the letter lower-cased and folded (j->i, v->u, y->i); a vowel
_ASCII_LETTER = np.zeros(256, dtype=bool)
_ASCII_LETTER[ord("a") : ord("z") + 1] = _ASCII_LETTER[ord("A") : ord("Z") + 1] = True
_ASCII_FOLDED = np.frombuffer(bytes(range(256)).decode("latin-1").lower().translate(_FOLD).encode("latin-1"),
                              dtype=np.uint8)
_ASCII_VOWEL = np.zeros(256, dtype=bool)
_ASCII_VOWEL[list(b"aeiou")] = True


def skeleton_text(text: str) -> str:
    """The words of `normalized_words(text)`, separated by spaces (several between some words)."""
    if text.isascii():  # the same result as the regexes below, with numpy over the bytes (~10x faster)
        data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        letter = _ASCII_LETTER[data]
        folded = _ASCII_FOLDED[data]
        after_letter = np.concatenate(([False], letter[:-1]))
        same_as_before = np.concatenate(([False], folded[1:] == folded[:-1]))
        # inside a word, a letter equal to the one before (doubled) or a vowel goes
        drop = letter & after_letter & (same_as_before | _ASCII_VOWEL[folded])
        return np.where(letter, folded, np.uint8(32))[~drop].tobytes().decode("ascii")
    words = _LETTERS.findall(text.lower().translate(_FOLD))
    # the words are joined by single spaces, so a doubled character is always inside one word
    return _INNER_VOWEL.sub("", _DOUBLED.sub(r"\1", " ".join(words)))


def normalized_words(text: str) -> list[str]:
    """Word skeletons that map the First Folio and modern spellings together.

    Words are runs of letters; lower case; j->i, v->u, y->i; doubled letters single; then the
    first letter and the consonants only ("battailes"/"battles" -> "btls", "vpon"/"upon" ->
    "upn", "haue"/"have" -> "h"). Unrelated text rarely shares a 5-gram of skeletons (about 1%
    for the poems, which have no other edition), while the two editions of a passage share most
    of them. Letters outside a-z are kept as they are (the rules are for Latin spellings).
    """
    return skeleton_text(text).split()


def group_shingles(text: str, words: Words, k: int) -> np.ndarray:
    """Distinct uint64 hashes of the document's k-token shingles of skeletons (CJK: characters).

    A document without letters gets one shingle of its own (its exact hash), so that documents
    without letters are not all grouped together by their (equal) empty signatures.
    """
    hashes = words.hashes(text)[0] if words.cjk else byte_word_hashes(skeleton_text(text))[0]
    shingles = dedup.shingles_from_hashes(hashes, k)
    return shingles if len(shingles) else np.array([dedup.exact_hash(text)], dtype=np.uint64)


def candidate_pairs_in_passes(chunks: Callable[[], Iterator[tuple[int, np.ndarray]]], n: int, bands: int,
                              rows: int, bands_per_pass: int = 16) -> np.ndarray:
    """LSH candidate pairs (i < j, each once) of `n` signatures read by `chunks()` (an iterator of
    (first row, signatures)), `bands_per_pass` bands at a time: memory holds 8 bytes per document
    and band of one pass (like dedup's 16 bands), not of all bands; the signatures are read once a pass."""
    found = []
    for first in range(0, bands, bands_per_pass):
        count = min(bands_per_pass, bands - first)
        keys = np.empty((n, count), dtype=np.uint64)
        for start, chunk in chunks():
            cols = chunk[:, first * rows : (first + count) * rows]
            keys[start : start + len(chunk)] = dedup.band_keys(cols, count, rows)
        found.append(dedup.candidate_pairs_from_keys(keys))
        del keys
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def smallest_key_per_cluster(roots: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """For every row, the smallest of `hashes` over the rows with the same root (its cluster's split key)."""
    if len(roots) == 0:
        return hashes.copy()
    order = np.lexsort((hashes, roots))  # by cluster, then hash: each cluster's smallest first
    new_cluster = np.concatenate([[True], roots[order][1:] != roots[order][:-1]])
    out = np.empty_like(hashes)
    out[order] = hashes[order][new_cluster][np.cumsum(new_cluster) - 1]
    return out


def group_stats(keys: np.ndarray) -> dict[str, int]:
    """How the kept documents (their split keys) are grouped: documents that share their key with
    another kept document, the number of such groups and the largest one's size."""
    _, counts = np.unique(keys, return_counts=True)
    multi = counts[counts > 1]
    return {"grouped_documents": int(multi.sum()), "groups": int(len(multi)),
            "largest_group": int(multi.max()) if len(multi) else 0}
