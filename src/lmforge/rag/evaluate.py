"""`lmforge rag eval`: retrieval accuracy and latency of an index on the built-in Folio task.

    lmforge rag eval --index runs/rag-modern --out runs/rag-eval [--modes dense,bm25,hybrid] [--queries 300]

The queries are First Folio passages and the relevant chunks those of the same passage in the
modern edition (`lmforge.rag.folio`); the index must hold the modern edition (`lmforge data fetch
shakespeare --edition modern`) and no Folio text. A chunk is relevant to a query when it comes from
the passage's modern file and overlaps the passage's modern span by at least a third of the shorter
of the two (so a passage split over two chunks has both relevant when each holds a fair part).

Metrics (binary relevance; rel_i = 1 when the hit at rank i is relevant, R = the number of relevant
chunks in the index; means over the queries; 10 hits are retrieved per query):
- recall@k = 1 if some relevant chunk is in the top k, else 0 (hit rate; with one relevant chunk
  per query this is the usual |relevant in top k| / |relevant|)
- mrr = 1 / rank of the first relevant hit in the top 10 (0 when there is none)
- ndcg@10 = DCG / IDCG, DCG = sum_{i=1..10} rel_i / log2(i + 1), IDCG = sum_{i=1..min(R, 10)} 1 / log2(i + 1)
Latency is the wall time of one `RagIndex.search` call (the query's embedding, the index search,
BM25 and the fusion), one query at a time after a warm-up query, in milliseconds: mean, p50, p99.

results.json holds every mode under "modes" and, at the top level, the metrics of the FIRST mode
of --modes (by default dense, `RagIndex.search`'s default) with its name under "mode".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, write_summary
from lmforge.rag.folio import FOLIO_SUFFIX, MODERN_SUFFIX, Passage, folio_task, sample_passages

METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
MODES = ("dense", "bm25", "hybrid")
TOP_K = 10


# --------------------------------------------------------------------------------------------
# Metrics


def query_metrics(judged: Sequence[bool], n_relevant: int) -> dict[str, float]:
    """The metrics of one query from the relevance of its ranked hits (see the module doc)."""
    judged = list(judged)[:TOP_K]
    first = next((i for i, rel in enumerate(judged) if rel), None)
    dcg = sum(1.0 / math.log2(i + 2) for i, rel in enumerate(judged) if rel)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(n_relevant, TOP_K)))
    return {"recall@1": float(any(judged[:1])), "recall@5": float(any(judged[:5])),
            "recall@10": float(any(judged[:10])), "mrr": 0.0 if first is None else 1.0 / (first + 1),
            "ndcg@10": dcg / idcg if idcg else 0.0}


def retrieval_metrics(judged: Sequence[Sequence[bool]], n_relevant: Sequence[int]) -> dict[str, float]:
    """Means over the queries of `query_metrics` (0 for every key when there are no queries)."""
    rows = [query_metrics(j, r) for j, r in zip(judged, n_relevant, strict=True)]
    return {key: float(np.mean([row[key] for row in rows])) if rows else 0.0 for key in METRIC_KEYS}


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p99 in milliseconds (numpy's linear-interpolation percentiles)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    return {"mean": round(float(ms.mean()), 3), "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3)}


def is_relevant(passage: Passage, source: str, start: int, end: int) -> bool:
    """Whether the chunk [start, end) of `source` holds the passage (module doc: a third of the shorter)."""
    if Path(source).name != passage.modern_file:
        return False
    overlap = min(end, passage.modern_end) - max(start, passage.modern_start)
    return overlap > 0 and 3 * overlap >= min(end - start, passage.modern_end - passage.modern_start)


def count_relevant(passage: Passage, spans: Sequence[tuple[str, int, int]]) -> int:
    return sum(is_relevant(passage, *span) for span in spans)


# --------------------------------------------------------------------------------------------
# The index


def index_spans(index: Any) -> list[tuple[str, int, int, str]]:
    """(source, start, end, text) of every chunk in the index (its chunk table)."""
    table = index.store.table
    return list(zip(table["source"], map(int, table["start"]), map(int, table["end"]), table["text"], strict=True))


def check_modern(spans: Sequence[tuple[str, int, int, str]], modern_dir: Path, index_dir: Path) -> set[str]:
    """The modern-edition file names the index holds; UserError when it holds none, holds Folio
    text (the queries themselves) or its chunk offsets do not point into the fetched modern text."""
    hint = "index the modern edition (`lmforge data fetch shakespeare --edition modern`) with `lmforge rag index`"
    names = {Path(source).name for source, *_ in spans}
    folio = sorted(n for n in names if n.endswith(FOLIO_SUFFIX))
    if folio:
        raise UserError(f"{index_dir}: holds First Folio text ({folio[0]}), the queries' own edition; {hint}")
    modern = {p.name for p in modern_dir.glob(f"*{MODERN_SUFFIX}")} & names
    if not modern:
        raise UserError(f"{index_dir}: holds no modern-edition Shakespeare file (*{MODERN_SUFFIX}); {hint}")
    texts = {name: (modern_dir / name).read_text(encoding="utf-8", errors="replace") for name in modern}
    for source, start, end, text in spans:
        name = Path(source).name
        if name in texts and texts[name][start:end] != text:
            raise UserError(f"{index_dir}: chunk {source}[{start}:{end}] is not that span of the modern edition's "
                            f"{name} (another text or version); {hint}")
    return modern


def run_mode(index: Any, queries: Sequence[str], mode: str, *, progress: bool = True) -> tuple[list, list[float]]:
    """(the top-10 hits of every query, the seconds of each `search` call), one query at a time."""
    index.search(queries[0], k=TOP_K, mode=mode)  # warm-up: lazy loads are not a query's latency
    hits, seconds = [], []
    for query in tqdm(queries, desc=f"rag eval {mode}", unit="query", disable=not progress, leave=False):
        t0 = time.perf_counter()
        hits.append(index.search(query, k=TOP_K, mode=mode))
        seconds.append(time.perf_counter() - t0)
    return hits, seconds


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    bad = [m for m in names if m not in MODES]
    if not names or bad or len(set(names)) != len(names):
        raise UserError(f"--modes {','.join(names)!r}: give distinct modes from {', '.join(MODES)}, comma-separated")
    return names


# --------------------------------------------------------------------------------------------
# The command


def evaluate_index(index_dir: str | Path, out: str | Path, *, modes: str | Sequence[str] = MODES,
                   queries: int = 300, seed: int = 0, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run the Folio task on the index in each mode and write results.json, report.md, queries.jsonl and
    summary.json into `out` (atomically); returns results.json's dict (module doc)."""
    from lmforge.rag import RagIndex

    t0 = time.perf_counter()
    index_dir, out, modes = Path(index_dir), Path(out), parse_modes(modes)
    if queries < 1:
        raise UserError(f"--queries must be at least 1, got {queries}")
    check_out(out, index_dir)
    index = RagIndex.open(index_dir)
    spans = index_spans(index)
    passages, modern_dir = folio_task(cache_dir, progress=progress)
    sample = sample_passages(passages, queries, seed, check_modern(spans, modern_dir, index_dir))
    n_relevant = [count_relevant(p, [s[:3] for s in spans]) for p in sample]
    per_mode, details = {}, [{"query": p.query, **p.to_json(), "n_relevant": r} for p, r in zip(sample, n_relevant)]
    for mode in modes:
        hits, seconds = run_mode(index, [p.query for p in sample], mode, progress=progress)
        judged = [[is_relevant(p, h.source, h.start, h.end) for h in row] for p, row in zip(sample, hits)]
        per_mode[mode] = {**retrieval_metrics(judged, n_relevant), "latency_ms": latency_stats(seconds)}
        for row, query_hits, rels in zip(details, hits, judged):
            row[mode] = {"chunk_ids": [h.chunk_id for h in query_hits], "relevant": rels}
    results = {"mode": modes[0], **{k: per_mode[modes[0]][k] for k in METRIC_KEYS},
               "latency_ms": per_mode[modes[0]]["latency_ms"], "queries": len(sample), "seed": seed,
               "index": str(index_dir), "index_config": read_index_config(index_dir), "modes": per_mode,
               "queries_without_relevant_chunk": sum(r == 0 for r in n_relevant)}
    write_outputs(out, results, details, index_dir, time.perf_counter() - t0)
    return results


