"""A RAG index on disk: chunks, their vectors and a FAISS structure over them.

    lmforge rag index --input corpus/ --embedder runs/minilm --out runs/rag

An index directory holds
- `chunks.parquet`: one row per chunk: `chunk_id`, `text`, `source` (the document: the file, or
  file:line for JSONL), `file` (the input file), `start`, `end` (char offsets into the document);
- `vectors.npy`: the (chunks, dim) float32 unit vectors, row i for row i of the table, kept so that
  adding, deleting and changing the index type never re-embed anything;
- `index.faiss`: the search structure (ids = chunk ids): `flat` IndexFlatIP (exact cosine on unit
  vectors), `hnsw` IndexHNSWFlat (inner product), `ivf` IndexIVFFlat, `ivfpq` IndexIVFPQ (both trained
  on the vectors, nlist = 4 sqrt(N) clamped so that every list gets >= 39 training points);
- `rag_config.json`: the embedder's path and weights' sha256, its max length, the chunking, the index
  type and its parameters, the next free chunk id;
- `summary.json` (stage "rag index"): counts, dim, embedding time and chunks/s, the updates made.

Deleting a source removes its ids from the FAISS structure where FAISS can (`flat` through
IndexIDMap2, `ivf`, `ivfpq`) and rebuilds `hnsw` (which cannot remove) from the stored vectors.
Adding embeds only the new chunks and adds them (IVF lists keep their trained centroids). Every
change writes a new directory beside the old one and renames it into place (`fsutil.atomic_dir`):
an interrupted command leaves the old index as it was.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.errors import Interrupted, UserError
from lmforge.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json, file_sha256, write_summary
from lmforge.rag.chunking import STRATEGIES, Chunk, chunk_text

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
FILES = ("rag_config.json", "chunks.parquet", "vectors.npy", "index.faiss")
COLUMNS = ("chunk_id", "text", "source", "file", "start", "end")
IVFPQ_MIN_VECTORS = 1000
# search breadth: on the whole modern Shakespeare (6,197 chunks, Folio queries) efSearch 64 returned 0.910 of
# flat's top 10, 128 0.967; IVF nprobe 16 of 158 lists 0.747, 32 0.873 (docs/RAG.md)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
STAGE = "rag index"
EMBED_PART = 512  # chunks per saved part of the embeddings (what an interrupted build keeps)


# ---- the embedder ----------------------------------------------------------------------------------


class Embedder:
    """An encoder checkpoint as a text -> unit vector function (`lmforge.infer.embed.embed_texts`)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from lmforge.infer.embed import max_seq_length
        from lmforge.models import has_capability
        from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

        self.path = str(resolve_checkpoint(path).resolve())
        self.model, self.tokenizer = load_pretrained(self.path, device)
        if not has_capability(self.model, "embed"):
            raise UserError(f"{path} is a {type(self.model).__name__} checkpoint, which gives no sentence embeddings; "
                            "pass an encoder (BERT) checkpoint, e.g. a converted all-MiniLM-L6-v2")
        self.max_length = max_seq_length(Path(self.path), self.model.config)
        self.dim = int(self.model.config.n_embd)
        self.sha256 = weights_sha256(self.path)

    @property
    def chunk_limit(self) -> int:
        """The most tokens a chunk may have and still be embedded whole ([CLS]/[SEP] take their room)."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add()

    def __call__(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        from lmforge.infer.embed import embed_texts

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_texts(self.model, self.tokenizer, list(texts), max_length=self.max_length,
                           batch_size=batch_size, progress=progress)


def weights_sha256(ckpt: str | Path) -> str:
    """The sha256 of a checkpoint's model.safetensors (what identifies an embedder)."""
    return file_sha256(Path(ckpt) / "model.safetensors")


@functools.lru_cache(maxsize=4)
def load_embedder(path: str, device: str = "cpu") -> Embedder:
    """An `Embedder`, loaded once per (resolved path, device) in a process."""
    return Embedder(path, device)


def embedder_for(path: str | Path, device: str = "cpu") -> Embedder:
    from lmforge.train.checkpoint import resolve_checkpoint

    return load_embedder(str(resolve_checkpoint(path).resolve()), device)


# ---- FAISS ------------------------------------------------------------------------------------------


