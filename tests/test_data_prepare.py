"""`lmforge data prepare` end to end: accounting invariant, bad input, workers, resume, split, CLI, Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_helpers import edit_words, messy_corpus, prose, write_jsonl
from test_data_filters import CHINESE_PROSE

from lmforge.cli import main
from lmforge.data import dedup
from lmforge.data import prepare as prepare_module
from lmforge.data.config import load_data_config
from lmforge.data.prepare import prepare_data
from lmforge.data.readers import iter_documents, list_splits

SMALL_LINES = ["read.max_document_bytes=100000"]


def _run(inputs, out, overrides=(), **kwargs):
    cfg = load_data_config(None, [*SMALL_LINES, *overrides])
    return prepare_data([str(i) for i in inputs], out, cfg, progress=False, **kwargs)


def _tables(out: Path) -> dict[str, list[dict]]:
    tables = {}
    for split in ("train", "val", "test"):
        rows = []
        for file in sorted((out / split).glob("*.parquet")):
            rows += pq.read_table(file).to_pylist()
        tables[split] = rows
    return tables


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy") / "corpus"
    messy_corpus(root)
    return root


@pytest.fixture(scope="module")
def messy_run(messy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("messy_out") / "data"
    summary = _run([messy, messy / "m_dangling.txt"], out, workers=1)
    return out, summary


def test_accounting_invariant_holds_exactly(messy_run):
    out, s = messy_run
    kept = sum(s["documents_out"].values())
    assert s["documents_in"] == kept + sum(s["removed"].values()) + sum(s["unreadable"].values())
    # every input document, counted independently: 12 + 5 planted + 2 missing field + 1 bad json (a.jsonl),
    # 3 (gz) + 3 (zst) + 39 read before the truncation + the truncation itself, 1 csv row, 2 parquet rows,
    # 1 other-schema parquet, 1 txt, 1 binary, 1 empty, 1 bad-utf8 txt, 2 long-line file lines, 1 dangling link
    assert s["documents_in"] == 12 + 5 + 3 + 3 + 3 + 40 + 1 + 2 + 1 + 1 + 1 + 1 + 1 + 2 + 1
    assert kept == sum(len(rows) for rows in _tables(out).values())
    assert json.loads((out / "summary.json").read_text())["documents_out"] == s["documents_out"]


def test_bad_input_is_counted_with_file_and_line(messy_run, messy):
    _, s = messy_run
    assert s["unreadable"] == {"missing_field": 2, "invalid_json": 1, "truncated": 1, "bad_schema": 1,
                               "binary": 1, "empty_file": 1, "too_long": 1, "io_error": 1}
    wheres = {e["reason"]: e["where"] for e in s["unreadable_examples"]}
    assert wheres["invalid_json"] == f"{messy}/a.jsonl:20" and wheres["too_long"] == f"{messy}/l_long.jsonl:1"
    assert wheres["truncated"].startswith(f"{messy}/d_truncated.jsonl.gz:")
    assert s["metrics"]["normalize_changes"]["invalid_utf8_repaired"] == 1


def test_filters_dedup_and_pii_on_planted_documents(messy_run):
    out, s = messy_run
    assert s["removed"] == {"quality_too_few_words": 1, "blocklist": 1, "exact_duplicate": 1, "near_duplicate": 1}
    assert s["metrics"]["pii_replaced"] == {"EMAIL": 1, "PHONE": 1}
    texts = [r["text"] for rows in _tables(out).values() for r in rows]
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts) and not any("jane.doe" in t for t in texts)
    assert sum(t == prose(0) for t in texts) == 1  # one copy of the exact duplicate survives
    rows = [r for rr in _tables(out).values() for r in rr]
    assert {r["lang"] for r in rows} == {"en"} and all(0 < r["lang_score"] <= 1 for r in rows)
    meta = [json.loads(r["meta"]) for r in rows if r["meta"]]
    assert {"url": "https://example.org/3"} in meta and {"lang_hint": "en"} in meta and {"n": 2} in meta


def test_report_lists_steps_reasons_and_examples(messy_run):
    out, _ = messy_run
    report = (out / "report.md").read_text()
    assert "the invariant holds exactly" in report
    for needle in ("| quality |", "### near_duplicate (near_dedup)", "### blocklist (safety)", "| io_error |",
                   "l_long.jsonl:1", "pii <EMAIL>: 1"):
        assert needle in report, needle
    assert "- `Too short to keep.`" in report


def test_output_is_read_by_the_tokenizer_stage(messy_run):
    out, s = messy_run
    assert set(list_splits(out)) == {"train", "val", "test"}
    assert len(list(iter_documents(out / "train"))) == s["documents_out"]["train"]


def _big_jsonl(root: Path, n: int = 120) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    texts = [prose(1000 + i) for i in range(n)]
    texts += [edit_words(texts[i], 0.03, i) for i in range(0, n, 7)]  # near copies across shards
    texts += [texts[i] for i in range(3, n, 11)]  # exact copies across shards
    random.Random(0).shuffle(texts)
    return write_jsonl(root / "big.jsonl", [{"text": t} for t in texts])


def test_output_identical_for_any_worker_count(tmp_path):
    src = _big_jsonl(tmp_path / "in")
    over = ["read.shard_bytes=20000"]
    one = _run([src], tmp_path / "w1", over, workers=1)
    two = _run([src], tmp_path / "w2", over, workers=2)
    assert one["metrics"]["shards"] >= 5
    assert _tables(tmp_path / "w1") == _tables(tmp_path / "w2")
    for key in ("documents_in", "documents_out", "removed", "unreadable"):
        assert one[key] == two[key]
    assert one["removed"]["exact_duplicate"] == len(range(3, 120, 11))
    assert one["removed"]["near_duplicate"] == len(range(0, 120, 7))


def test_signatures_read_in_small_chunks_give_the_same_output(tmp_path, monkeypatch):
    """Stage 2 streams signatures from disk in chunks and verifies candidate pairs in chunks: tiny
    chunks (many per shard, straddling shard ends) must find the same planted duplicates."""
    src = _big_jsonl(tmp_path / "in")
    over = ["read.shard_bytes=20000"]
    reference = _run([src], tmp_path / "ref", over, workers=1)
    monkeypatch.setattr(prepare_module, "_SIG_CHUNK_ROWS", 3)
    monkeypatch.setattr(dedup, "_CHUNK_ROWS", 2)
    chunked = _run([src], tmp_path / "chunked", over, workers=1)
    assert chunked["removed"]["exact_duplicate"] == len(range(3, 120, 11))
    assert chunked["removed"]["near_duplicate"] == len(range(0, 120, 7))
    assert chunked["documents_out"] == reference["documents_out"]
    assert _tables(tmp_path / "chunked") == _tables(tmp_path / "ref")


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    src = _big_jsonl(tmp_path / "in")
    over = ["read.shard_bytes=20000"]
    reference = _run([src], tmp_path / "ref", over, workers=1)
    calls: list[int] = []
    real = prepare_module.process_shard

    def flaky(shard, *args):
        calls.append(shard.index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(shard, *args)

    monkeypatch.setattr(prepare_module, "process_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run([src], tmp_path / "out", over, workers=1)
    assert not (tmp_path / "out").exists()  # nothing that looks complete
    finished = set(calls[:3])
    calls.clear()
    resumed = _run([src], tmp_path / "out", over, workers=1)
    assert finished.isdisjoint(calls) and len(calls) == reference["metrics"]["shards"] - 3
    assert _tables(tmp_path / "out") == _tables(tmp_path / "ref")
    assert resumed["removed"] == reference["removed"]
    assert not (tmp_path / ".out.work").exists()  # the work dir is removed after success


def test_split_follows_content_and_clusters_not_order_or_keeper(tmp_path):
    src = _big_jsonl(tmp_path / "in")
    lines = src.read_text().splitlines()
    rev = tmp_path / "rev" / "big.jsonl"
    rev.parent.mkdir()
    rev.write_text("\n".join(reversed(lines)) + "\n")
    a = _run([src], tmp_path / "a", workers=1)
    b = _run([rev], tmp_path / "b", ["dedup.keep=first"], workers=1)
    assert a["documents_out"] == b["documents_out"]

    originals = [set(prose(1000 + i).split()) for i in range(120)]

    def split_of(out: Path) -> dict[int, str]:
        # identify each kept document by the original it was made from (most shared words)
        found = {}
        for split, rows in _tables(out).items():
            for r in rows:
                words = set(r["text"].split())
                found[max(range(120), key=lambda i: len(words & originals[i]))] = split
        return found

    sa, sb = split_of(tmp_path / "a"), split_of(tmp_path / "b")
    assert sa == sb
    assert all(a["documents_out"][s] > 0 for s in ("train", "val", "test"))


def test_strict_makes_the_first_bad_input_fatal(messy, tmp_path, capsys):
    code = main(["data", "prepare", "--input", str(messy), "--out", str(tmp_path / "o"), "--strict",
                 "--workers", "1", "--set", "read.max_document_bytes=100000"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the progress bar
    assert code == 2 and err.startswith("error: ") and "a.jsonl:18" in err
    assert not (tmp_path / "o").exists()


def test_cli_prepare_with_glob_config_and_set(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(prose(i) + "\n\n" + prose(50 + i))
    out = tmp_path / "out"
    code = main(["data", "prepare", "--input", str(tmp_path / "doc*.txt"), "--out", str(out),
                 "--config", "configs/data/default.yaml", "--split-on-blank-lines", "--workers", "1",
                 "--set", "split.seed=x"])
    assert code == 0 and "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents_in"] == 6 and summary["config"]["split"]["seed"] == "x"
    ids = [r["id"] for rows in _tables(out).values() for r in rows]
    second = prose(0).count("\n") + 3  # the line the second blank-line block starts on
    assert f"{tmp_path}/doc0.txt:1" in ids and f"{tmp_path}/doc0.txt:{second}" in ids
    assert main(["data", "prepare", "--input", str(tmp_path / "nothing*"), "--out", str(out)]) == 2
    assert main(["data", "prepare", "--input", str(tmp_path), "--out", str(out), "--set", "dedup.bandz=2"]) == 2
    assert "did you mean dedup.bands" in capsys.readouterr().err


def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    src = _big_jsonl(tmp_path / "in", n=40)
    over = ["read.shard_bytes=20000"]
    local = _run([src], tmp_path / "local", over, workers=2)
    ray_run = _run([src], tmp_path / "ray", over, workers=2, executor="ray")
    assert ray_run["metrics"]["executor"] == "ray"
    assert _tables(tmp_path / "local") == _tables(tmp_path / "ray")
    assert local["removed"] == ray_run["removed"] and local["removed"]["near_duplicate"] > 0


def test_invalid_utf8_can_drop_and_languages_can_be_restricted(messy, tmp_path):
    dropped = _run([messy / "k_bad_utf8.txt", messy / "h.txt"], tmp_path / "a", ["normalize.invalid_utf8=drop"],
                   workers=1)
    assert dropped["removed"] == {"invalid_utf8": 1} and sum(dropped["documents_out"].values()) == 1
    write_jsonl(tmp_path / "mix.jsonl", [{"text": prose(1)}, {"text": CHINESE_PROSE}])
    only_zh = _run([tmp_path / "mix.jsonl"], tmp_path / "b", ["langid.allowed=[zh]"], workers=1)
    assert only_zh["removed"] == {"lang_not_allowed": 1}
    (row,) = [r for rows in _tables(tmp_path / "b").values() for r in rows]
    assert row["lang"] == "zh" and row["text"] == CHINESE_PROSE


def test_paragraph_dedup_drops_paragraphs_seen_before(tmp_path):
    shared = prose(7, 40).replace("\n", " ")
    docs = [prose(1) + "\n\n" + shared, prose(2) + "\n\n" + shared, shared]
    write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in docs])
    s = _run([tmp_path / "p.jsonl"], tmp_path / "out", ["dedup.paragraphs=true", "dedup.near=false",
                                                         "quality.min_words=10"], workers=1)
    texts = sorted(r["text"] for rows in _tables(tmp_path / "out").values() for r in rows)
    assert s["removed"] == {"paragraph_duplicate": 1}
    assert sum(shared in t for t in texts) == 1 and len(texts) == 2
