"""The one content-hash splitter (`lmforge.data.split`), shared by data prepare, tokenize and pairs."""

from __future__ import annotations

import hashlib

import pytest

from lmforge.data.split import assign_split, hash_position


def _reference(key, seed: str) -> float:
    # the formula `data prepare` has always split by: blake2b-64 of "seed:key", little-endian
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") / 2**64


@pytest.mark.parametrize("key", [0, 1, 2**63 + 5, "some text", "中文文本", ""])
def test_position_is_blake2b_of_seed_and_key(key):
    assert hash_position(key, "lmforge") == _reference(key, "lmforge")
    assert hash_position(key) == _reference(key, "lmforge")  # the default seed is prepare's
    assert hash_position(key, "other") == _reference(key, "other") != hash_position(key)


def test_split_index_follows_the_cumulative_fractions():
    fractions = (0.6, 0.25, 0.15)
    counts = [0, 0, 0]
    for i in range(30000):
        index, position = assign_split(f"doc {i}", fractions)
        assert position == _reference(f"doc {i}", "lmforge")
        expected = 0 if position < 0.6 else 1 if position < 0.6 + 0.25 else 2
        assert index == expected
        counts[index] += 1
    for got, want in zip(counts, fractions):  # uniform: within 5 standard deviations
        assert abs(got / 30000 - want) < 5 * (want * (1 - want) / 30000) ** 0.5


def test_zero_fractions_get_nothing_and_two_way_splits_work():
    for i in range(2000):
        assert assign_split(i, (1.0, 0.0, 0.0))[0] == 0
        assert assign_split(i, (0.0, 1.0))[0] == 1
        index, position = assign_split(str(i), (0.1, 0.9))
        assert index == (0 if position < 0.1 else 1)
