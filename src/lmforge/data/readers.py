"""The one reader stack: every stage reads corpora through this module.

Formats: `.txt` / `.md` (a whole file, or blank-line blocks), `.jsonl`, `.jsonl.gz`,
`.jsonl.zst` (one document per line, from a string field), `.parquet` and `.csv` (one
document per row, from a string column); other fields/columns become metadata.

`read_file` turns one file into a stream of `Record`s and `Unreadable`s: bad input (a binary
file, a truncated gzip/zstd stream, a malformed JSON line, a missing text field, a parquet
file with another schema, a zero-byte file, a line longer than `read.max_document_bytes`)
becomes one `Unreadable` (reason, file:line, detail, fix) and reading goes on. Two views:

- `lmforge data prepare` (data/sources.py) cuts the input into shards and *counts* the
  unreadable input (`--strict` makes the first one fatal);
- `iter_documents` (tokenizer training, `lmforge tokenize`) stops at the first bad input
  with a one-line `UserError` naming the file (and line/byte) and what to do, and also
  refuses invalid UTF-8 (prepare replaces it with U+FFFD and counts it).

Documents are streamed: memory stays bounded by the largest single .txt file or document,
or one parquet row-group batch (read page by page, see `open_parquet`), never by the corpus.
"""

from __future__ import annotations

import csv
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
from lmforge.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".csv")
SUPPORTED_SUFFIXES = SUFFIXES  # the older name
TEXT_FIELD = "text"
_SNIFF = 8192
_CHUNK = 1 << 20
_PARQUET_BATCH_ROWS = 1024
_PARQUET_BUFFER_BYTES = 1 << 20
_NO_LIMIT = 1 << 62  # iter_documents: documents of any size (the tokenizer stages never had a limit)


@dataclass
class Document:
    """One document: its text, the file it came from, and a stable id (file, or file:line / file:row)."""

    text: str
    source: str
    id: str


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
    fix: str = "fix or remove it"

    def message(self, strict_flag: bool = True) -> str:
        """One line: where, what, and what to do (`strict_flag`: mention running without --strict)."""
        sep = " " if self.detail.startswith("looks ") else ": "  # "a.txt looks binary (...)"
        return f"{self.where}{sep}{self.detail}; {self.fix}" + (", or run without --strict" if strict_flag else "")


def suffix_of(path: str | Path) -> str:
    """The supported suffix `path` ends with (case-insensitive, longest first), or ''."""
    name = str(path).lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


