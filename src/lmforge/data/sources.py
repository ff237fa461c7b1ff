"""Inputs of `lmforge data prepare`: which files, cut into shards; records come from `data.readers`.

The file formats, and how bad input becomes `Unreadable` records, live in `lmforge.data.readers`
(the one reader stack every stage uses). Here: `resolve_inputs` expands files, directories and
globs; `plan_shards` cuts the input into shards: big uncompressed .jsonl files into byte ranges
(a line belongs to the range it starts in), small files grouped per directory. Shards are the
unit of parallelism and of resume; memory per shard is bounded by its size. `read_shard` reads
one (`strict=True` turns the first unreadable input into a one-line `UserError`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.config import ReadConfig
from lmforge.data.readers import SUFFIXES, Record, Unreadable, read_file, suffix_of, walk_corpus
from lmforge.errors import UserError

__all__ = ["SUFFIXES", "Record", "Shard", "Unreadable", "plan_shards", "read_shard", "resolve_inputs"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Shard:
    """A unit of work: whole files (`start` None) or one byte range [start, end) of one file."""

    index: int
    files: tuple[str, ...]
    start: int | None = None
    end: int | None = None
    first_line: int = 1
    nbytes: int = 0

    def key(self) -> str:
        parts = []
        for f in self.files:
            try:
                st = os.stat(f)
                parts.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{f}|missing")
        return ";".join(parts) + f"|{self.start}|{self.end}"


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Files named by `inputs` (files, directories walked recursively, or globs), sorted and unique."""
    files: list[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise UserError(f"--input {item}: no file matches; check the path or glob")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                files += [str(q) for q in walk_corpus(p)]
            elif p.exists() or p.is_symlink():
                if not suffix_of(p.name):
                    raise UserError(f"--input {m}: unsupported file type; use {', '.join(SUFFIXES)}")
                files.append(str(p))
            else:
                raise UserError(f"--input {m} does not exist; check the path")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise UserError(f"--input {' '.join(inputs)}: no {', '.join(SUFFIXES)} files found")
    return unique


def plan_shards(files: list[str], cfg: ReadConfig) -> list[Shard]:
    """Cut the input into shards: depends only on the files and `read.shard_bytes`, never on workers."""
    shards: list[Shard] = []
    group: list[str] = []
    group_bytes = 0
    group_dir = None

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            shards.append(Shard(len(shards), tuple(group), nbytes=group_bytes))
        group, group_bytes = [], 0

    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            size = 0
        if suffix_of(f) == ".jsonl" and size > cfg.shard_bytes * 3 // 2:
            flush()
            for start, end, line in _byte_ranges(f, size, cfg.shard_bytes):
                shards.append(Shard(len(shards), (f,), start, end, line, end - start))
            continue
        parent = os.path.dirname(f)
        if group and (parent != group_dir or group_bytes + size > cfg.shard_bytes):
            flush()
        group_dir = parent
        group.append(f)
        group_bytes += size
    flush()
    return shards


def _byte_ranges(path: str, size: int, shard_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of ranges that begin right after a newline."""
    ranges = []
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            target = start + shard_bytes
            if target >= size:
                ranges.append((start, size, line))
                break
            f.seek(target - 1)  # a line starting exactly at `target` stays in the next range
            while (piece := f.readline(_CHUNK)) and not piece.endswith(b"\n"):
                pass  # bounded reads: a 100 MB line does not land in memory here
            end = min(f.tell(), size)
            ranges.append((start, end, line))
            line += _count_newlines(f, start, end)
            start = end
    return ranges


def _count_newlines(f: Any, start: int, end: int) -> int:
    f.seek(start)
    n, left = 0, end - start
    while left > 0:
        block = f.read(min(_CHUNK * 8, left))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    f.seek(end)
    return n


def read_shard(shard: Shard, cfg: ReadConfig, strict: bool = False) -> Iterator[Record | Unreadable]:
    """Every record and every piece of unreadable input of `shard`, in file order."""
    for path in shard.files:
        for item in read_file(path, cfg, start=shard.start, end=shard.end, first_line=shard.first_line):
            if strict and isinstance(item, Unreadable):
                raise UserError(item.message())
            yield item
