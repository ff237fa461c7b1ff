"""MinHash-LSH near-duplicate detection: the 90%/5% goals on generated pairs, clusters, keepers."""

from __future__ import annotations

import numpy as np

from lmforge.data import dedup
from lmforge.data.config import DedupConfig


def _pair_with_jaccard(rng: np.random.Generator, target: float, size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of random 64-bit shingle hashes whose Jaccard similarity is exactly |A∩B|/|A∪B| ~ target."""
    # |A| = |B| = size, shared = s  ->  J = s / (2*size - s)  ->  s = 2*size*J / (1 + J)
    shared = round(2 * size * target / (1 + target))
    pool = rng.integers(0, 2**63, size=2 * size, dtype=np.uint64)
    a = pool[:size]
    b = np.concatenate([a[:shared], pool[size : 2 * size - shared]])
    return a, b


def _flag_rate(target: float, pairs: int = 300, seed: int = 0) -> tuple[float, float]:
    cfg = DedupConfig()
    rng = np.random.default_rng(seed)
    a_perm, b_perm = dedup.permutations(cfg.num_perm, cfg.seed)
    flagged, measured = 0, []
    for _ in range(pairs):
        a, b = _pair_with_jaccard(rng, target)
        measured.append(dedup.jaccard(set(a.tolist()), set(b.tolist())))
        sigs = np.stack([dedup.signature(a, a_perm, b_perm), dedup.signature(b, a_perm, b_perm)])
        roots = dedup.near_duplicate_roots(sigs, cfg.bands, cfg.rows, cfg.verify_threshold)
        flagged += roots[0] == roots[1]
    return flagged / pairs, float(np.mean(measured))


def test_defaults_find_90_percent_at_jaccard_0_8_and_under_5_percent_at_0_5():
    found, j_high = _flag_rate(0.8)
    false, j_low = _flag_rate(0.5)
    assert abs(j_high - 0.8) < 0.01 and abs(j_low - 0.5) < 0.01
    assert found >= 0.90, found
    assert false < 0.05, false


def test_s_curve_in_docstring_matches_the_formula():
    cfg = DedupConfig()
    p = lambda s: 1 - (1 - s**cfg.rows) ** cfg.bands  # noqa: E731
    assert round(p(0.8), 3) == 0.947 and round(p(0.5), 3) == 0.061 and round(p(0.7), 3) == 0.613


def test_edited_text_copies_are_clustered_and_distinct_ones_are_not():
    rng = np.random.default_rng(3)
    vocab = [f"w{i}x" for i in range(5000)]
    base = [vocab[i] for i in rng.integers(0, 5000, size=800)]

    def edit(words: list[str], share: float) -> list[str]:
        out = list(words)
        for i in rng.choice(len(out), size=int(share * len(out)), replace=False):
            out[i] = vocab[int(rng.integers(0, 5000))]
        return out

    docs = [base, edit(base, 0.03), edit(base, 0.30), [vocab[i] for i in rng.integers(0, 5000, size=800)]]
    a, b = dedup.permutations(128, 1)
    sigs = np.stack([dedup.signature(dedup.shingles(d, 3), a, b) for d in docs])
    roots = dedup.near_duplicate_roots(sigs, 16, 8, 0.7)
    assert roots[0] == roots[1] and len({roots[0], roots[2], roots[3]}) == 3


def test_candidate_pairs_union_find_and_keepers():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 5, 5, 5]], dtype=np.uint32)
    pairs = dedup.candidate_pairs(sigs, bands=2, rows=2)
    assert pairs.tolist() == [[0, 1], [0, 2]]
    roots = dedup.near_duplicate_roots(sigs, 2, 2, threshold=0.5)  # 0~1 and 0~2 agree on half the rows
    assert roots.tolist() == [0, 0, 0, 3]
    lengths = np.array([10, 30, 30, 5])
    assert dedup.keepers(roots, lengths, "longest").tolist() == [False, True, False, True]
    assert dedup.keepers(roots, lengths, "first").tolist() == [True, False, False, True]


def test_exact_hash_ignores_whitespace_layout_only():
    assert dedup.exact_hash("a  b\nc") == dedup.exact_hash("a b c")
    assert dedup.exact_hash("a b c") != dedup.exact_hash("a b d")


def test_signature_is_chunk_invariant_and_stable():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2**63, size=10_000, dtype=np.uint64)
    a, b = dedup.permutations(32, 7)
    whole = dedup.signature(s, a, b)
    direct = ((s[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    assert np.array_equal(whole, direct)
    assert dedup.shingles(["a", "b", "c"], 3).tolist() == dedup.shingles(["a", "b", "c"], 3).tolist()