def check_out(out: Path, index_dir: Path) -> None:
    if out.resolve() == index_dir.resolve() or index_dir.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} would replace the index {index_dir}; pass another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            stage = json.loads((out / "summary.json").read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
        if stage != "rag eval":
            raise UserError(f"--out {out} exists and is not a `rag eval` output; pass another --out")


def read_index_config(index_dir: Path) -> dict[str, Any]:
    """The index's chunking and index type (rag_config.json), for the report."""
    try:
        config = json.loads((index_dir / "rag_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def write_outputs(out: Path, results: dict, details: list[dict], index_dir: Path, seconds: float) -> None:
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "results.json", results)
        atomic_write_text(tmp / "queries.jsonl", "".join(json.dumps(row) + "\n" for row in details))
        atomic_write_text(tmp / "report.md", render_report(results))
        metrics = {key: results[key] for key in METRIC_KEYS}
        metrics["modes"] = {mode: {k: v for k, v in m.items()} for mode, m in results["modes"].items()}
        write_summary(tmp, "rag eval", config={"index": str(index_dir), "modes": list(results["modes"]),
                                               "queries": results["queries"], "seed": results["seed"]},
                      inputs={"index": index_dir}, metrics=metrics, wall_time_s=seconds)


def render_report(results: dict) -> str:
    cfg = results.get("index_config") or {}
    chunking, index = cfg.get("chunking") or {}, cfg.get("index") or {}
    about = ", ".join(f"{name} {value}" for name, value in (
        ("chunking", chunking.get("strategy")), ("size", chunking.get("size")), ("overlap", chunking.get("overlap")),
        ("index", index.get("type")), ("dim", cfg.get("dim"))) if value is not None)
    lines = ["# Retrieval evaluation: First Folio queries against the modern edition", "",
             f"Index: `{results['index']}`" + (f" ({about})" if about else ""),
             f"Queries: {results['queries']} Folio passages (seed {results['seed']}); "
             f"{results['queries_without_relevant_chunk']} without a relevant chunk in the index.", "",
             "| mode | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 | latency mean / p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for mode, m in results["modes"].items():
        lat = m["latency_ms"]
        lines.append(f"| {mode} | " + " | ".join(f"{m[k]:.3f}" for k in METRIC_KEYS)
                     + f" | {lat['mean']:.1f} / {lat['p50']:.1f} / {lat['p99']:.1f} |")
    lines += ["", "recall@k: share of queries with a relevant chunk in the top k; MRR over the top 10; "
              "binary nDCG@10 (docs/RAG.md, Evaluation). Per-query hits: queries.jsonl.", ""]
    return "\n".join(lines)
