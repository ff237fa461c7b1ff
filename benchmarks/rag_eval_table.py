"""The chunking / search-mode / index-type experiment of docs/RAG.md ("Evaluation"), as one command.

    python benchmarks/rag_eval_table.py --embedder /work/var/minilm --corpus DOCS --work /work/var/rag-exp \
        --queries 300 --seed 0 [--json table.json]

For each chunking strategy (fixed, sentence, semantic) it builds a flat index of `--corpus` (the modern
edition, or some of its plays) with `lmforge.rag.build_index` (the same as `lmforge rag index --chunking X
--index flat`; kept in `--work` and reused when already there), and from the sentence index's stored
vectors an `hnsw` and an `ivf` index (`lmforge.rag.reindex` = `lmforge rag reindex --index DIR --type hnsw|ivf
--out DIR2`: the same chunks and vectors, nothing embedded again). Every index is
then evaluated with `lmforge.rag.evaluate.evaluate_index` (= `lmforge rag eval`) in dense, bm25 and
hybrid modes (flat) or dense (hnsw, ivf) on the same queries; the table is printed in markdown. Then, on
the same query vectors, the share of flat's top 10 that hnsw returns at several efSearch and ivf at several
nprobe (docs/RAG.md's "HNSW recall@10 against flat").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STRATEGIES = ("fixed", "sentence", "semantic")
APPROXIMATE = ("hnsw", "ivf")
KEYS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
BREADTH = {"hnsw": ("ef_search", (64, 128, 256, 512)), "ivf": ("nprobe", (8, 16, 32, 64))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedder", required=True)
    p.add_argument("--corpus", required=True, help="modern-edition files (a dir)")
    p.add_argument("--work", required=True, help="where the indexes and evaluations go")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def ensure_flat(args: argparse.Namespace, strategy: str) -> Path:
    from lmforge.rag import build_index

    out = Path(args.work) / f"{strategy}-flat"
    if not (out / "summary.json").is_file():
        build_index([args.corpus], args.embedder, out, chunking=strategy, index_type="flat")
    return out


def derive(flat_dir: Path, kind: str) -> Path:
    """An index of type `kind` over the flat index's stored vectors (`lmforge rag reindex`: no re-embedding)."""
    from lmforge.rag import reindex

    out = flat_dir.with_name(flat_dir.name.replace("-flat", f"-{kind}"))
    if not (out / "summary.json").is_file():
        reindex(flat_dir, kind, out)
    return out


def evaluate(args: argparse.Namespace, index_dir: Path, modes: str) -> dict:
    from lmforge.rag.evaluate import evaluate_index

    return evaluate_index(index_dir, Path(args.work) / f"eval-{index_dir.name}", modes=modes,
                          queries=args.queries, seed=args.seed)


def overlap_with_flat(args: argparse.Namespace, flat_dir: Path, approximate: list[Path]) -> list[dict]:
    """The share of flat's top 10 each approximate index returns, per search breadth, for the evaluation's
    queries (embedded once; `rag eval` wrote them to eval-<flat>/queries.jsonl)."""
    import numpy as np

    from lmforge.rag.store import load_embedder, read_store, set_search_params

    lines = (Path(args.work) / f"eval-{flat_dir.name}" / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    flat = read_store(flat_dir)
    vectors = load_embedder(flat.config["embedder"])([json.loads(line)["query"] for line in lines])
    _, reference = flat.index.search(vectors, 10)
    rows = []
    for index_dir in approximate:
        store = read_store(index_dir)
        params = store.config["index"]
        key, values = BREADTH[params["type"]]
        for value in values:
            set_search_params(store.index, {**params, key: value})
            _, found = store.index.search(vectors, 10)
            share = np.mean([len(set(f) & set(r)) / len(r) for f, r in zip(found, reference)])
            rows.append({"index": params["type"], key: value, "recall@10_vs_flat": round(float(share), 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| chunking | index | chunks | mode | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 | p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['chunking']} | {r['index']} | {r['chunks']:,} | {r['mode']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {lat['p50']:.1f} / {lat['p99']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows, overlap = [], []
    for strategy in args.strategies:
        flat = ensure_flat(args, strategy)
        dirs = [(flat, "dense,bm25,hybrid")]
        if strategy == "sentence":
            dirs += [(derive(flat, kind), "dense") for kind in APPROXIMATE]
        for index_dir, modes in dirs:
            results = evaluate(args, index_dir, modes)
            config = results["index_config"]
            chunks = json.loads((index_dir / "summary.json").read_text())["metrics"]["chunks"]
            for mode, m in results["modes"].items():
                rows.append({"chunking": strategy, "index": config["index"]["type"], "chunks": chunks, "mode": mode,
                             "queries": results["queries"], **m})
        if strategy == "sentence":
            overlap = overlap_with_flat(args, flat, [d for d, _ in dirs[1:]])
    print(table(rows))
    for r in overlap:
        key = BREADTH[r["index"]][0]
        print(f"{r['index']} {key} {r[key]}: recall@10 vs flat {r['recall@10_vs_flat']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows + overlap, indent=2) + "\n")
    return rows + overlap


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
