"""`lmforge data prepare`: read, normalize, filter, scrub, deduplicate and split a corpus.

Three stages, so that the output is identical for any number of workers and any executor:

1. per shard, in parallel (`process_shard`): read -> normalize (+ boilerplate lines of the
   shard's sources) -> language id -> Gopher quality -> Gopher repetition -> blocklist ->
   PII scrubbing (a list of steps: `lmforge.data.chain`); survivors go to `<work>/shard-NNNNN.parquet`
   with their exact hashes (`.npz`), MinHash signatures (`.sigs`, raw uint32) and split-group
   signatures (`.gsigs`, `lmforge.data.group`), and the shard's accounting to `.json` (written
   last: it is the "shard finished" marker that resume trusts);
2. once, over all shards (`_decide`): exact dedup, MinHash-LSH near dedup, optional
   paragraph dedup, split groups, and the split of every surviving document by a hash of its
   group (its near-duplicate cluster joined with the documents its text overlaps: `split.group`);
3. per shard, in parallel (`write_shard`): the kept documents to `<out>/<split>/part-NNNNN.parquet`.

Memory is bounded by a batch of `read.shard_bytes` (stages 1 and 3 stream; parquet is read
page by page, see `readers.open_parquet`) plus ~200 bytes per surviving document in stage 2
(hash, length, status, split; 16 LSH band keys of 8 bytes while candidates are found, for
dedup and then for split groups, 16 bands a pass) and the signatures of candidate pairs: all
signatures (2 x 512 bytes a document) stay on disk.

Resume is automatic: the work directory `<out parent>/.<out name>.work` survives an
interrupted run, and a rerun with the same config and unchanged input files skips every
shard whose marker is there (`resume=False` / `--no-resume` starts over). The output
directory is built under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.data import dedup, group, tally
from lmforge.data.chain import Doc, filter_steps, make_chain, normalize_batch, run_steps, utf8_size
from lmforge.data.config import DataPrepConfig, to_dict
from lmforge.data.executors import LocalRunner, RayRunner
from lmforge.data.readers import open_parquet
from lmforge.data.sources import Record, Shard, plan_shards, read_shard, resolve_inputs
from lmforge.data.split import assign_split
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json, write_summary

SPLITS = ("train", "val", "test")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_MIN_PARAGRAPH_CHARS = 80
_KEEP, _EXACT, _NEAR, _PARA = 0, 1, 2, 3
_REMOVED_AS = {_EXACT: ("exact_dedup", "exact_duplicate"), _NEAR: ("near_dedup", "near_duplicate"),
               _PARA: ("paragraph_dedup", "paragraph_duplicate")}


def process_shard(shard: Shard, cfg_dict: dict[str, Any], work: str, strict: bool) -> dict[str, Any]:
    """Stage 1 for one shard; writes its survivors + accounting under `work`, returns the accounting.

    Records are handled in batches of about `read.shard_bytes` (boilerplate is found per batch),
    so a shard that cannot be cut into byte ranges (one big .jsonl.gz) still runs in bounded memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = _config_from_dict(cfg_dict)
    t = tally.new_tally()
    stem = Path(work) / f"shard-{shard.index:05d}"
    schema = pa.schema([(k, pa.float32() if k == "lang_score" else pa.string()) for k in _COLUMNS])
    # per-document dedup state as packed 8-byte machine integers (a Python int in a list costs ~40)
    arrays: dict[str, Any] = {"exact": array("Q"), "lengths": array("q"), "sigs": [], "gsigs": [],
                              "para_hashes": array("Q"), "para_counts": array("q")}
    kept = 0
    # signatures (512 bytes a document, each kind) stream to raw files, batch by batch, instead of memory
    with (pq.ParquetWriter(f"{stem}.parquet.tmp", schema) as writer, open(f"{stem}.sigs.tmp", "wb") as sig_file,
          open(f"{stem}.gsigs.tmp", "wb") as group_file):
        for batch in _batches(read_shard(shard, cfg.read, strict=strict), cfg.read.shard_bytes, t):
            rows = _filter_batch(batch, cfg, t, arrays)
            for key, file in (("sigs", sig_file), ("gsigs", group_file)):
                if arrays[key]:
                    np.stack(arrays[key]).astype(np.uint32).tofile(file)
                    arrays[key].clear()
            writer.write_table(pa.table(rows, schema=schema))
            kept += len(rows["text"])
    for suffix in ("parquet", "sigs", "gsigs"):
        os.replace(f"{stem}.{suffix}.tmp", f"{stem}.{suffix}")
    out = {
        "exact": np.array(arrays["exact"], dtype=np.uint64), "lengths": np.array(arrays["lengths"], dtype=np.int64),
        "para_hashes": np.array(arrays["para_hashes"], dtype=np.uint64),
        "para_counts": np.array(arrays["para_counts"], dtype=np.int64),
    }
    with open(f"{stem}.npz.tmp", "wb") as f:
        np.savez(f, **out)
    os.replace(f"{stem}.npz.tmp", f"{stem}.npz")
    t["kept"] = kept
    t["key"] = shard.key()
    atomic_write_json(f"{stem}.json", t)  # last: the marker that this shard is finished
    return t


