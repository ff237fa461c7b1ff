"""Read raw corpora (.txt/.md, .jsonl, .parquet files or directories of them) as a stream of documents.

Every later stage (tokenizer training, tokenization, data cleaning) reads text through
`iter_documents`, so bad input is caught here once, with a one-line `UserError` naming the
file (and line/byte) and what to do. Documents are streamed: memory stays bounded by the
largest single .txt file or one parquet row group batch, never by the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
TEXT_FIELD = "text"
_BINARY_SNIFF_BYTES = 8192
_PARQUET_BATCH_ROWS = 1024
_PARQUET_BUFFER_BYTES = 1 << 20


@dataclass
class Document:
    """One document: its text, the file it came from, and a stable id (file, or file:line / file:row)."""

    text: str
    source: str
    id: str


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Yield the documents of a file or of every supported file under a directory.

    - `.txt` / `.md`: the whole file is one document (a leading UTF-8 BOM is dropped).
    - `.jsonl`: one document per non-blank line, from the string field `text`.
    - `.parquet`: one document per row of the string column `text`, read in batches.

    Directories are walked recursively in sorted order (deterministic); hidden files and
    directories (name starting with '.') and files with other suffixes are skipped. Empty
    documents are skipped; a corpus with no non-empty document is an error.
    """
    path = Path(path)
    files = corpus_files(path)
    yielded = 0
    for file in files:
        for doc in _read_file(file):
            if doc.text:
                yielded += 1
                yield doc
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
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .md, .jsonl or .parquet")
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise UserError(f"no .txt/.md/.jsonl/.parquet files under {path}; point at a corpus directory")
    # Sort by the path relative to the root so the order is the same on every machine.
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _read_file(file: Path) -> Iterator[Document]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(file)
    elif suffix == ".jsonl":
        yield from _read_jsonl(file)
    else:
        data = file.read_bytes()
        _check_not_binary(file, data[:_BINARY_SNIFF_BYTES])
        text = _decode_utf8(file, data)
        yield Document(text=text.removeprefix("\ufeff"), source=str(file), id=str(file))


def _check_not_binary(file: Path, head: bytes) -> None:
    # A NUL byte almost never occurs in real text but almost always in binaries (and UTF-16).
    offset = head.find(b"\0")
    if offset >= 0:
        raise UserError(
            f"{file} looks binary (NUL byte at offset {offset}); remove it or move it out of the corpus"
        )


def _decode_utf8(file: Path, data: bytes, base_offset: int = 0, base_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = base_line + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{file}: invalid UTF-8 at byte {base_offset + e.start} (line {line}); re-encode it as UTF-8"
        ) from None


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


def _read_jsonl(file: Path) -> Iterator[Document]:
    with open(file, "rb") as f:
        _check_not_binary(file, f.read(_BINARY_SNIFF_BYTES))
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(file, raw, base_offset=offset, base_line=lineno)
            offset += len(raw)
            if not line.strip():
                continue
            record = _json_line(file, lineno, line)
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                raise UserError(
                    f"{file}:{lineno}: missing field '{TEXT_FIELD}'; each line must be a JSON object with a string '{TEXT_FIELD}'"
                )
            text = record[TEXT_FIELD]
            if not isinstance(text, str):
                raise UserError(
                    f"{file}:{lineno}: field '{TEXT_FIELD}' is {type(text).__name__}, not a string; store the text as a string"
                )
            yield Document(text=text.removeprefix("\ufeff"), source=str(file), id=f"{file}:{lineno}")


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


def _read_parquet(file: Path) -> Iterator[Document]:
    try:
        parquet = open_parquet(file)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise UserError(f"{file}: not a readable parquet file ({_first_line(e)}); re-export it") from None
    columns = parquet.schema_arrow.names
    if TEXT_FIELD not in columns:
        raise UserError(
            f"{file}: no '{TEXT_FIELD}' column (columns: {', '.join(columns)}); rename the text column to '{TEXT_FIELD}'"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[TEXT_FIELD]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise UserError(
                    f"{file}: column '{TEXT_FIELD}' holds {type(text).__name__} values, not strings; store the text as a string column"
                )
            if text:
                yield Document(text=text, source=str(file), id=f"{file}:{row}")
            row += 1


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