# ---- the tokenizer stages' view: documents, stopping at the first bad input -------------------


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Yield the documents of a file or of every supported file under a directory.

    - `.txt` / `.md`: the whole file is one document (a leading UTF-8 BOM is dropped).
    - `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one document per non-blank line, from the field `text`.
    - `.parquet`, `.csv`: one document per row of the string column `text`.

    Directories are walked recursively in sorted order (deterministic); hidden files and
    directories (name starting with '.') and files with other suffixes are skipped. Empty
    documents (and empty files) are skipped; a corpus with no non-empty document is an error.
    Bad input is a one-line `UserError` (see the module docstring).
    """
    path = Path(path)
    files = corpus_files(path)
    cfg = ReadConfig(max_document_bytes=_NO_LIMIT)
    yielded = 0
    for file in files:
        for item in read_file(str(file), cfg, utf8="strict", with_meta=False):
            if isinstance(item, Unreadable):
                if item.reason == "empty_file":
                    continue
                raise UserError(item.message(strict_flag=False))
            if item.text:
                yielded += 1
                yield Document(text=item.text, source=item.source, id=item.id)
    if yielded == 0:
        raise UserError(f"{path}: corpus is empty (all {len(files)} file(s) have no text); add text files")


def list_splits(path: str | Path) -> dict[str, Path] | None:
    """Return {"train": .., "val": .. (, "test": ..)} if `path` has train/ and val/ subdirs, else None."""
    path = Path(path)
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        return None
    splits = {"train": path / "train", "val": path / "val"}
    if (path / "test").is_dir():
        splits["test"] = path / "test"
    return splits


def corpus_files(path: str | Path) -> list[Path]:
    """The files `iter_documents` reads, in order (a single file, or the supported files under a dir)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if path.is_file():
        if not suffix_of(path.name):
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
        return [path]
    files = walk_corpus(path)
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} files under {path}; point at a corpus directory")
    return files


def walk_corpus(directory: Path) -> list[Path]:
    """The supported files under `directory`, recursively, hidden ones skipped, sorted by relative path
    (so the order is the same on every machine)."""
    found = [p for p in directory.rglob("*") if p.is_file() and suffix_of(p.name)
             and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


# ---- one file -> records and unreadable input --------------------------------------------------


def read_file(path: str, cfg: ReadConfig, *, start: int | None = None, end: int | None = None,
              first_line: int = 1, utf8: str = "replace", with_meta: bool = True) -> Iterator[Record | Unreadable]:
    """Every record and every piece of unreadable input of one file, in file order.

    `start`/`end`: a byte range of an uncompressed .jsonl file (a line belongs to the range it
    starts in; `first_line` is the number of the line at `start`). `utf8`: "replace" (U+FFFD,
    `Record.invalid_utf8` set) or "strict" (an `Unreadable` naming the byte and line).
    `with_meta`: False skips the other fields/columns (parquet then reads the text column only).
    """
    suffix = suffix_of(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError as e:
        yield Unreadable("io_error", path, f"cannot read ({e.strerror or type(e).__name__})")
        return
    if size == 0:
        yield Unreadable("empty_file", path, "empty file (zero bytes)")
        return
    nul = head.find(b"\0")
    if suffix in (".txt", ".md", ".jsonl", ".csv") and nul >= 0:
        yield Unreadable("binary", path, f"looks binary (NUL byte at offset {nul})", size,
                         "remove it or move it out of the corpus")
        return
    if suffix == ".parquet":
        yield from _read_parquet(path, cfg, with_meta)
    elif suffix == ".csv":
        yield from _read_csv(path, cfg, utf8)
    elif suffix.startswith(".jsonl"):
        yield from _read_jsonl(path, suffix, (start, end, first_line), cfg, utf8)
    elif cfg.split_on_blank_lines:
        yield from _read_blocks(path, cfg, utf8)
    elif size > cfg.max_document_bytes:
        yield _too_long(path, f"file of {size} bytes", size)
    else:
        with open(path, "rb") as f:
            yield _text_record(f.read(), path, path, utf8)


def _too_long(where: str, what: str, nbytes: int) -> Unreadable:
    return Unreadable("too_long", where, f"{what} > read.max_document_bytes", nbytes,
                      "raise read.max_document_bytes or split the document")


def _text_record(data: bytes, where: str, source: str, utf8: str, offset: int = 0,
                 line: int = 1) -> Record | Unreadable:
    """A .txt/.md document (BOM dropped) from its bytes; `offset`/`line`: where they start in the file."""
    text, bad = _decode(data, where, utf8, offset, line)
    if isinstance(text, Unreadable):
        return text
    return Record(text.removeprefix("\ufeff"), where, source, {}, bad)


def _decode(data: bytes, where: str, utf8: str, offset: int = 0, line: int = 1) -> tuple[Any, bool]:
    """(text, invalid bytes replaced?), or (Unreadable, True) under utf8="strict"; `where` is the file,
    `offset`/`line` where `data` starts in it."""
    b_newline = b"\n"
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if utf8 == "strict":
            at = f"byte {offset + e.start} (line {line + data.count(b_newline, 0, e.start)})"
            return Unreadable("invalid_utf8", where, f"invalid UTF-8 at {at}", len(data), "re-encode it as UTF-8"), True
        return data.decode("utf-8", errors="replace"), True


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---- JSONL (plain, gzip, zstd) -------------------------------------------------------------------


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

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_lines(path: str, suffix: str) -> Any:
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        return io.BufferedReader(_ZstdRaw(open(path, "rb")), buffer_size=_CHUNK)
    return open(path, "rb")


def _read_jsonl(path: str, suffix: str, span: tuple[int | None, int | None, int], cfg: ReadConfig,
                utf8: str) -> Iterator[Record | Unreadable]:
    start, end, first_line = span
    limit = cfg.max_document_bytes
    lineno = first_line - 1
    try:
        with _open_lines(path, suffix) as f:
            if start:
                f.seek(start)
            pos = start or 0
            while end is None or pos < end:
                raw = f.readline(limit + 1)
                if not raw:
                    break
                lineno += 1
                line_start, pos = pos, pos + len(raw)
                where = f"{path}:{lineno}"
                if len(raw) > limit and not raw.endswith(b"\n"):
                    skipped = len(raw) + _skip_rest_of_line(f)
                    pos += skipped - len(raw)
                    yield _too_long(where, f"line of {skipped} bytes", skipped)
                    continue
                if raw.strip():
                    yield _json_record(raw, path, lineno, cfg.text_field, utf8, line_start)
    except EOFError as e:  # the stream ended before its end-of-stream marker
        yield Unreadable("truncated", f"{path}:{lineno + 1}", f"truncated ({_first_line(e)})", fix="re-create the file")
    except (gzip.BadGzipFile, zlib.error) as e:
        yield Unreadable("corrupt", f"{path}:{lineno + 1}", f"corrupt ({_first_line(e)})", fix="re-create the file")
    except OSError as e:
        yield Unreadable("io_error", f"{path}:{lineno + 1}", f"cannot read ({_first_line(e)})")
    except Exception as e:  # zstandard.ZstdError and friends: corrupt compressed data
        yield Unreadable("corrupt", f"{path}:{lineno + 1}", f"corrupt ({_first_line(e)})", fix="re-create the file")


def _skip_rest_of_line(f: Any) -> int:
    """Read past the rest of an over-long line in bounded pieces; the bytes skipped."""
    skipped = 0
    while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
        skipped += len(rest)
    return skipped + len(rest)


def _json_record(raw: bytes, path: str, lineno: int, text_field: str, utf8: str,
                 offset: int) -> Record | Unreadable:
    """One JSONL line (starting at byte `offset` of the file) as a record."""
    where = f"{path}:{lineno}"
    line, bad = _decode(raw, path, utf8, offset, lineno)
    if isinstance(line, Unreadable):
        return line
    fix = f"each line must be a JSON object with a string '{text_field}'"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Unreadable("invalid_json", where, f"invalid JSON ({e.msg})", len(raw), "fix or remove the line")
    if not isinstance(obj, dict) or text_field not in obj:
        return Unreadable("missing_field", where, f"missing field '{text_field}'", len(raw), fix)
    text = obj.pop(text_field)
    if not isinstance(text, str):
        return Unreadable("missing_field", where, f"field '{text_field}' is {type(text).__name__}, not a string",
                          len(raw), fix)
    return Record(text.removeprefix("\ufeff"), where, path, obj, bad)


def _json_line(path: str | Path, lineno: int, line: str) -> Any:
    """One JSONL line parsed, or a one-line UserError naming file:line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a small JSONL file (task files, pairs,
    texts to embed): invalid UTF-8, invalid JSON or a line that is not an object is a one-line
    `UserError` naming file:line. Field checks are the caller's."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: invalid UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            record = _json_line(path, lineno, line)
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object, got {type(record).__name__}")
            yield lineno, record


# ---- text blocks, CSV, parquet -------------------------------------------------------------------


def _read_blocks(path: str, cfg: ReadConfig, utf8: str) -> Iterator[Record | Unreadable]:
    """Blank-line separated blocks of a text file (joined up to `merge_blocks_chars`), each with
    the line number it starts on."""
    block: list[bytes] = []
    start = offset = block_offset = size = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                if not block:
                    start, block_offset = lineno, offset
                block.append(raw)
                size += len(raw)
            elif block and size >= cfg.merge_blocks_chars:
                yield _block(path, (start, block_offset), block, size, cfg, utf8)
                block, size = [], 0
            elif block:
                block.append(raw)  # keep the blank line inside a merged document
                size += len(raw)
            offset += len(raw)
        if block:
            yield _block(path, (start, block_offset), block, size, cfg, utf8)


def _block(path: str, at: tuple[int, int], block: list[bytes], size: int, cfg: ReadConfig,
           utf8: str) -> Record | Unreadable:
    where = f"{path}:{at[0]}"
    if size > cfg.max_document_bytes:
        return _too_long(where, f"block of {size} bytes", size)
    record = _text_record(b"".join(block), where, path, utf8, at[1], at[0])
    if isinstance(record, Record):
        record.text = record.text.rstrip("\r\n")
    return record


def _read_csv(path: str, cfg: ReadConfig, utf8: str) -> Iterator[Record | Unreadable]:
    csv.field_size_limit(min(max(cfg.max_document_bytes, 131072), 2**31 - 1))
    errors = "strict" if utf8 == "strict" else "replace"
    row = 0
    try:
        with open(path, encoding="utf-8", errors=errors, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or cfg.text_field not in reader.fieldnames:
                columns = ", ".join(reader.fieldnames or [])
                yield Unreadable("bad_schema", path, f"no '{cfg.text_field}' column (columns: {columns})",
                                 fix=f"name the text column '{cfg.text_field}'")
                return
            for row, rec in enumerate(reader, start=1):
                text = rec.pop(cfg.text_field) or ""
                meta = {k: v for k, v in rec.items() if k is not None}
                yield Record(text.removeprefix("\ufeff"), f"{path}:{row}", path, meta, "\ufffd" in text)
    except csv.Error as e:
        yield Unreadable("invalid_csv", f"{path}:{row + 1}", f"invalid CSV ({e})")
    except UnicodeDecodeError:  # only with utf8="strict"
        yield Unreadable("invalid_utf8", path, f"invalid UTF-8 at {_first_invalid_utf8(path)}",
                         fix="re-encode it as UTF-8")


def _first_invalid_utf8(path: str) -> str:
    """'byte B (line L)' of the first invalid UTF-8 in a file (lines never split a UTF-8 sequence)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"byte {offset + e.start} (line {lineno})"
            offset += len(raw)
    return "the end of the file"


def open_parquet(path: str | Path) -> Any:
    """A `pyarrow.parquet.ParquetFile` whose `iter_batches` streams in bounded memory.

    pyarrow's default (`pre_buffer=True`) fetches every requested row group up front, so
    `iter_batches` over a whole file held ~1 MB per MB of file (measured with pyarrow 26: 280 MB
    of Arrow memory for a 276 MB file); without pre-buffering it still reads a whole column chunk
    at a time (a one-row-group file: the whole file). With a read buffer it reads page by page:
    ~20 MB for the same file, one row group or many. The batches are the same either way.
    """
    import pyarrow.parquet as pq  # imported lazily: pyarrow is slow to import and only parquet needs it

    return pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER_BYTES)


def _read_parquet(path: str, cfg: ReadConfig, with_meta: bool) -> Iterator[Record | Unreadable]:
    import pyarrow as pa

    try:
        parquet = open_parquet(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        yield Unreadable("unreadable_parquet", path, f"not a readable parquet file ({_first_line(e)})",
                         fix="re-export it")
        return
    schema, name = parquet.schema_arrow, cfg.text_field
    if name not in schema.names:
        yield Unreadable("bad_schema", path, f"no '{name}' column (columns: {', '.join(schema.names)})",
                         fix=f"rename the text column to '{name}'")
        return
    if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
        yield Unreadable("bad_schema", path, f"column '{name}' holds {schema.field(name).type} values, not strings",
                         fix="store the text as a string column")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=None if with_meta else [name]):
            for rec in batch.to_pylist():
                text = rec.pop(name)
                rec.pop("id", None)
                yield Record(text or "", f"{path}:{row}", path, rec)
                row += 1
    except Exception as e:
        yield Unreadable("unreadable_parquet", f"{path}:{row}", f"not a readable parquet file ({_first_line(e)})",
                         fix="re-export it")