_COLUMNS = ("text", "id", "source", "lang", "lang_score", "meta")


def _batches(items: Any, batch_bytes: int, t: dict[str, Any]) -> Any:
    """Records grouped into lists of about `batch_bytes`; unreadable input is counted on the way."""
    batch: list[Record] = []
    size = 0
    for item in items:
        if not isinstance(item, Record):
            tally.unreadable(t, item.reason, item.where, item.detail, item.nbytes)
            continue
        batch.append(item)
        size += len(item.text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    yield batch


def _filter_batch(batch: list[Record], cfg: DataPrepConfig, t: dict[str, Any],
                  arrays: dict[str, Any]) -> dict[str, list]:
    """Normalize, filter and scrub one batch (the chain of steps in data/chain.py); the survivors'
    columns (their dedup keys go to `arrays`)."""
    chain, steps = make_chain(cfg, t), filter_steps(cfg)
    perms = (dedup.permutations(cfg.dedup.num_perm, cfg.dedup.seed),
             dedup.permutations(cfg.split.group_num_perm, cfg.dedup.seed))
    rows: dict[str, list] = {k: [] for k in _COLUMNS}
    for doc in normalize_batch(batch, cfg, t):
        if run_steps(doc, steps, chain):
            _add_row(rows, doc)
            _add_dedup_keys(arrays, doc, cfg, perms)
    return rows


def _add_row(rows: dict[str, list], doc: Doc) -> None:
    rec = doc.rec
    rows["text"].append(doc.text)
    rows["id"].append(rec.id)
    rows["source"].append(rec.source)
    rows["lang"].append(doc.lang)
    rows["lang_score"].append(doc.lang_score)
    rows["meta"].append(json.dumps(rec.meta, ensure_ascii=False, sort_keys=True, default=str) if rec.meta else "")


def _add_dedup_keys(arrays: dict[str, Any], doc: Doc, cfg: DataPrepConfig, perms: tuple[Any, Any]) -> None:
    """A survivor's exact hash and length, MinHash signatures (dedup's and the split group's) and
    paragraph hashes, for stage 2."""
    arrays["exact"].append(dedup.exact_hash(doc.text))
    arrays["lengths"].append(utf8_size(doc.text))
    if cfg.dedup.near:
        word_hashes, _ = doc.words.hashes(doc.text)
        shingles = dedup.shingles_from_hashes(word_hashes, cfg.dedup.shingle_words)
        arrays["sigs"].append(dedup.signature(shingles, *perms[0]))
    if cfg.split.group:
        shingles = group.group_shingles(doc.text, doc.words, cfg.split.group_shingle_words)
        arrays["gsigs"].append(dedup.signature(shingles, *perms[1]))
    if cfg.dedup.paragraphs:
        hashes = [dedup.exact_hash(p) for p in _PARAGRAPH.split(doc.text) if len(p.strip()) >= _MIN_PARAGRAPH_CHARS]
        arrays["para_hashes"].extend(hashes)
        arrays["para_counts"].append(len(hashes))


def _config_from_dict(data: dict[str, Any]) -> DataPrepConfig:
    from lmforge.configtree import build

    return build(DataPrepConfig, data, "", "")


def _decide(work: Path, shards: list[Shard], cfg: DataPrepConfig) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Stage 2: the fate (kept/exact/near/paragraph duplicate) and split of every stage-1 survivor,
    and how the kept documents were grouped for the split (`group.group_stats`)."""
    loaded = [np.load(work / f"shard-{s.index:05d}.npz") for s in shards]
    sizes = [len(d["exact"]) for d in loaded]
    exact = np.concatenate([d["exact"] for d in loaded]) if loaded else np.zeros(0, np.uint64)
    lengths = np.concatenate([d["lengths"] for d in loaded]) if loaded else np.zeros(0, np.int64)
    n = len(exact)
    status = np.zeros(n, dtype=np.int8)
    if cfg.dedup.exact and n:
        _, first = np.unique(exact, return_index=True)
        is_first = np.zeros(n, dtype=bool)
        is_first[first] = True
        status[~is_first] = _EXACT
    alive_mask = status == _KEEP
    alive = np.flatnonzero(alive_mask)
    signatures = functools.partial(_alive_signatures, work, shards, sizes, alive_mask)
    roots = np.arange(len(alive))
    if cfg.dedup.near and n:
        roots = _near_roots(signatures, len(alive), cfg)
        keep = dedup.keepers(roots, lengths[alive], cfg.dedup.keep)
        status[alive[~keep]] = _NEAR
    if cfg.split.group and n:
        s = cfg.split
        pairs = group.candidate_pairs_in_passes(functools.partial(signatures, "gsigs", s.group_num_perm),
                                                len(alive), s.group_bands, s.group_rows)
        load = functools.partial(_signatures_of, signatures, "gsigs", s.group_num_perm, len(alive))
        roots = dedup.roots_from_pairs(len(alive), pairs, load, s.group_threshold, roots)
    # the split follows the group (its smallest member hash), so no group or cluster straddles splits
    cluster_key = exact.copy()
    cluster_key[alive] = group.smallest_key_per_cluster(roots, exact[alive])
    split = np.zeros(n, dtype=np.int8)
    position = np.zeros(n)
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    for i in np.flatnonzero(status == _KEEP).tolist():
        split[i], position[i] = assign_split(int(cluster_key[i]), fractions, cfg.split.seed)
    _fill_empty_splits(split, position, status, cluster_key, cfg)
    drop_para = [np.zeros(0, dtype=np.int64)] * len(shards)
    if cfg.dedup.paragraphs:
        drop_para = _paragraph_dedup(loaded, status)
    out, start = [], 0
    for k, size in enumerate(sizes):
        out.append({"status": status[start : start + size], "split": split[start : start + size],
                    "drop_para": drop_para[k]})
        start += size
    return out, group.group_stats(cluster_key[status == _KEEP])


def _near_roots(signatures: Any, n_alive: int, cfg: DataPrepConfig) -> np.ndarray:
    """Near-duplicate cluster ids of the alive documents: LSH band keys, candidates, verified pairs."""
    # signatures (4 * num_perm bytes a document) stay on disk: memory holds the band keys
    # (8 * bands bytes) and, for verification, the signatures of candidate pairs only
    d = cfg.dedup
    keys = np.empty((n_alive, d.bands), dtype=np.uint64)
    for start, chunk in signatures("sigs", d.num_perm):
        keys[start : start + len(chunk)] = dedup.band_keys(chunk, d.bands, d.rows)
    pairs = dedup.candidate_pairs_from_keys(keys)
    del keys
    load = functools.partial(_signatures_of, signatures, "sigs", d.num_perm, n_alive)
    return dedup.roots_from_pairs(n_alive, pairs, load, d.verify_threshold)


def _alive_signatures(work: Path, shards: list[Shard], sizes: list[int], alive: np.ndarray, suffix: str,
                      num_perm: int) -> Any:
    """(index among the alive rows of the first one, their signatures) in chunks, read from the
    shards' `.<suffix>` files (sigs: dedup's, gsigs: split groups') in order: memory holds one
    chunk, never every signature."""
    start = row = 0
    for shard, size in zip(shards, sizes):
        with open(work / f"shard-{shard.index:05d}.{suffix}", "rb") as f:
            for lo in range(0, size, _SIG_CHUNK_ROWS):
                count = min(_SIG_CHUNK_ROWS, size - lo)
                chunk = np.fromfile(f, dtype=np.uint32, count=count * num_perm).reshape(count, num_perm)
                chunk = chunk[alive[row + lo : row + lo + count]]
                yield start, chunk
                start += len(chunk)
        row += size


def _signatures_of(signatures: Any, suffix: str, num_perm: int, n_alive: int, rows: np.ndarray) -> np.ndarray:
    """The signatures of the alive rows numbered `rows` (sorted), in one pass over the `.<suffix>` files."""
    wanted = np.zeros(n_alive, dtype=bool)
    wanted[rows] = True
    out = np.empty((len(rows), num_perm), dtype=np.uint32)
    filled = 0
    for start, chunk in signatures(suffix, num_perm):
        picked = chunk[wanted[start : start + len(chunk)]]
        out[filled : filled + len(picked)] = picked
        filled += len(picked)
    return out


_SIG_CHUNK_ROWS = 16384


def _fill_empty_splits(split: np.ndarray, position: np.ndarray, status: np.ndarray, keys: np.ndarray,
                       cfg: DataPrepConfig) -> None:
    """A split with a non-zero fraction that got no document takes the train group (all documents
    with one split key) hashed nearest to it."""
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    for target in (1, 2):
        kept = status == _KEEP
        if fractions[target] == 0 or (kept & (split == target)).any():
            continue
        train = np.flatnonzero(kept & (split == 0))
        if len(np.unique(keys[train])) >= 3:
            moved = train[keys[train] == keys[train[np.argmax(position[train])]]]
            split[moved] = target
            position[moved] = -1


def _paragraph_dedup(loaded: list, status: np.ndarray) -> list[np.ndarray]:
    """Per shard, flat indices (into that shard's paragraph list) of paragraphs seen in an earlier kept document."""
    seen: set[int] = set()
    result, doc = [], 0
    for d in loaded:
        hashes, counts = d["para_hashes"].tolist(), d["para_counts"].tolist()
        drop, offset = [], 0
        for count in counts:
            for j in range(offset, offset + count):
                if status[doc] == _KEEP:
                    if hashes[j] in seen:
                        drop.append(j)
                    else:
                        seen.add(hashes[j])
            offset += count
            doc += 1
        result.append(np.array(drop, dtype=np.int64))
    return result


def write_shard(shard: Shard, decision: dict[str, np.ndarray], work: str, out: str) -> dict[str, Any]:
    """Stage 3 for one shard: kept documents into `out/<split>/part-NNNNN.parquet`; dedup accounting.

    Streams the shard's survivors in record batches (bounded memory for any shard size).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    status, split = decision["status"], decision["split"]
    drop = set(decision["drop_para"].tolist())
    t = tally.new_tally()
    writers: dict[int, Any] = {}
    written: dict[str, list[int]] = {}
    para_index = row = 0
    source = open_parquet(Path(work) / f"shard-{shard.index:05d}.parquet")  # streams: see open_parquet
    text_column = source.schema_arrow.get_field_index("text")
    try:
        for batch in source.iter_batches(batch_size=_WRITE_BATCH_ROWS):
            texts = batch.column(text_column).to_pylist()
            keep: dict[int, list[int]] = defaultdict(list)
            final_texts: dict[int, list[str]] = defaultdict(list)
            for j, text in enumerate(texts):
                i = row + j
                nbytes = utf8_size(text)
                final = text
                if drop:  # advance through every document's paragraphs, kept or not
                    final, para_index = _drop_paragraphs(text, drop, para_index)
                if _removed_as_duplicate(t, int(status[i]), nbytes, text):
                    continue
                tally.enter(t, "paragraph_dedup", nbytes)
                if not final:
                    tally.remove(t, "paragraph_dedup", "paragraph_duplicate", nbytes, text)
                    continue
                keep[int(split[i])].append(j)
                final_texts[int(split[i])].append(final)
            row += len(texts)
            for s in sorted(keep):
                part = pa.Table.from_batches([batch.take(pa.array(keep[s], type=pa.int64()))])
                part = part.set_column(text_column, "text", pa.array(final_texts[s], pa.string()))
                if s not in writers:
                    writers[s] = pq.ParquetWriter(Path(out) / SPLITS[s] / f"part-{shard.index:05d}.parquet",
                                                  part.schema)
                writers[s].write_table(part)
                counts = written.setdefault(SPLITS[s], [0, 0])
                counts[0] += len(keep[s])
                counts[1] += sum(map(utf8_size, final_texts[s]))
    finally:
        for writer in writers.values():
            writer.close()
    t["written"] = written
    return t


_WRITE_BATCH_ROWS = 2048


def _removed_as_duplicate(t: dict[str, Any], status: int, nbytes: int, text: str) -> bool:
    for step, code in (("exact_dedup", _EXACT), ("near_dedup", _NEAR)):
        tally.enter(t, step, nbytes)
        if status == code:
            tally.remove(t, step, _REMOVED_AS[code][1], nbytes, text)
            return True
    return False


def _drop_paragraphs(text: str, drop: set[int], para_index: int) -> tuple[str, int]:
    """`text` without its long paragraphs whose running index is in `drop`; the next index."""
    paragraphs = _PARAGRAPH.split(text)
    kept = []
    for p in paragraphs:
        if len(p.strip()) >= _MIN_PARAGRAPH_CHARS:
            para_index += 1
            if para_index - 1 in drop:
                continue
        kept.append(p)
    return ("\n\n".join(kept).strip() if len(kept) < len(paragraphs) else text), para_index


def prepare_data(inputs: list[str], out: str | Path, cfg: DataPrepConfig, *, workers: int | None = None,
                 executor: str = "local", strict: bool = False, resume: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary written to `out/summary.json`."""
    start = time.perf_counter()
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor!r}: use local or ray")
    files = resolve_inputs([str(i) for i in inputs])
    shards = plan_shards(files, cfg.read)
    cfg_dict = to_dict(cfg)
    work = out.parent / f".{out.name}.work"
    fingerprint = hashlib.sha256(
        json.dumps({"config": cfg_dict, "strict": strict}, sort_keys=True).encode()).hexdigest()
    _open_work(work, fingerprint, resume)
    todo, results = [], {}
    for shard in shards:
        marker = work / f"shard-{shard.index:05d}.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("key") == shard.key():
                results[shard.index] = done
                continue
        todo.append(shard)
    run = RayRunner(workers) if executor == "ray" else LocalRunner(workers)
    total_bytes = sum(s.nbytes for s in todo)
    t1 = time.perf_counter()
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
            docs = 0
            todo.sort(key=lambda s: -s.nbytes)  # big shards first: better load balance
            for shard, result in run.map(process_shard, [(s, cfg_dict, str(work), strict) for s in todo]):
                results[shard.index] = result
                docs += result["documents_in"]
                bar.update(shard.nbytes)
                elapsed = max(1e-9, time.perf_counter() - t1)
                bar.set_postfix(docs_s=f"{docs / elapsed:,.0f}", MB_s=f"{bar.n / elapsed / 1e6:.2f}", refresh=False)
        stage1_s = time.perf_counter() - t1
        decisions, groups = _decide(work, shards, cfg)
        with atomic_dir(out) as tmp:
            for split in SPLITS:
                (tmp / split).mkdir()
            written = run.map(write_shard, [(s, d, str(work), str(tmp)) for s, d in zip(shards, decisions)])
            total = tally.new_tally()
            for shard in shards:
                tally.merge(total, results[shard.index])
            outputs = {split: [0, 0] for split in SPLITS}
            for _, w in sorted(written, key=lambda pair: pair[0].index):
                tally.merge(total, w)
                for split, (n, nbytes) in w["written"].items():
                    outputs[split][0] += n
                    outputs[split][1] += nbytes
            summary = _summarize(tmp, inputs, cfg_dict, total, outputs, shards, (workers, executor, groups),
                                 stage1_s, time.perf_counter() - start)
    finally:
        run.close()
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _open_work(work: Path, fingerprint: str, resume: bool) -> None:
    stamp = work / "fingerprint.txt"
    if work.exists() and (not resume or not stamp.exists() or stamp.read_text() != fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        atomic_write_bytes(stamp, fingerprint.encode())


def _summarize(tmp: Path, inputs: list[str], cfg_dict: dict, total: dict, outputs: dict, shards: list,
               run_info: tuple[int, str, dict], stage1_s: float, wall_s: float) -> dict[str, Any]:
    from lmforge.data.report import write_report

    workers, executor, groups = run_info
    removed = tally.removed_by_reason(total)
    unreadable = {reason: docs for reason, (docs, _) in total["unreadable"].items()}
    documents_out = {split: n for split, (n, _) in outputs.items()}
    kept = sum(documents_out.values())
    if total["documents_in"] != kept + sum(removed.values()) + sum(unreadable.values()):
        raise AssertionError(f"accounting invariant broken: {total['documents_in']} in, {kept} kept, "
                             f"{sum(removed.values())} removed, {sum(unreadable.values())} unreadable")
    metrics = {
        "documents_in": total["documents_in"], "bytes_in": total["bytes_in"], "documents_kept": kept,
        "bytes_out": {split: nbytes for split, (_, nbytes) in outputs.items()},
        "shards": len(shards), "workers": workers, "executor": executor,
        "filter_seconds": round(stage1_s, 3), "mb_per_s": round(total["bytes_in"] / 1e6 / max(wall_s, 1e-9), 3),
        "pii_replaced": total["pii"], "normalize_changes": total["changes"], "languages": total["langs"],
        "split_groups": groups,
    }
    existing = {f"input{i}": p for i, p in enumerate(inputs) if Path(p).exists()}
    extra = {"documents_in": total["documents_in"], "documents_out": documents_out, "removed": removed,
             "unreadable": unreadable, "unreadable_examples": total["unreadable_examples"][:50]}
    summary = write_summary(tmp, "data prepare", config=cfg_dict, inputs=existing, metrics=metrics,
                            wall_time_s=wall_s, extra=extra)
    write_report(tmp / "report.md", total, outputs, summary)
    return summary
