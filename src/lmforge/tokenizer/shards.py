"""Encode a corpus into token shards (train/val[/test]) that the trainer memory-maps.

Layout of a token directory (the trainer reads exactly this):

    meta.json        {"dtype", "vocab_size", "bos_id", "eos_id", "pad_id", "tokenizer_sha256",
                      "splits": {"train": {"tokens", "documents", "bytes", "shards": ["train/00000.bin", ...]},
                                 "val": {...}}}
    tokenizer.json   a copy of the tokenizer used
    train/00000.bin  raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val/00000.bin
    summary.json

Each split is one stream of documents, each followed by `eos_id`; the stream is cut into
shards of `shard_tokens` tokens, so a document may continue in the next shard.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.data.readers import Document, corpus_files, iter_documents, list_splits, suffix_of
from lmforge.data.split import assign_split, hash_position
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json, file_sha256, write_summary
from lmforge.tokenizer.tok import PAD, TOKENIZER_FILE, Tokenizer

META_FILE = "meta.json"
_BATCH_DOCS = 256
_BATCH_BYTES = 4 << 20


def tokenize_corpus(
    tokenizer: str | Path,
    input: str | Path,
    out: str | Path,
    val_fraction: float = 0.1,
    workers: int | None = None,
    shard_tokens: int = 2**26,
) -> dict[str, Any]:
    """Encode every document under `input` into `out` (layout above) and return the summary.

    Splits: an `input` with train/ and val/ (and optional test/) subdirs keeps them.
    Otherwise a document goes to val when its content hash falls below `val_fraction`
    (`lmforge.data.split.assign_split(text, (val_fraction, 1 - val_fraction))`), which depends
    only on its text (not on file order). If that leaves val (or train) empty
    on a tiny corpus, the document with the smallest (largest) hash is moved over; a corpus
    of a single document is split by tokens instead (last `val_fraction` of it to val).

    `workers`: None encodes with the multi-threaded Rust batch encoder (all cores); N
    encodes in N processes (1 = in this process, serially). The output is identical.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1 (or None for all cores), got {workers}")
    tokenizer_file = _tokenizer_file(tokenizer)
    tok = Tokenizer.load(tokenizer_file)
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")
    presplit = list_splits(input)
    if presplit is not None:
        # the test split is held out for evaluation: training data never includes it, so it is
        # not encoded into the shards that training reads
        presplit = {name: path for name, path in presplit.items() if name in ("train", "val")}

    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        job = _Job(tmp, tok, tokenizer_file, input, presplit, val_fraction, workers, shard_tokens, dtype)
        job.run()
        if presplit is None and val_fraction > 0:
            fix = job.fix_for_empty_split()
            if fix is not None:  # tiny corpus: redo the (cheap) pass with one document moved
                job.notes.append(fix[1])
                job.run(**fix[0])
        return _finish(tmp, job, tokenizer_file, time.perf_counter() - start,
                       config={"val_fraction": val_fraction, "workers": workers, "shard_tokens": shard_tokens,
                               "split_by": "directories" if presplit else "hash"})