def index_params(index_type: str, n: int, dim: int) -> dict[str, Any]:
    """The parameters of a FAISS structure of `index_type` over `n` vectors (a UserError when it cannot be)."""
    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
    if index_type == "flat":
        return {"type": "flat"}
    if index_type == "hnsw":
        return {"type": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    if index_type == "ivfpq" and n < IVFPQ_MIN_VECTORS:
        raise UserError(f"--index ivfpq needs at least {IVFPQ_MIN_VECTORS} vectors to train its codebooks, "
                        f"this index has {n}; use flat, hnsw or ivf")
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    params = {"type": index_type, "nlist": nlist, "nprobe": min(nlist, max(32, nlist // 8))}
    if index_type == "ivfpq":
        params["m"] = max(d for d in range(1, dim // 4 + 1) if dim % d == 0) if dim >= 4 else 1
        params["m"] = dim // 8 if dim % 8 == 0 else params["m"]
        params["nbits"] = 8
    return params


def make_faiss(vectors: np.ndarray, ids: np.ndarray, params: dict[str, Any]) -> Any:
    """A FAISS structure over unit `vectors` (inner product = cosine) with `ids` as its ids."""
    import faiss

    dim = vectors.shape[1]
    kind = params["type"]
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params["ef_construction"]
        index = faiss.IndexIDMap2(inner)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                                     faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    set_search_params(index, params)
    return index


def set_search_params(index: Any, params: dict[str, Any]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    if params["type"] == "hnsw":
        space.set_index_parameter(index, "efSearch", params["ef_search"])
    elif params["type"] in ("ivf", "ivfpq"):
        space.set_index_parameter(index, "nprobe", params["nprobe"])


def can_remove(params: dict[str, Any]) -> bool:
    """Whether FAISS can remove ids from this structure in place (HNSW cannot)."""
    return params["type"] != "hnsw"


# ---- the store on disk ----------------------------------------------------------------------------


@dataclass
class Store:
    """An index directory in memory: config, chunk table (column lists), vectors, FAISS structure."""

    directory: Path
    config: dict[str, Any]
    table: dict[str, list]
    vectors: np.ndarray
    index: Any

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.table["chunk_id"], dtype=np.int64)


def write_store(store: Store, out: Path, metrics: dict[str, Any], updates: list[dict[str, Any]]) -> dict[str, Any]:
    """Write every file of `store` into a new `out` (renamed into place); returns summary.json's dict."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_dir(out) as tmp:
        pq.write_table(pa.table({c: store.table[c] for c in COLUMNS}), tmp / "chunks.parquet")
        np.save(tmp / "vectors.npy", np.ascontiguousarray(store.vectors, dtype=np.float32))
        faiss.write_index(store.index, str(tmp / "index.faiss"))
        atomic_write_json(tmp / "rag_config.json", store.config)
        summary = write_summary(tmp, STAGE, config=store.config, metrics=metrics, hash_inputs=False,
                                inputs={"embedder": store.config["embedder"]},
                                extra={"updates": updates} if updates else None)
    return summary


def read_store(directory: str | Path) -> Store:
    """Load an index directory, checking that its files are there, readable and agree in counts."""
    import faiss
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not (directory / "rag_config.json").is_file():
        raise UserError(f"{directory}: not a RAG index (no rag_config.json); build one with `lmforge rag index`")
    config = _read_config(directory / "rag_config.json")
    try:
        table = pq.read_table(directory / "chunks.parquet").to_pydict()
        missing = [c for c in COLUMNS if c not in table]
        if missing:
            raise ValueError(f"missing column(s) {', '.join(missing)}")
    except Exception as e:  # pyarrow raises its own and OSError types
        raise UserError(f"{directory / 'chunks.parquet'}: unreadable chunk table ({_first_line(e)}); "
                        "rebuild the index with `lmforge rag index --overwrite`") from None
    vectors = _read_npy(directory / "vectors.npy")
    try:
        index = faiss.read_index(str(directory / "index.faiss"))
    except Exception as e:  # faiss raises RuntimeError with a C++ trace
        raise UserError(f"{directory / 'index.faiss'}: unreadable FAISS index ({_first_line(e)}); "
                        "rebuild the index with `lmforge rag index --overwrite`") from None
    counts = {"chunks.parquet rows": len(table["chunk_id"]), "vectors.npy rows": int(vectors.shape[0]),
              "index.faiss vectors": int(index.ntotal)}
    if len(set(counts.values())) != 1 or vectors.shape[1] != config["dim"] or index.d != config["dim"]:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise UserError(f"{directory}: the index files disagree ({shown}, dim {config['dim']} in rag_config.json, "
                        f"{vectors.shape[1]} in vectors.npy, {index.d} in index.faiss); rebuild it with "
                        "`lmforge rag index --overwrite`")
    set_search_params(index, config["index"])
    return Store(directory, config, table, vectors, index)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("embedder", "embedder_sha256", "dim", "index", "chunking", "next_id"):
            if key not in config:
                raise KeyError(key)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable RAG config ({type(e).__name__}: {e}); rebuild the index with "
                        "`lmforge rag index --overwrite`") from None
    return config


def _read_npy(path: Path) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r")
        if vectors.ndim != 2:
            raise ValueError(f"shape {vectors.shape}, expected (chunks, dim)")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable vectors ({_first_line(e)}); rebuild the index with "
                        "`lmforge rag index --overwrite`") from None
    return vectors


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


# ---- reading and chunking documents ----------------------------------------------------------------


def read_documents(inputs: Sequence[str | Path]) -> list[Any]:
    """The documents of every input (files or directories) through `lmforge.data.readers.iter_documents`."""
    from lmforge.data.readers import iter_documents

    if not inputs:
        raise UserError("no input documents; pass --input FILE_OR_DIR (txt, md, jsonl, parquet, csv)")
    docs = []
    for path in inputs:
        docs += list(iter_documents(path))
    return docs


def chunk_documents(docs: Sequence[Any], embedder: Embedder, chunking: dict[str, Any],
                    batch_size: int = 64) -> list[tuple[Chunk, str]]:
    """(chunk, file) for every chunk of `docs`, with a progress bar over the documents."""
    embed = functools.partial(embedder, batch_size=batch_size) if chunking["strategy"] == "semantic" else None
    out: list[tuple[Chunk, str]] = []
    for doc in tqdm(docs, desc="chunk", unit="doc", disable=len(docs) < 2, leave=False):
        for chunk in chunk_text(doc.text, doc.id, chunking["strategy"], size=chunking["size"],
                                overlap=chunking["overlap"], tokenizer=embedder.tokenizer, embed=embed,
                                threshold=chunking.get("threshold")):
            out.append((chunk, doc.source))
    return out


def chunking_config(strategy: str, size: int, overlap: int, embedder: Embedder,
                    threshold: float | None = None) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown --chunking {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if size > embedder.max_length:  # (the default 256 for a 256-token embedder is cut to 254 quietly)
        warnings.warn(f"chunk size {size} is more than the embedder reads ({embedder.chunk_limit} tokens "
                      f"besides [CLS]/[SEP]); using {embedder.chunk_limit}", stacklevel=2)
    size = min(size, embedder.chunk_limit)
    if size < 1 or overlap < 0 or (overlap >= size and strategy != "semantic"):
        raise UserError(f"--chunk-size {size} / --overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    return {"strategy": strategy, "size": size, "overlap": overlap, "threshold": threshold}


def table_of(pairs: Sequence[tuple[Chunk, str]], first_id: int) -> dict[str, list]:
    return {"chunk_id": list(range(first_id, first_id + len(pairs))), "text": [c.text for c, _ in pairs],
            "source": [c.source for c, _ in pairs], "file": [f for _, f in pairs],
            "start": [c.start for c, _ in pairs], "end": [c.end for c, _ in pairs]}


def embed_chunks(embedder: Embedder, pairs: Sequence[tuple[Chunk, str]], batch_size: int,
                 cache: Path | None = None) -> tuple[np.ndarray, float, int]:
    """(vectors, seconds, chunks embedded now): the chunk texts embedded in parts of `EMBED_PART` under one
    progress bar. With `cache` (a hidden dir beside the index) each part is saved when done, and a
    rerun over the same chunks with the same embedder starts after the parts already there."""
    texts = [c.text for c, _ in pairs]
    key = _cache_key(embedder, texts)
    if cache is not None and _read_key(cache) != key:
        shutil.rmtree(cache, ignore_errors=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache / "key.json", {"key": key})
    starts = range(0, len(texts), EMBED_PART)
    files = [cache / f"part-{i:05d}.npy" if cache is not None else None for i in range(len(starts))]
    kept = sum(min(EMBED_PART, len(texts) - st) for st, f in zip(starts, files) if f is not None and f.is_file())
    parts, seconds, fresh = [], 0.0, 0
    with tqdm(total=len(texts), initial=kept, desc="embed", unit="chunk", disable=len(texts) <= batch_size) as bar:
        for start, file in zip(starts, files):
            if file is not None and file.is_file():
                parts.append(np.load(file))
                continue
            t0 = time.perf_counter()
            vectors = embedder(texts[start:start + EMBED_PART], batch_size=batch_size)
            seconds += time.perf_counter() - t0
            fresh += len(vectors)
            if file is not None:
                buffer = io.BytesIO()
                np.save(buffer, vectors)
                atomic_write_bytes(file, buffer.getvalue())
            parts.append(vectors)
            bar.update(len(vectors))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32), seconds, fresh


def _cache_key(embedder: Embedder, texts: Sequence[str]) -> str:
    h = hashlib.sha256(f"{embedder.sha256}:{embedder.max_length}:{len(texts)}".encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _read_key(cache: Path) -> str | None:
    try:
        return json.loads((cache / "key.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_dir(index_dir: Path, what: str) -> Path:
    """The hidden directory beside an index where an interrupted build/add keeps its finished embeddings."""
    index_dir = index_dir.resolve()
    return index_dir.with_name(f".{index_dir.name}.{what}-embeddings")


def embed_resumably(embedder: Embedder, pairs: Sequence[tuple[Chunk, str]], batch_size: int,
                    cache: Path) -> tuple[np.ndarray, float, int]:
    """`embed_chunks` with a cache; Ctrl-C becomes `Interrupted` saying that a rerun goes on from there."""
    try:
        return embed_chunks(embedder, pairs, batch_size, cache)
    except KeyboardInterrupt:
        done = sum(len(np.load(f, mmap_mode="r")) for f in cache.glob("part-*.npy"))
        raise Interrupted(f"interrupted: {done} of {len(pairs)} chunks are embedded and kept in {cache}; "
                          "run the same command again to go on from there") from None


def embed_metrics(n_chunks: int, seconds: float) -> dict[str, Any]:
    return {"embed_seconds": round(seconds, 3), "chunks_per_s": round(n_chunks / seconds, 2) if seconds > 0 else None}



# ---- build, add, delete ----------------------------------------------------------------------------


def build_index(inputs: list[str | Path], embedder: str | Path, out: str | Path, *, chunking: str = "sentence",
                size: int = 256, overlap: int = 32, index_type: str = "flat", overwrite: bool = False,
                batch_size: int = 64, threshold: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """Read, chunk, embed and index `inputs` into the index directory `out`; returns summary.json's dict.
    `device` runs the embedder (cpu, cuda, ...); queries embed on the CPU."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it (or `lmforge rag add` to add to it)")
    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown --index {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
    docs = read_documents(inputs)
    model = embedder_for(embedder, device)
    config = {"format": 1, "embedder": model.path, "embedder_sha256": model.sha256, "dim": model.dim,
              "max_length": model.max_length, "chunking": chunking_config(chunking, size, overlap, model, threshold)}
    pairs = chunk_documents(docs, model, config["chunking"], batch_size)
    if not pairs:
        raise UserError(f"{', '.join(map(str, inputs))}: the documents have no text to index")
    config["index"] = index_params(index_type, len(pairs), model.dim)
    config["next_id"] = len(pairs)
    cache = cache_dir(out, "index")
    vectors, seconds, fresh = embed_resumably(model, pairs, batch_size, cache)
    table = table_of(pairs, 0)
    store = Store(out, config, table, vectors, make_faiss(vectors, np.asarray(table["chunk_id"]), config["index"]))
    metrics = {"chunks": len(pairs), "documents": len(docs), "sources": len(set(table["file"])), "dim": model.dim,
               "resumed_chunks": len(pairs) - fresh, **embed_metrics(fresh, seconds)}
    summary = write_store(store, out, {**metrics, "seconds": round(time.perf_counter() - t0, 3)}, [])
    shutil.rmtree(cache, ignore_errors=True)
    return summary


def add_documents(index_dir: str | Path, inputs: list[str | Path], *, batch_size: int = 64,
                  device: str = "cpu") -> dict[str, Any]:
    """Chunk, embed and add the documents of `inputs` to an existing index (nothing else is re-embedded)."""
    t0 = time.perf_counter()
    store = read_store(index_dir)
    docs = read_documents(inputs)
    known = set(store.table["file"])
    again = sorted({d.source for d in docs} & known)
    if again:
        raise UserError(f"{again[0]} is already in {index_dir}; delete it first (`lmforge rag delete --source "
                        f"{again[0]}`) to index it anew")
    model = _same_embedder(store, device)
    pairs = chunk_documents(docs, model, store.config["chunking"], batch_size)
    if not pairs:
        raise UserError(f"{', '.join(map(str, inputs))}: the documents have no text to index")
    cache = cache_dir(Path(index_dir), "add")
    vectors, seconds, fresh = embed_resumably(model, pairs, batch_size, cache)
    new = table_of(pairs, store.config["next_id"])
    store.index.add_with_ids(np.ascontiguousarray(vectors), np.asarray(new["chunk_id"], dtype=np.int64))
    for column in COLUMNS:
        store.table[column] = list(store.table[column]) + new[column]
    store.vectors = np.concatenate([np.asarray(store.vectors), vectors])
    store.config["next_id"] += len(pairs)
    update = {"op": "add", "inputs": [str(p) for p in inputs], "chunks": len(pairs), "documents": len(docs),
              **embed_metrics(fresh, seconds), "seconds": round(time.perf_counter() - t0, 3)}
    summary = _rewrite(store, update)
    shutil.rmtree(cache, ignore_errors=True)
    return summary


def delete_source(index_dir: str | Path, source: str) -> dict[str, Any]:
    """Remove every chunk of `source` (an input file, or a document id such as file:line) from the index."""
    t0 = time.perf_counter()
    store = read_store(index_dir)
    keep = [not _matches(f, s, source) for f, s in zip(store.table["file"], store.table["source"])]
    removed = keep.count(False)
    if removed == len(keep):
        raise UserError(f"deleting {source} would leave {index_dir} empty; remove the directory instead")
    if not removed:
        files = sorted(set(store.table["file"]))
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise UserError(f"{index_dir}: no chunks from {source!r}; its sources are {shown}")
    mask = np.asarray(keep)
    gone = store.ids[~mask]
    store.table = {c: [v for v, k in zip(store.table[c], keep) if k] for c in COLUMNS}
    store.vectors = np.asarray(store.vectors)[mask]
    if can_remove(store.config["index"]):
        store.index.remove_ids(gone)
        how = "removed"
    else:
        store.index = make_faiss(store.vectors, store.ids, store.config["index"])
        how = "rebuilt from the stored vectors"
    update = {"op": "delete", "source": source, "chunks": removed, "faiss": how,
              "seconds": round(time.perf_counter() - t0, 3)}
    return _rewrite(store, update)


def _matches(file: str, doc: str, source: str) -> bool:
    return source in (file, doc) or Path(source).resolve() == Path(file).resolve()


def _same_embedder(store: Store, device: str = "cpu") -> Embedder:
    path = store.config["embedder"]
    if not Path(path).exists():
        raise UserError(f"{store.directory}: its embedder {path} is gone; rebuild the index with an embedder")
    model = embedder_for(path, device)
    if model.sha256 != store.config["embedder_sha256"]:
        raise UserError(f"{store.directory} was built with other weights than {path} now holds (sha256 "
                        f"{store.config['embedder_sha256'][:12]} vs {model.sha256[:12]}); rebuild the index")
    return model


def reindex(index_dir: str | Path, index_type: str, out: str | Path | None = None, *,
            overwrite: bool = False) -> dict[str, Any]:
    """Rebuild the FAISS structure as `index_type` from the stored vectors (nothing is re-embedded), in
    place or into a copy `out` (to compare structures over the same chunks)."""
    t0 = time.perf_counter()
    store = read_store(index_dir)
    target = store.directory if out is None else Path(out)
    if out is not None and target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")
    params = index_params(index_type, len(store.table["chunk_id"]), store.config["dim"])
    store.index = make_faiss(np.asarray(store.vectors), store.ids, params)
    before = store.config["index"]["type"]
    store.config["index"] = params
    update = {"op": "reindex", "from": before, "to": index_type, "seconds": round(time.perf_counter() - t0, 3)}
    return _rewrite(store, update, target)


def _rewrite(store: Store, update: dict[str, Any], target: Path | None = None) -> dict[str, Any]:
    previous = _read_summary(store.directory)
    metrics = {**previous.get("metrics", {}), "chunks": len(store.table["chunk_id"]),
               "sources": len(set(store.table["file"])), "documents": len(set(store.table["source"]))}
    return write_store(store, target or store.directory, metrics, [*previous.get("updates", []), update])


def _read_summary(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
