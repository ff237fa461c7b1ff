"""The one content-hash splitter: where a key falls in [0, 1), and the split that puts it in.

Every stage that splits by content uses it, so a split depends only on content (never on file
order, worker count or machine): `lmforge data prepare` (key: the smallest exact hash of a
document's split group - its near-duplicate cluster joined with the documents whose
spelling-normalized words overlap its own, `lmforge.data.group` - so no group straddles
splits), `lmforge tokenize` on a corpus without train/ and val/ directories (key: the
document's text) and seq2seq pairs (key: the source text).

    assign_split("some text", (0.9, 0.05, 0.05))   # -> (0, 0.31...): train, at 0.31
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_SEED = "lmforge"  # `data prepare`'s split.seed default


def hash_position(key: str | int, seed: str = DEFAULT_SEED) -> float:
    """Where `key` falls in [0, 1): the first 8 bytes (little-endian) of blake2b(f"{seed}:{key}") / 2**64."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_split(key: str | int, fractions: Sequence[float], seed: str = DEFAULT_SEED) -> tuple[int, float]:
    """(index of the split `key` falls in, its position): split i takes the positions from
    fractions[0] + ... + fractions[i-1] up to that sum plus fractions[i]; the last split also
    takes whatever rounding leaves (the fractions should sum to 1)."""
    position = hash_position(key, seed)
    bound = 0.0
    for index, fraction in enumerate(fractions[:-1]):
        bound += fraction
        if position < bound:
            return index, position
    return len(fractions) - 1, position
