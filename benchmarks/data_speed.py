"""Data-preparation speed and quality: `lmforge data prepare` vs datatrove 0.10 on the same input.

    python benchmarks/data_speed.py                 # ~220 MB, 3 alternating runs of each, 2 workers
    python benchmarks/data_speed.py --mb 40 --runs 1  # quick look

Input: the Shakespeare plays (both editions) split at blank lines into 2-16 KB documents,
replicated to ~`--mb` MB of JSONL (16 files) with planted copies: exact copies, copies with
~3% of the words replaced (near duplicates: must be removed) and copies with ~30% replaced
(distinct: must be kept). Each contender runs the full pipeline in a subprocess (filters +
dedup); wall time and peak resident memory of its whole process tree are measured, and the
contenders alternate within a run (other jobs share this machine; medians are reported).
datatrove runs Gopher repetition + quality filters, then its default MinHash (5-grams,
14 buckets x 8 hashes) in the documented 4-stage layout, with the same worker count.
Needs the `bench` extra (datatrove, spacy, psutil).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench" / "data_speed"
N_FILES = 16


# ---------------------------------------------------------------------------------------- input
def play_documents(corpus: Path, lo: int = 2000, hi: int = 16000) -> list[str]:
    """Each play cut at blank lines into documents of 2-16 KB (a short tail joins the previous one)."""
    docs = []
    for file in sorted(corpus.glob("*.txt")):
        out, cur, size = [], [], 0
        for block in re.split(r"\n\s*\n", file.read_text(encoding="utf-8")):
            if size + len(block) > hi and cur:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(block)
            size += len(block) + 2
            if size >= lo:
                out.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            if out:
                out[-1] += "\n\n" + "\n\n".join(cur)
            else:
                out.append("\n\n".join(cur))
        docs += out
    return docs


def edit(text: str, share: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(share * len(words)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def build_input(corpus: Path, mb: float, seed: int = 0) -> tuple[Path, dict]:
    """The planted-duplicate JSONL files (cached) and the label of every document id."""
    out = WORK / f"input_{int(mb)}mb"
    labels_file = WORK / f"labels_{int(mb)}mb.json"
    if out.is_dir() and labels_file.exists():
        return out, json.loads(labels_file.read_text())
    rng = random.Random(seed)
    base = play_documents(corpus)
    vocab = sorted({w for d in base[:500] for w in d.split()})
    records, labels = [], {}

    def add(text: str, kind: str, group: int) -> None:
        doc_id = f"d{len(records)}"
        records.append({"id": doc_id, "text": text})
        labels[doc_id] = [kind, group]

    for g, text in enumerate(base):
        add(text, "original", g)
        if rng.random() < 0.5:
            add(text, "exact", g)
        if rng.random() < 0.5:
            add(edit(text, 0.03, vocab, rng), "near", g)
    base_bytes = sum(len(r["text"].encode()) for r in records)
    rounds = max(0, round((mb * 1e6 - base_bytes) / sum(len(t.encode()) for t in base)))
    for r in range(rounds):
        for g, text in enumerate(base):
            add(edit(text, 0.30, vocab, rng), "distinct", -1 - (r * len(base) + g))
    rng.shuffle(records)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // N_FILES)
    for k in range(N_FILES):
        with open(tmp / f"part-{k:02d}.jsonl", "w", encoding="utf-8") as f:
            for rec in records[k * per : (k + 1) * per]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.rename(out)
    labels_file.write_text(json.dumps(labels))
    return out, labels


# ----------------------------------------------------------------------------- the contenders
def run_lmforge(input_dir: Path, out: Path, workers: int) -> list[str]:
    import pyarrow.parquet as pq

    from lmforge.data.config import load_data_config
    from lmforge.data.prepare import prepare_data

    prepare_data([str(input_dir)], out, load_data_config(), workers=workers, progress=False)
    kept = []
    for file in sorted(out.glob("*/*.parquet")):
        kept += [json.loads(m)["id"] for m in pq.read_table(file, columns=["meta"]).column(0).to_pylist()]
    return kept


def run_datatrove(input_dir: Path, out: Path, workers: int) -> list[str]:
    import gzip

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()
    files = len(list(input_dir.glob("*.jsonl")))
    common = dict(workers=workers, logging_dir=str(out / "logs"), skip_completed=False)

    def execute(name: str, pipeline: list, tasks: int) -> None:
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks,
                              **{**common, "logging_dir": str(out / "logs" / name)}).run()

    execute("filter", [JsonlReader(str(input_dir)), GopherRepetitionFilter(), GopherQualityFilter(),
                       JsonlWriter(str(out / "filtered"))], files)
    execute("signatures", [JsonlReader(str(out / "filtered")),
                           MinhashDedupSignature(output_folder=str(out / "sigs"), config=cfg)], files)
    execute("buckets", [MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"),
                                            config=cfg)], cfg.num_buckets)
    execute("cluster", [MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"),
                                            config=cfg)], 1)
    execute("dedup", [JsonlReader(str(out / "filtered")), MinhashDedupFilter(input_folder=str(out / "remove")),
                      JsonlWriter(str(out / "final"))], files)
    kept = []
    for file in sorted((out / "final").glob("*.jsonl.gz")):
        with gzip.open(file, "rt", encoding="utf-8") as f:
            kept += [json.loads(line)["id"] for line in f]
    return kept


# -------------------------------------------------------------------------------- measurement
def measured(contender: str, input_dir: Path, workers: int) -> dict:
    """Run one contender in a subprocess; wall time and peak RSS summed over its process tree."""
    import shutil

    import psutil

    out = WORK / f"out_{contender}"
    shutil.rmtree(out, ignore_errors=True)
    for stale in WORK.glob(f".out_{contender}*"):
        shutil.rmtree(stale, ignore_errors=True)
    result_file = WORK / f"result_{contender}.json"
    cmd = [sys.executable, __file__, "--child", contender, "--input", str(input_dir), "--out", str(out),
           "--workers", str(workers), "--result", str(result_file)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{err[-3000:]}")
    kept = json.loads(result_file.read_text())
    return {"wall_s": wall, "peak_rss_mb": peak / 1e6, "kept": kept}


def quality(kept: list[str], labels: dict) -> dict:
    """Goal metrics from the ids that survived."""
    alive = set(kept)
    members: dict[int, dict[str, list[str]]] = {}
    for doc_id, (kind, group) in labels.items():
        members.setdefault(group, {}).setdefault(kind, []).append(doc_id)
    originals = [g for g in members if g >= 0]
    lost_groups = sum(1 for g in originals if not any(m in alive for ids in members[g].values() for m in ids))

    def dup_removed(kind: str, against: tuple[str, ...]) -> float:
        """Share of `kind` copies that do not survive beside a surviving `against` member of their group."""
        ids = [d for d, (k, _) in labels.items() if k == kind]
        ok = 0
        for d in ids:
            group = members[labels[d][1]]
            others = [m for k in against for m in group.get(k, []) if m in alive]
            ok += not (d in alive and others)
        return ok / max(1, len(ids))

    distinct = [d for d, (k, _) in labels.items() if k == "distinct"]
    return {
        "clean_groups_lost_pct": 100 * lost_groups / max(1, len(originals)),
        "exact_removed_pct": 100 * dup_removed("exact", ("original",)),
        "near_removed_pct": 100 * dup_removed("near", ("original", "exact")),
        "distinct_removed_pct": 100 * sum(d not in alive for d in distinct) / max(1, len(distinct)),
        "kept": len(alive),
    }


def clean_quality_removal(corpus: Path) -> float:
    """% of the clean play documents that lmforge's quality + repetition filters remove (no dedup)."""
    from lmforge.data.config import QualityConfig, RepetitionConfig
    from lmforge.data.filters import quality_reason, repetition_reason, split_words
    from lmforge.data.langid import detect_language

    docs = play_documents(corpus)
    removed = 0
    for text in docs:
        words = split_words(text)
        lang = detect_language(text)[0]
        removed += bool(quality_reason(text, words, lang, QualityConfig())
                        or repetition_reason(text, words, RepetitionConfig()))
    return 100 * removed / len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=220)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", default=str(ROOT / "runs" / "demo" / "corpus"))
    parser.add_argument("--only", choices=["lmforge", "datatrove"], default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_lmforge if args.child == "lmforge" else run_datatrove
        kept = run(Path(args.input), Path(args.out), args.workers)
        Path(args.result).write_text(json.dumps(kept))
        return

    corpus = Path(args.corpus)
    if not corpus.is_dir():
        from lmforge.data.fetch import fetch_shakespeare

        corpus = WORK / "corpus"
        if not corpus.is_dir():
            fetch_shakespeare(corpus, edition="both")
    WORK.mkdir(parents=True, exist_ok=True)
    input_dir, labels = build_input(corpus, args.mb)
    total_mb = sum(f.stat().st_size for f in input_dir.glob("*.jsonl")) / 1e6
    print(f"input: {total_mb:.0f} MB, {len(labels):,} documents in {N_FILES} files; {args.workers} workers")
    contenders = [args.only] if args.only else ["lmforge", "datatrove"]
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(args.runs):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            res = measured(c, input_dir, args.workers)
            res.update(quality(res.pop("kept"), labels))
            res["mb_s"] = total_mb / res["wall_s"]
            results[c].append(res)
            print(f"run {r + 1} {c:9s} {res['wall_s']:7.1f} s  {res['mb_s']:6.2f} MB/s  "
                  f"peak {res['peak_rss_mb']:7.0f} MB  "
                  f"near removed {res['near_removed_pct']:5.1f}%  exact {res['exact_removed_pct']:5.1f}%  "
                  f"30%-edited removed {res['distinct_removed_pct']:4.1f}%  "
                  f"clean groups lost {res['clean_groups_lost_pct']:4.1f}%",
                  flush=True)
    print()
    medians = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    for c, m in medians.items():
        print(f"median {c:9s} {m['mb_s']:6.2f} MB/s  peak {m['peak_rss_mb']:6.0f} MB  "
              f"near {m['near_removed_pct']:.1f}%  "
              f"exact {m['exact_removed_pct']:.1f}%  30%-edited {m['distinct_removed_pct']:.2f}%  "
              f"clean groups lost {m['clean_groups_lost_pct']:.2f}%")
    if len(medians) == 2:
        print(f"speed ratio lmforge/datatrove: {medians['lmforge']['mb_s'] / medians['datatrove']['mb_s']:.1f}x")
    print(f"clean play documents removed by lmforge quality+repetition filters: {clean_quality_removal(corpus):.2f}%")
    (WORK / "results.json").write_text(
        json.dumps({"input_mb": total_mb, "runs": results, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