def _finish(tmp: Path, job: _Job, tokenizer_file: Path, seconds: float, config: dict[str, Any]) -> dict[str, Any]:
    """meta.json, the tokenizer copy and summary.json of a finished job; returns the summary."""
    tok = job.tok
    splits = {name: writer.info() for name, writer in job.writers.items()}
    atomic_write_json(tmp / META_FILE, {
        "dtype": job.dtype.name, "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.special_id_or_none(PAD),
        "tokenizer_sha256": file_sha256(tokenizer_file), "splits": splits,
    })
    shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    total_tokens = sum(s["tokens"] for s in splits.values())
    total_bytes = sum(s["bytes"] for s in splits.values())
    metrics = {
        **{f"{name}_tokens": s["tokens"] for name, s in splits.items()},
        **{f"{name}_documents": s["documents"] for name, s in splits.items()},
        "bytes_per_token": round(total_bytes / max(total_tokens, 1), 4),
        "tokens_per_s": round(total_tokens / max(job.encode_seconds, 1e-9)),
    }
    return write_summary(tmp, "tokenize", config=config, inputs={"tokenizer": tokenizer_file, "input": job.input},
                         metrics=metrics, wall_time_s=seconds, extra={"notes": job.notes} if job.notes else None)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Parse and check `directory/meta.json` of a token directory."""
    file = Path(directory) / META_FILE
    if not file.is_file():
        raise UserError(f"{directory} is not a token directory (no meta.json); create it with `lmforge tokenize`")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        np.dtype(meta["dtype"])
        for name, split in meta["splits"].items():
            if not isinstance(split["tokens"], int) or not isinstance(split["shards"], list):
                raise ValueError(f"split '{name}' needs an int 'tokens' and a list 'shards'")
    except Exception as e:
        raise UserError(f"{file} is corrupt ({type(e).__name__}: {e}); re-create it with `lmforge tokenize`") from None
    return meta


def load_split(directory: str | Path, split: str) -> list[np.ndarray]:
    """Read-only memmaps of the shards of `split`, checked against meta.json's token count."""
    directory = Path(directory)
    meta = read_meta(directory)
    if split not in meta["splits"]:
        raise UserError(
            f"{directory} has no '{split}' split (has: {', '.join(meta['splits'])}); pick one of those"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    files = [directory / shard for shard in meta["splits"][split]["shards"]]
    sizes = []
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is missing; re-create {directory} with `lmforge tokenize`")
        size = file.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise UserError(
                f"{file} is truncated ({size} bytes, not a positive multiple of {dtype.itemsize}); "
                f"re-create {directory} with `lmforge tokenize`"
            )
        sizes.append(size // dtype.itemsize)
    if sum(sizes) != meta["splits"][split]["tokens"]:
        # Every shard but the last is full, so the culprit is a short middle shard or the last one.
        full = max(sizes)
        bad = next((f for f, n in zip(files[:-1], sizes[:-1]) if n < full), files[-1])
        raise UserError(
            f"{bad} is truncated (the '{split}' shards hold {sum(sizes)} tokens, "
            f"meta.json says {meta['splits'][split]['tokens']}); re-create {directory} with `lmforge tokenize`"
        )
    return [np.memmap(file, dtype=dtype, mode="r") for file in files]


def doc_hash(text: str) -> float:
    """Where a document falls in [0, 1): `lmforge.data.split.hash_position` of its text."""
    return hash_position(text)


class _ShardWriter:
    """Appends tokens to split/00000.bin, 00001.bin, ..., starting a new file every shard_tokens."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self._file = None
        self._in_shard = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def write(self, ids: list[int], n_bytes: int, documents: int = 1) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        while len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            n = min(len(tokens), self.shard_tokens - self._in_shard)
            self._file.write(tokens[:n].tobytes())
            self._in_shard += n
            tokens = tokens[n:]
        self.tokens += len(ids)
        self.documents += documents
        self.bytes += n_bytes

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.root / name, "wb")
        self._in_shard = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def info(self) -> dict[str, Any]:
        self.close()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


class _Job:
    """One tokenization run: streams documents, encodes them in batches, routes them to splits."""

    def __init__(self, tmp, tok, tokenizer_file, input, presplit, val_fraction, workers, shard_tokens, dtype):
        self.tmp, self.tok, self.tokenizer_file, self.input = tmp, tok, tokenizer_file, input
        self.presplit, self.val_fraction, self.workers = presplit, val_fraction, workers
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.notes: list[str] = []
        self.encode_seconds = 0.0

    def run(self, move: dict[int, str] | None = None, split_single: bool = False) -> None:
        """Encode everything into fresh writers; `move` forces document index -> split."""
        for name in ("train", "val", "test"):
            shutil.rmtree(self.tmp / name, ignore_errors=True)
        names = list(self.presplit) if self.presplit else ["train", "val"]
        self.writers = {name: _ShardWriter(self.tmp, name, self.dtype, self.shard_tokens) for name in names}
        self.min_hash_train: tuple[float, int] | None = None  # (hash, document index)
        self.max_hash_val: tuple[float, int] | None = None
        self.n_documents = 0
        move = move or {}
        eos = self.tok.eos_id
        start = time.perf_counter()
        with tqdm(total=self._total_bytes(), unit="B", unit_scale=True, desc="tokenize") as bar:
            for batch, encoded in self._encode(self._batches()):
                for (fixed_split, doc), ids in zip(batch, encoded):
                    index = self.n_documents
                    self.n_documents += 1
                    data = doc.text.encode("utf-8")
                    if split_single:
                        self._split_tokens(ids, eos)
                    elif fixed_split is not None:
                        self.writers[fixed_split].write([*ids, eos], len(data))
                    else:
                        side, h = assign_split(doc.text, (self.val_fraction, 1.0 - self.val_fraction))
                        split = move.get(index) or ("val", "train")[side]
                        if split == "train" and (self.min_hash_train is None or h < self.min_hash_train[0]):
                            self.min_hash_train = (h, index)
                        if split == "val" and (self.max_hash_val is None or h > self.max_hash_val[0]):
                            self.max_hash_val = (h, index)
                        self.writers[split].write([*ids, eos], len(data))
                    bar.update(len(data))
                bar.set_postfix(docs=self.n_documents, refresh=False)
        self.encode_seconds = time.perf_counter() - start

    def fix_for_empty_split(self) -> tuple[dict[str, Any], str] | None:
        """If hashing left train or val empty, the arguments for a second `run` that fixes it."""
        train, val = self.writers["train"].documents, self.writers["val"].documents
        if train and val:
            return None
        if self.n_documents == 1:
            return {"split_single": True}, (
                f"single document: split its tokens {1 - self.val_fraction:.0%}/{self.val_fraction:.0%} into train/val"
            )
        if not val:
            h, index = self.min_hash_train
            return {"move": {index: "val"}}, (
                f"no document hashed into val: moved document #{index} (smallest hash) there"
            )
        h, index = self.max_hash_val
        return {"move": {index: "train"}}, (
            f"no document hashed into train: moved document #{index} (largest hash) there"
        )

    def _split_tokens(self, ids: list[int], eos: int) -> None:
        n_val = min(max(1, round(len(ids) * self.val_fraction)), len(ids) - 1)
        parts = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]} if n_val > 0 else {"train": ids}
        for split, part in parts.items():
            self.writers[split].write([*part, eos], len(self.tok.decode(part).encode("utf-8")))

    def _batches(self) -> Iterator[list[tuple[str | None, Document]]]:
        docs = (
            ((name, doc) for name, path in self.presplit.items() for doc in iter_documents(path))
            if self.presplit
            else ((None, doc) for doc in iter_documents(self.input))
        )
        batch, size = [], 0
        for item in docs:
            batch.append(item)
            size += len(item[1].text)
            if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _encode(self, batches: Iterator[list]) -> Iterator[tuple[list, list[list[int]]]]:
        if self.workers is None:
            for batch in batches:
                yield batch, self.tok.encode_batch([doc.text for _, doc in batch])
        elif self.workers == 1:
            for batch in batches:
                yield batch, [self.tok.encode(doc.text) for _, doc in batch]
        else:
            yield from _encode_in_processes(batches, self.tokenizer_file, self.workers)

    def _total_bytes(self) -> int | None:
        roots = list(self.presplit.values()) if self.presplit else [Path(self.input)]
        files = [f for root in roots for f in corpus_files(root)]
        # Parquet and .gz/.zst sizes are compressed sizes: no meaningful total, show a counter instead.
        compressed = (".parquet", ".jsonl.gz", ".jsonl.zst")
        return None if any(suffix_of(f) in compressed for f in files) else sum(f.stat().st_size for f in files)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = Tokenizer.load(tokenizer_file)


def _encode_texts(texts: list[str]) -> list[list[int]]:
    return [_worker_tokenizer.encode(text) for text in texts]


def _encode_in_processes(batches: Iterator[list], tokenizer_file: Path,
                         workers: int) -> Iterator[tuple[list, list[list[int]]]]:
    # spawn, not fork: forking after the Rust thread pool has started can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_file),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_texts, ([doc.text for _, doc in batch],))))
            # Keep a bounded number of batches in flight so memory does not grow with the corpus.
            if len(pending) >= 2 * workers:
                batch, result = pending.popleft()
                yield batch, result.get()
        while pending:
            batch, result = pending.popleft()
            yield batch, result.get()


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path
