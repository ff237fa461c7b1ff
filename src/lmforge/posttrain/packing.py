"""Best-fit packing of encoded examples into fixed-length rows.

An example of n tokens (ids, labels) takes n - 1 positions of a row: inputs ids[:-1], targets
labels[1:]. Examples are placed longest first, each into the row whose free space fits it most
tightly (best-fit decreasing), a new row when none has room. In a row, `position_ids` restart
at 0 for each example and `doc_ids` number its examples (0, 1, ...; -1 on padding), so the
model (`GPT.forward(..., position_ids=, doc_ids=)`) blocks attention across examples: an
example's logits are the same packed or alone. An example longer than block_size + 1 tokens
is cut to its first block_size + 1 and counted in `truncated`; one left with no trained
target (every label -100, e.g. its reply cut off) is skipped and counted in `dropped`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass
class Packed:
    """Rows of packed examples: int64 arrays (rows, block_size); targets -100 = no loss."""

    input_ids: np.ndarray
    targets: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    truncated: int  # examples cut to block_size + 1 tokens
    examples: int  # examples packed
    dropped: int = 0  # examples with no trained target (after cutting), not packed

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def fill(self) -> float:
        """Share of the rows' positions that hold an example (the rest is padding)."""
        return float((self.doc_ids >= 0).mean()) if self.doc_ids.size else 0.0

    def summary(self) -> dict[str, float | int]:
        """What a run reports: rows, examples, truncated, dropped, fill, trained tokens."""
        return {"rows": self.rows, "examples": self.examples, "truncated": self.truncated,
                "dropped": self.dropped, "fill": round(self.fill, 4),
                "trained_tokens": int((self.targets != IGNORE).sum())}


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity` by best-fit decreasing (ties: input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} of length {size} exceeds the capacity {capacity}")
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return bins


def pack(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], block_size: int, pad_id: int = 0) -> Packed:
    """Pack (ids, labels) examples into rows of `block_size` positions (see the module docstring)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    kept, truncated, dropped = [], 0, 0
    for ids, labels in encoded:
        if len(ids) != len(labels):
            raise ValueError(f"ids and labels differ in length ({len(ids)} != {len(labels)})")
        if len(ids) > block_size + 1:
            ids, labels, truncated = ids[:block_size + 1], labels[:block_size + 1], truncated + 1
        if len(ids) < 2 or all(t == IGNORE for t in labels[1:]):
            dropped += 1
            continue
        kept.append((ids, labels))
    bins = best_fit([len(ids) - 1 for ids, _ in kept], block_size)
    shape = (len(bins), block_size)
    out = {"input_ids": np.full(shape, pad_id, np.int64), "targets": np.full(shape, IGNORE, np.int64),
           "position_ids": np.zeros(shape, np.int64), "doc_ids": np.full(shape, -1, np.int64)}
    for row, members in enumerate(bins):
        start = 0
        for doc, i in enumerate(sorted(members)):  # in input order within a row
            ids, labels = kept[i]
            n = len(ids) - 1
            out["input_ids"][row, start:start + n] = ids[:-1]
            out["targets"][row, start:start + n] = labels[1:]
            out["position_ids"][row, start:start + n] = np.arange(n)
            out["doc_ids"][row, start:start + n] = doc
            start += n
    return Packed(**out, truncated=truncated, examples=len(kept), dropped=dropped)
