"""Readers for `lmforge data prepare`: every input file becomes a stream of records, bad input included.

Unlike `readers.iter_documents` (the tokenizer path, which stops at the first bad byte), this
reader *accounts* for bad input: a binary file, a truncated gzip/zstd stream, a malformed JSON
line, a missing text field, a parquet file with another schema, a zero-byte file, an
unreadable path or a line longer than `read.max_document_bytes` each become one `Unreadable`
record (reason, file:line, detail) and reading goes on. `strict=True` turns the first one
into a one-line `UserError`.

Inputs are cut into shards (`plan_shards`): big uncompressed .jsonl files into byte ranges
(a line belongs to the range it starts in), small files grouped per directory. Shards are
the unit of parallelism and of resume; memory per shard is bounded by its size.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.config import ReadConfig
from lmforge.data.readers import open_parquet
from lmforge.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".csv")
_SNIFF = 8192
_CHUNK = 1 << 20


@dataclass
class Record:
    """One input document (text decoded, not yet normalized) with its stable id and metadata."""

    text: str
    id: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    invalid_utf8: bool = False  # bytes were replaced by U+FFFD while decoding


@dataclass
class Unreadable:
    """Input that could not be read as a document; counted as one input document."""

    reason: str
    where: str  # file or file:line
    detail: str
    nbytes: int = 0

    def message(self) -> str:
        return f"{self.where}: {self.reason.replace('_', ' ')} ({self.detail}); fix or remove it, or run without --strict"


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


def _suffix(path: str) -> str:
    name = path.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


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
                found = [q for q in p.rglob("*") if q.is_file() and _suffix(q.name)
                         and not any(part.startswith(".") for part in q.relative_to(p).parts)]
                files += [str(q) for q in sorted(found, key=lambda q: q.relative_to(p).as_posix())]
            elif p.exists() or p.is_symlink():
                if not _suffix(p.name):
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
        if _suffix(f) == ".jsonl" and size > cfg.shard_bytes * 3 // 2:
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
        for item in _read_one(path, shard, cfg):
            if strict and isinstance(item, Unreadable):
                raise UserError(item.message())
            yield item


def _read_one(path: str, shard: Shard, cfg: ReadConfig) -> Iterator[Record | Unreadable]:
    suffix = _suffix(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError as e:
        yield Unreadable("io_error", path, e.strerror or type(e).__name__)
        return
    if size == 0:
        yield Unreadable("empty_file", path, "zero bytes")
        return
    plain = suffix in (".txt", ".md", ".jsonl", ".csv")
    nul = head.find(b"\0")
    if plain and nul >= 0:
        yield Unreadable("binary", path, f"NUL byte at offset {nul}", size)
        return
    if suffix == ".parquet":
        yield from _read_parquet(path, cfg)
    elif suffix == ".csv":
        yield from _read_csv(path, cfg)
    elif suffix.startswith(".jsonl"):
        yield from _read_jsonl(path, suffix, shard, cfg)
    elif cfg.split_on_blank_lines:
        yield from _read_blocks(path, cfg)
    elif size > cfg.max_document_bytes:
        yield Unreadable("too_long", path, f"{size} bytes > read.max_document_bytes", size)
    else:
        with open(path, "rb") as f:
            data = f.read()
        text, bad = _decode(data)
        yield Record(text.removeprefix("\ufeff"), path, path, {}, bad)


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


class _ZstdRaw(io.RawIOBase):
    """A zstd stream that notices truncation (zstandard's stream_reader ends silently)."""

    def __init__(self, f: Any) -> None:
        import zstandard

        self.f, self.d = f, zstandard.ZstdDecompressor().decompressobj()
        self.buf = b""
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf and not self.done:
            chunk = self.f.read(_CHUNK)
            if not chunk:
                self.done = True
                if not self.d.eof:
                    raise EOFError("zstd stream ended before the end-of-frame marker")
                break
            self.buf = self.d.decompress(chunk)
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _open_lines(path: str, suffix: str) -> Any:
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        return io.BufferedReader(_ZstdRaw(open(path, "rb")), buffer_size=_CHUNK)
    return open(path, "rb")


def _read_jsonl(path: str, suffix: str, shard: Shard, cfg: ReadConfig) -> Iterator[Record | Unreadable]:
    limit = cfg.max_document_bytes
    lineno = shard.first_line - 1
    try:
        with _open_lines(path, suffix) as f:
            if shard.start:
                f.seek(shard.start)
            pos = shard.start or 0
            while shard.end is None or pos < shard.end:
                raw = f.readline(limit + 1)
                if not raw:
                    break
                lineno += 1
                pos += len(raw)
                where = f"{path}:{lineno}"
                if len(raw) > limit and not raw.endswith(b"\n"):
                    skipped = len(raw)
                    while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                        skipped += len(rest)
                    skipped += len(rest)
                    pos += skipped - len(raw)
                    yield Unreadable("too_long", where, f"line of {skipped} bytes > read.max_document_bytes", skipped)
                    continue
                if not raw.strip():
                    continue
                yield _json_record(raw, where, cfg.text_field)
    except EOFError as e:  # the stream ended before its end-of-stream marker
        yield Unreadable("truncated", f"{path}:{lineno + 1}", _first_line(e))
    except (gzip.BadGzipFile, zlib.error) as e:
        yield Unreadable("corrupt", f"{path}:{lineno + 1}", _first_line(e))
    except OSError as e:
        yield Unreadable("io_error", f"{path}:{lineno + 1}", _first_line(e))
    except Exception as e:  # zstandard.ZstdError and friends: corrupt compressed data
        yield Unreadable("corrupt", f"{path}:{lineno + 1}", _first_line(e))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _json_record(raw: bytes, where: str, text_field: str) -> Record | Unreadable:
    line, bad = _decode(raw)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Unreadable("invalid_json", where, e.msg, len(raw))
    if not isinstance(obj, dict) or text_field not in obj:
        return Unreadable("missing_field", where, f"no string field '{text_field}'", len(raw))
    text = obj.pop(text_field)
    if not isinstance(text, str):
        return Unreadable("missing_field", where, f"field '{text_field}' is {type(text).__name__}", len(raw))
    return Record(text, where, where.rsplit(":", 1)[0], obj, bad)


def _read_blocks(path: str, cfg: ReadConfig) -> Iterator[Record | Unreadable]:
    """Blank-line separated blocks of a text file (joined up to `merge_blocks_chars`), each with
    the line number it starts on."""
    block: list[bytes] = []
    start = 0
    size = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                if not block:
                    start = lineno
                block.append(raw)
                size += len(raw)
                continue
            if block and size >= cfg.merge_blocks_chars:
                yield _block(path, start, block, size, cfg)
                block, size = [], 0
            elif block:
                block.append(raw)  # keep the blank line inside a merged document
                size += len(raw)
        if block:
            yield _block(path, start, block, size, cfg)


def _block(path: str, start: int, block: list[bytes], size: int, cfg: ReadConfig) -> Record | Unreadable:
    where = f"{path}:{start}"
    if size > cfg.max_document_bytes:
        return Unreadable("too_long", where, f"block of {size} bytes > read.max_document_bytes", size)
    text, bad = _decode(b"".join(block))
    return Record(text.removeprefix("\ufeff").rstrip("\r\n"), where, path, {}, bad)


def _read_csv(path: str, cfg: ReadConfig) -> Iterator[Record | Unreadable]:
    csv.field_size_limit(max(cfg.max_document_bytes, 131072))
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or cfg.text_field not in reader.fieldnames:
            yield Unreadable("bad_schema", path, f"no '{cfg.text_field}' column (columns: {reader.fieldnames})")
            return
        row = 0
        try:
            for row, rec in enumerate(reader, start=1):
                text = rec.pop(cfg.text_field) or ""
                where = f"{path}:{row}"
                yield Record(text, where, path, {k: v for k, v in rec.items() if k is not None}, "\ufffd" in text)
        except csv.Error as e:
            yield Unreadable("invalid_csv", f"{path}:{row + 1}", str(e))


def _read_parquet(path: str, cfg: ReadConfig) -> Iterator[Record | Unreadable]:
    import pyarrow as pa

    try:
        parquet = open_parquet(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        yield Unreadable("unreadable_parquet", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    schema = parquet.schema_arrow
    if cfg.text_field not in schema.names or not (
        pa.types.is_string(schema.field(cfg.text_field).type) or pa.types.is_large_string(schema.field(cfg.text_field).type)
    ):
        yield Unreadable("bad_schema", path, f"no string column '{cfg.text_field}' (columns: {', '.join(schema.names)})")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                text = rec.pop(cfg.text_field)
                rec.pop("id", None)
                yield Record(text or "", f"{path}:{row}", path, rec)
                row += 1
    except Exception as e:
        yield Unreadable("unreadable_parquet", f"{path}:{row}", str(e).splitlines()[0] if str(e) else type(e).__name__)
